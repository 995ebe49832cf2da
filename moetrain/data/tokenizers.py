"""Tokenizers: byte-level (the default), a ``tokenizer.json`` file of the Hugging Face ``tokenizers``
library (one moetrain trained, or e.g. GPT-2's), or any Hugging Face tokenizer by hub name (needs
``transformers``). Every one has ``name``, ``vocab_size``, ``eos_id`` and ``encode(text)``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from moetrain.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
# End-of-document tokens looked up in a tokenizer.json, in this order (GPT-2 and moetrain's BPE first;
# DeepSeek-V3's last, for imported models).
EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]", "<｜end▁of▁sentence｜>")


class ByteTokenizer:
    """UTF-8 bytes, plus one end-of-document token (256)."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The tokens and the character span [start, end) of each: every byte of a character spans it."""
        ids = self.encode(text)
        char_T = np.cumsum((ids & 0xC0) != 0x80) - 1  # a UTF-8 continuation byte belongs to the character before
        return ids, np.stack([char_T, char_T + 1], axis=1)


class FileTokenizer:
    """A ``tokenizer.json`` loaded with the ``tokenizers`` library (no ``transformers``)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any parse failure means the file is not a tokenizer
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"data.tokenizer: {str(path)!r} is not a tokenizer.json of the tokenizers library ({first}); "
                "point data.tokenizer at a tokenizer.json (docs/data.md, 'Tokenizers')"
            ) from None
        self.name = str(path)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        eos = next((i for t in EOS_TOKENS if (i := self.tok.token_to_id(t)) is not None), None)
        if eos is None:
            raise UserError(
                f"data.tokenizer: {str(path)!r} has no end-of-document token (looked for {', '.join(EOS_TOKENS)}); "
                "add one as a special token, or use another tokenizer"
            )
        self.eos_id = eos

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The tokens and the character span [start, end) of each (the tokenizers library's offsets)."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return np.asarray(enc.ids, dtype=np.int32), np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


class HFTokenizer:
    """A Hugging Face tokenizer by hub name (or a model folder without a tokenizer.json), via ``transformers``."""

    def __init__(self, name: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            what = "is a folder without a tokenizer.json" if Path(name).is_dir() else "is not a file or folder here"
            raise UserError(
                f"data.tokenizer: {name!r} {what}, and loading it as a hub name or model folder needs the "
                "transformers package (pip install 'moetrain[hf]'); or download its tokenizer.json once and "
                "set data.tokenizer to that file (docs/data.md, 'Tokenizers')"
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

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The tokens and the character span [start, end) of each (a fast tokenizer's offset mapping)."""
        if not self.tok.is_fast:
            raise UserError(
                f"data.tokenizer: {self.name!r} is a slow (Python) tokenizer, which gives no character offsets; chat "
                "data needs them to find the assistant's tokens: use its tokenizer.json (a fast tokenizer)"
            )
        out = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return np.asarray(out["input_ids"], dtype=np.int32), np.asarray(out["offset_mapping"], dtype=np.int64).reshape(
            -1, 2
        )


def tokenizer_file(name: str) -> Path | None:
    """The local ``tokenizer.json`` that ``data.tokenizer`` names (a file, or a folder holding one), or
    None for 'byte' and hub names. A name ending in .json that is not a file is an error, not a hub name."""
    if name == "byte":
        return None
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.is_dir() and (path / TOKENIZER_FILE).is_file():
        return path / TOKENIZER_FILE
    if path.suffix == ".json":
        raise UserError(
            f"data.tokenizer: {name!r} does not exist; fix the path to the tokenizer.json "
            "(or use data.tokenizer: byte, or {train: bpe, vocab_size: N})"
        )
    return None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def build_tokenizer(name: str) -> ByteTokenizer | FileTokenizer | HFTokenizer:
    """``data.tokenizer`` as a string (a trained BPE arrives here as the path of its tokenizer.json)."""
    if name == "byte":
        return ByteTokenizer()
    path = tokenizer_file(name)
    return FileTokenizer(path) if path is not None else HFTokenizer(name)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)
