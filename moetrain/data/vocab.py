"""The model's vocabulary size before any data is prepared (``moetrain plan`` sizes the embeddings with it).

``model.vocab_size`` when set; otherwise what ``data.tokenizer`` implies without tokenizing anything:
the byte tokenizer's 257, a trained BPE's configured size (an upper bound: a small corpus may give
fewer merges), a ``tokenizer.json`` file's size, or a Hugging Face tokenizer found in the local cache.
"""

from __future__ import annotations

from moetrain.config.data import TrainedTokenizerConfig
from moetrain.config.job import JobConfig
from moetrain.errors import UserError


def with_vocab_size(cfg: JobConfig) -> JobConfig:
    """``cfg`` with ``model.vocab_size`` resolved (UserError when it cannot be known here)."""
    model = cfg.model.model_copy(update={"vocab_size": resolve_vocab_size(cfg)})
    return cfg.model_copy(update={"model": model})


def resolve_vocab_size(cfg: JobConfig) -> int:
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    tok = cfg.data.tokenizer
    if isinstance(tok, TrainedTokenizerConfig):
        return tok.vocab_size
    from moetrain.data.tokenizers import ByteTokenizer, FileTokenizer, tokenizer_file

    if tok == "byte":
        return ByteTokenizer.vocab_size
    path = tokenizer_file(tok)
    if path is not None:
        return FileTokenizer(path).vocab_size
    try:
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(tok, local_files_only=True))
    except Exception:  # noqa: BLE001 - not installed, not cached: the user gives the size
        raise UserError(
            f"data.tokenizer {tok!r} is not in the local Hugging Face cache, so its vocabulary size is unknown "
            "here; set model.vocab_size (e.g. model.vocab_size=50257 for GPT-2's tokenizer)"
        ) from None
