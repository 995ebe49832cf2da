"""Config of the training data: sources, tokenizer, sequence length, held-out split, token store."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moetrain.config.schema import StrictModel


class DataConfig(StrictModel):
    paths: list[str] = Field(default_factory=list, description="files, folders or globs; empty = built-in corpus")
    hub: str | None = Field(None, description="a Hugging Face hub dataset name (needs a network)")
    hub_split: str = "train"
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = Field("text", description="jsonl / parquet column holding the text")
    tokenizer: str = Field("byte", description="'byte' or a Hugging Face tokenizer name or path")
    seq_len: int = Field(128, ge=2)
    val_fraction: float = Field(
        0.02, gt=0.0, lt=0.5, description="fraction of document pieces held out (piece 0, then every 1/f-th)"
    )
    split_chars: int = Field(
        8192,
        ge=256,
        description="documents longer than this are cut into pieces (at blank lines where possible); "
        "each piece goes whole to train or val",
    )
    max_tokens: int | None = Field(None, ge=1000, description="cap on the corpus size, in tokens")
    cache_dir: str = Field(".cache/moetrain/data", description="token stores live in cache_dir/<fingerprint>/")
    num_workers: int | None = Field(
        None,
        ge=0,
        description="tokenizer processes for preparation; null = the number of cores (in-process for the "
        "byte tokenizer, where workers do not pay), 0 or 1 = in-process",
    )
