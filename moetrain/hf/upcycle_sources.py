"""The sources of ``moetrain upcycle``: dense Hugging Face folders, or moetrain runs of a dense model.

A source is read into the same shape either way (:class:`Source`): tensors by name with their headers
(:class:`~moetrain.hf.source.HFSource`), the family whose rules map them onto moetrain's dense model, that
model's sections, and where its tokenizer comes from (:class:`TokenizerOrigin`).

- a Hugging Face folder (``config.json``): a dense family (:func:`moetrain.hf.families.dense_family_for`);
- a moetrain run directory, or one of its ``checkpoints/step_NNNNNN`` folders: the newest committed
  checkpoint that verifies, of a model with ``moe: null`` and SwiGLU FFNs without biases (what the experts
  are cut from); its ``value/<param>`` tensors map onto the parameters one to one
  (:mod:`moetrain.hf.run_family`), and its tokenizer is its config's ``data.tokenizer``.

:func:`check_alike` checks BTX specialists against the first: the same model section and tokenizer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from moetrain.checkpoint.folders import read_state
from moetrain.checkpoint.tensors import SHARED
from moetrain.config.model import ModelConfig
from moetrain.errors import UserError
from moetrain.hf import run_family
from moetrain.hf.families import dense_family_for
from moetrain.hf.families.base import UnsupportedConfigError
from moetrain.hf.source import HFSource, ShardFile, SourceTensor, read_source
from moetrain.hf.tokenizer import check_tokenizer, tokenizer_files
from moetrain.inference.loading import find_checkpoint


@dataclass(frozen=True)
class TokenizerOrigin:
    """``files``: name in RUN_DIR/tokenizer -> the file to copy (none: ``setting`` is ``data.tokenizer`` as
    it is, e.g. ``byte`` or a hub name)."""

    files: dict[str, Path] = field(default_factory=dict)
    setting: str | None = None

    def fingerprint(self) -> tuple:
        digests = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in self.files.items()}
        return self.setting, digests


@dataclass
class Source:
    path: Path
    tensors: HFSource
    family: ModuleType
    sections: dict[str, Any]  # {"model": the dense model section, "moe": None}
    tokenizer: TokenizerOrigin


def open_source(path: Path, where: str) -> Source:
    """``path`` as a source (``where``: how messages name it, e.g. ``SRC 2 (path)``)."""
    if not (path / "config.json").is_file() and path.is_dir():
        if (path / "config.yaml").is_file() or (path / "state.json").is_file() or (path / "checkpoints").is_dir():
            return _open_run(path, where)
    tensors = read_source(path)
    try:
        family = dense_family_for(tensors.config.get("model_type"))
        sections = family.to_moetrain(tensors.config)
    except UnsupportedConfigError as exc:
        raise UserError(f"{where}: {exc}") from None
    return Source(path, tensors, family, sections, TokenizerOrigin({n: path / n for n in tokenizer_files(path)}))


def _open_run(path: Path, where: str) -> Source:
    folder = find_checkpoint(path, where)
    config = read_state(folder)["config"]
    if config.get("moe") is not None:
        raise UserError(f"{where}: the run's model has experts (moe is set); upcycling takes a dense run (moe: null)")
    model = ModelConfig.model_validate(config["model"])
    for name, value, wanted in (("ffn_type", model.ffn_type, "swiglu"), ("bias", model.bias, False)):
        if value != wanted:
            raise UserError(f"{where}: model.{name} = {value!r}; upcycling cuts SwiGLU experts from SwiGLU FFNs "
                            f"without biases (model.{name}: {wanted})")  # fmt: skip
    shard = ShardFile(folder / SHARED)
    tensors = {
        name: SourceTensor(folder / SHARED, meta["dtype"], tuple(meta["shape"]))
        for name, meta in shard.header.items()
        if name.startswith("value/")
    }
    tokenizer = _run_tokenizer(config["data"]["tokenizer"], where)
    return Source(path, HFSource(folder, {}, tensors), run_family, {"model": config["model"], "moe": None}, tokenizer)


def _run_tokenizer(setting: Any, where: str) -> TokenizerOrigin:
    """A run's ``data.tokenizer``: a tokenizer.json file or a folder holding one (copied), or ``byte`` / a
    hub name (kept as the setting). A BPE the run trained is named by its cached file, not its spec."""
    if not isinstance(setting, str):
        raise UserError(
            f"{where}: the run trains its tokenizer (data.tokenizer: {setting}); pass data.tokenizer=PATH of the "
            "tokenizer.json it trained (under its data.cache_dir/tokenizers/)"
        )
    path = Path(setting)
    if path.is_dir():
        return TokenizerOrigin({n: path / n for n in tokenizer_files(path)})
    if path.is_file():
        return TokenizerOrigin({"tokenizer.json": path})
    return TokenizerOrigin(setting=setting)


def check_tokenizer_fits(source: Source, vocab_size: int) -> str:
    """Load the tokenizer the run directory will name and check it fits the model; a line for the user."""
    files = source.tokenizer.files
    if not files:
        return f"data.tokenizer: {source.tokenizer.setting} (as the source's config has it)"
    folder = next(iter(files.values())).parent
    return check_tokenizer(folder if "tokenizer.json" not in files else files["tokenizer.json"], vocab_size)


def check_alike(sources: list[Source]) -> None:
    """BTX: every specialist the first one's shape and function (its init_std aside) and tokenizer."""
    first = sources[0]
    for i, other in enumerate(sources[1:], start=2):
        where = f"SRC {i} ({other.path})"
        for name, value in first.sections["model"].items():
            if name not in ("init_std", "dropout") and other.sections["model"].get(name) != value:
                raise UserError(
                    f"{where}: model.{name} = {other.sections['model'].get(name)!r}, but SRC 1 ({first.path}) has "
                    f"{value!r}: BTX specialists must be fine-tuned from one seed model (the same shapes)"
                )
        mine, theirs = first.tokenizer.fingerprint(), other.tokenizer.fingerprint()
        if mine != theirs:
            differ = sorted(n for n in set(mine[1]) | set(theirs[1]) if mine[1].get(n) != theirs[1].get(n))
            what = ", ".join(differ) if differ else f"data.tokenizer {theirs[0]!r} vs {mine[0]!r}"
            raise UserError(
                f"{where}: its tokenizer differs from SRC 1's ({what}): BTX specialists must share the seed "
                "model's tokenizer"
            )
