"""The run's tokenizer, for inference: encode prompts, stream decoded text, count bytes per token.

The tokenizer is the one the run trained with: ``data.tokenizer`` as saved, where a trained BPE is
found through the token store's index (``data.cache_dir/<data fingerprint>/index.json`` names its file)
or, failing that, where ``moetrain tokenizer train`` publishes it.

Bytes per token make bits per byte comparable across tokenizers: the byte tokenizer and byte-level
BPEs (moetrain's, GPT-2's) map every token to exact bytes (special tokens such as the end-of-document
token to none); other tokenizers fall back to the UTF-8 length of the decoded text.
"""

from __future__ import annotations

import codecs
import json
from functools import lru_cache
from pathlib import Path

from moetrain.config.data import DataConfig, TrainedTokenizerConfig
from moetrain.data import ByteTokenizer, HFTokenizer, build_tokenizer
from moetrain.data.bpe import bpe_path
from moetrain.errors import UserError


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (the ByteLevel pre-tokenizer's), inverted."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class RunTokenizer:
    """``encode``, ``decode``, ``token_bytes`` (exact bytes of every token, or None) and ``eos_id``."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.name = tok.name
        self.vocab_size = tok.vocab_size
        self.eos_id = tok.eos_id
        self.file: Path | None = Path(tok.name) if not isinstance(tok, (ByteTokenizer, HFTokenizer)) else None
        self.token_bytes = self._token_bytes()

    def _token_bytes(self) -> list[bytes] | None:
        if isinstance(self.tok, ByteTokenizer):
            return [bytes([i]) for i in range(256)] + [b""]
        inner = getattr(self.tok, "tok", None)
        if isinstance(self.tok, HFTokenizer) or type(getattr(inner, "decoder", None)).__name__ != "ByteLevel":
            return None
        alphabet = byte_level_alphabet()
        special = set(inner.get_added_tokens_decoder())
        out = []
        for i in range(self.vocab_size):
            piece = inner.id_to_token(i)
            if i in special or piece is None or any(c not in alphabet for c in piece):
                out.append(b"")
            else:
                out.append(bytes(alphabet[c] for c in piece))
        return out

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tok.encode(text)]

    def piece(self, i: int) -> bytes:
        """The bytes of token ``i`` (with ``token_bytes``). An id past the tokenizer's vocabulary -- a model's
        embedding may be padded beyond it, as imported models' often are -- stands for no text."""
        return self.token_bytes[i] if 0 <= i < len(self.token_bytes) else b""

    def decode(self, ids: list[int]) -> str:
        if self.token_bytes is not None:
            return b"".join(self.piece(i) for i in ids).decode("utf-8", errors="replace")
        if isinstance(self.tok, HFTokenizer):
            return self.tok.tok.decode(ids)
        return self.tok.decode(ids)

    def num_bytes(self, ids: list[int]) -> int:
        """UTF-8 bytes the tokens ``ids`` stand for (special tokens: none)."""
        if self.token_bytes is not None:
            return sum(len(self.piece(i)) for i in ids)
        return len(self.decode(ids).encode("utf-8"))

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Text of one token at a time, holding back an incomplete UTF-8 character until it completes."""

    def __init__(self, tok: RunTokenizer) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.shown = ""
        self.bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        if self.tok.token_bytes is not None:
            return self.bytes.decode(self.tok.piece(token))
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the next token
            return ""
        new, self.shown = text[len(self.shown) :], text
        return new

    def flush(self) -> str:
        return self.bytes.decode(b"", final=True) if self.tok.token_bytes is not None else ""


def run_tokenizer(data: DataConfig, data_fingerprint: str | None) -> RunTokenizer:
    """The tokenizer a run trained with (see the module docstring); raises UserError when it is gone."""
    spec = data.tokenizer
    if not isinstance(spec, TrainedTokenizerConfig):
        return RunTokenizer(build_tokenizer(spec))
    index = Path(data.cache_dir) / str(data_fingerprint) / "index.json"
    candidates = []
    if index.is_file():
        candidates.append(Path(json.loads(index.read_text())["tokenizer"]))
    try:
        candidates.append(bpe_path(data, spec))
    except UserError:
        pass  # the data files moved: only the store's index can name the tokenizer
    for path in candidates:
        if path.is_file():
            return RunTokenizer(build_tokenizer(str(path)))
    raise UserError(
        f"cannot find the run's trained tokenizer (data.tokenizer {spec.model_dump(exclude_defaults=True)}) under "
        f"data.cache_dir {data.cache_dir!r}; pass data.cache_dir=... where the run kept its data, or "
        "data.tokenizer=PATH/tokenizer.json"
    )
