"""Tokenizers: byte-level (the default) or any Hugging Face tokenizer by name or path."""

from __future__ import annotations

import numpy as np

from moetrain.errors import UserError


class ByteTokenizer:
    """UTF-8 bytes, plus one end-of-document token (256)."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)


class HFTokenizer:
    def __init__(self, name: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise UserError(
                f"data.tokenizer: {name!r} needs the transformers package (pip install 'moetrain[hf]'), "
                "or use data.tokenizer: byte"
            ) from None
        try:
            self.tok = AutoTokenizer.from_pretrained(name)
        except Exception as exc:  # noqa: BLE001 - any load failure is the user's path or name
            raise UserError(f"data.tokenizer: cannot load {name!r} ({exc})") from None
        self.name = name
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.vocab_size - 1

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok(text, add_special_tokens=False)["input_ids"], dtype=np.int32)


def build_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)
