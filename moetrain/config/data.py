"""Config of the training data: sources, tokenizer, sequence length, held-out split, token store."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from moetrain.config.schema import StrictModel

MIN_BPE_VOCAB = 260  # 256 byte tokens + <|endoftext|> + at least 3 merges


class TrainedTokenizerConfig(StrictModel):
    """``data.tokenizer: {train: bpe, vocab_size: N}``: a byte-level BPE that moetrain trains on the
    configured sources (the train split) and caches under ``data.cache_dir/tokenizers/`` (docs/data.md)."""

    train: Literal["bpe"] = Field(description="the algorithm: byte-level BPE (the tokenizers library)")
    vocab_size: int = Field(
        description=f"tokens in all: the end-of-document token (id 0), 256 bytes and merges; at least {MIN_BPE_VOCAB}"
    )
    min_frequency: int = Field(2, ge=1, description="a pair must occur this often to be merged")
    max_chars: int | None = Field(
        None, ge=1000, description="train on at most this many characters of the train split; null = all"
    )

    @field_validator("vocab_size")
    @classmethod
    def _vocab_size(cls, v: int) -> int:
        if v < MIN_BPE_VOCAB:
            raise ValueError(
                f"{v} is too small: a byte-level BPE needs at least {MIN_BPE_VOCAB} (256 bytes, <|endoftext|> "
                "and a few merges); use e.g. 8192"
            )
        return v


Format = Literal["auto", "text", "jsonl", "parquet", "chat", "prompt_completion"]
# Formats whose records are samples with a loss mask (docs/data.md, "Chat and prompt-completion data").
SAMPLE_FORMATS = ("chat", "prompt_completion")
FORMAT_HELP = (
    "auto (by extension), text, jsonl or parquet (documents); chat ({messages: [{role, content}, ...]} records) "
    "or prompt_completion ({prompt, completion} records), from JSON Lines files or a datasets folder"
)


class DataSourceConfig(StrictModel):
    """One source of a mixture (``data.sources``): its own files or hub dataset, and its weight."""

    name: str | None = Field(None, description="names its metrics (val_loss/<name>); default source<i>")
    weight: float = Field(gt=0.0, description="share of the training blocks, relative to the other sources' weights")
    paths: list[str] = Field(default_factory=list, description="files, folders or globs")
    hub: str | None = Field(None, description="a Hugging Face hub dataset name (needs a network)")
    hub_split: str = "train"
    format: Format = Field("auto", description=FORMAT_HELP)
    text_field: str = Field("text", description="jsonl / parquet column holding the text")

    @model_validator(mode="after")
    def _check(self) -> DataSourceConfig:
        if bool(self.paths) == (self.hub is not None):
            raise ValueError("a source needs exactly one of paths (a list of files, folders or globs) or hub")
        if self.name is not None and not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"name {self.name!r} must be letters, digits, '-' or '_' (it names metrics)")
        _check_sample_source(self.format, self.paths, self.hub, "format")
        return self


def _check_sample_source(fmt: str, paths: list[str], hub: str | None, key: str) -> None:
    """Chat and prompt-completion records come from local files (JSON Lines or a datasets folder)."""
    if fmt not in SAMPLE_FORMATS:
        return
    if hub is not None:
        raise ValueError(
            f"{key} {fmt!r} reads local JSON Lines files or a datasets folder (paths), not a hub dataset; "
            "save it once with datasets' save_to_disk(FOLDER) and list FOLDER in paths"
        )
    if not paths:
        raise ValueError(f"{key} {fmt!r} needs paths: the JSON Lines files or datasets folder of the records")


class DataConfig(StrictModel):
    paths: list[str] = Field(default_factory=list, description="files, folders or globs; empty = built-in corpus")
    hub: str | None = Field(None, description="a Hugging Face hub dataset name (needs a network)")
    hub_split: str = Field(
        "train", description="the split of a hub dataset, or of a datasets folder that holds several"
    )
    format: Format = Field("auto", description=FORMAT_HELP)
    text_field: str = Field("text", description="jsonl / parquet column holding the text")
    sources: list[DataSourceConfig] | None = Field(
        None,
        description="a weighted mixture instead of data.paths / data.hub: [{paths: [...], weight: 0.7}, "
        "{hub: ..., weight: 0.3}] (docs/data.md, 'Mixtures'); one token store per source, one tokenizer",
    )
    tokenizer: str | TrainedTokenizerConfig = Field(
        "byte",
        description="a string -- 'byte', a tokenizer.json file (or a folder holding one), a Hugging Face hub "
        "name (needs transformers) -- or the section below, {train: bpe, vocab_size: N}: a byte-level BPE "
        "trained on the data (docs/data.md, 'Tokenizers')",
    )
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
    max_tokens: int | None = Field(None, ge=1000, description="cap on the corpus size (of each source), in tokens")
    cache_dir: str = Field(".cache/moetrain/data", description="token stores live in cache_dir/<fingerprint>/")
    chat_template: str | None = Field(
        None,
        description="chat data: a Jinja chat template, or the name of one of the tokenizer's named templates; null = "
        "the tokenizer's own (chat_template.jinja or tokenizer_config.json's chat_template beside its tokenizer.json)",
    )
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant", description="chat data: the loss counts the tokens of every assistant turn, or of the last one"
    )
    packing: Literal["best_fit", "none"] = Field(
        "best_fit",
        description="chat / prompt_completion data: best_fit packs several samples into a row of seq_len + 1 tokens "
        "(best fit decreasing; positions restart and attention stays inside each sample); none: one sample per row",
    )
    overlong: Literal["refuse", "truncate"] = Field(
        "refuse",
        description="a chat / prompt_completion sample of more than seq_len + 1 tokens: refuse the data (an error "
        "naming the record) or keep its first seq_len + 1 tokens; counted and reported by prepare",
    )
    document_masking: bool = Field(
        False,
        description="text data: each document (ended by the end-of-document token) is a sample of its own: positions "
        "restart and attention never crosses into the next document; the token after an end-of-document is not a target",
    )
    num_workers: int | None = Field(
        None,
        ge=0,
        description="tokenizer processes for preparation; null = the number of cores (in-process for the "
        "byte tokenizer, where workers do not pay), 0 or 1 = in-process",
    )

    @model_validator(mode="after")
    def _check_sources(self) -> DataConfig:
        if self.sources is None:
            _check_sample_source(self.format, self.paths, self.hub, "data.format")
            return self
        if self.paths or self.hub is not None:
            raise ValueError(
                "data.sources replaces data.paths and data.hub; move them into a source "
                "({paths: [...], weight: 1.0}) or remove data.sources"
            )
        if not self.sources:
            raise ValueError("data.sources is empty; give at least one {paths: [...], weight: W} or remove it")
        names = [s.name or f"source{i}" for i, s in enumerate(self.sources)]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources: the names {names} repeat; give each source its own name")
        return self

    def formats(self) -> list[str]:
        """The format of each source (one: ``data.format``)."""
        return [s.format for s in self.sources] if self.sources is not None else [self.format]

    @property
    def isolated(self) -> bool:
        """Training rows hold several samples kept apart (chat data, or document masking): the loss is masked
        and attention is block-diagonal."""
        return self.document_masking or any(f in SAMPLE_FORMATS for f in self.formats())

    def source_names(self) -> list[str]:
        return [s.name or f"source{i}" for i, s in enumerate(self.sources or [])]

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _tokenizer(cls, v: Any) -> Any:
        """One message naming the field for every bad value (not one per member of the union)."""
        if isinstance(v, (str, TrainedTokenizerConfig)):
            return v
        if not isinstance(v, dict):
            raise ValueError(
                f"{v!r} is not a tokenizer; use 'byte', a path to a tokenizer.json, a hub name, or "
                "{train: bpe, vocab_size: 8192}"
            )
        try:
            return TrainedTokenizerConfig.model_validate(v)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                key = ".".join(str(x) for x in err["loc"])
                if err["type"] == "missing":
                    problems.append(f"{key} is missing")
                elif err["type"] == "extra_forbidden":
                    allowed = ", ".join(TrainedTokenizerConfig.model_fields)
                    problems.append(f"unknown key {key!r} (allowed: {allowed})")
                elif err["type"] == "value_error":
                    problems.append(f"{key} {err['msg'].removeprefix('Value error, ')}")
                else:
                    problems.append(f"{key}: {err['msg']} (got {err['input']!r})")
            shape = all(err["type"] == "value_error" for err in exc.errors())  # else the keys themselves are off
            hint = "" if shape else "; a trained tokenizer is {train: bpe, vocab_size: N}"
            raise ValueError("; ".join(problems) + hint) from None
