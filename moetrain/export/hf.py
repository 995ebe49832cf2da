"""Write a checkpoint as a Hugging Face model folder (see ``moetrain/export/__init__.py``).

    OUT_DIR/
        config.json                     a family's (an imported run's own, or Mixtral's for a model with
                                        Mixtral's math), or moetrain's with ``auto_map`` -> modeling_moetrain.py
        generation_config.json
        model-00001-of-0000N.safetensors ...   fp32, at most --max-shard-size each
        model.safetensors.index.json    tensor name -> shard
        tokenizer.json, tokenizer_config.json, special_tokens_map.json   (an import's: its files as imported)
        modeling_moetrain.py            remote code only

The folder is built beside OUT_DIR and renamed into place: OUT_DIR is complete or absent. The tensors
come from the consolidated checkpoint (every global expert, whatever layout saved it), so a checkpoint
saved under expert parallelism exports the same files as one saved on one process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from moetrain.checkpoint.folders import staged_in_place_of
from moetrain.errors import UserError
from moetrain.export import mixtral
from moetrain.export.family import family_config, family_tensors
from moetrain.hf.families import FAMILIES, family_for
from moetrain.hf.families.base import UnsupportedConfigError
from moetrain.hf.run_files import imported_config_path
from moetrain.hf.tokenizer import FILES as TOKENIZER_FILES
from moetrain.inference.loading import LoadedCheckpoint, load_checkpoint
from moetrain.inference.text import RunTokenizer, byte_level_alphabet, run_tokenizer

MODELING = Path(__file__).with_name("modeling_moetrain.py")
EOS_TOKEN = "<|endoftext|>"  # the byte tokenizer's end-of-document token (id 256)


FAMILY_TARGETS = tuple(sorted(FAMILIES))  # deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe


@dataclass(frozen=True)
class Target:
    """What export writes: a family's own class (``family``, its config.json grown from ``base``) or, with
    ``family`` None, remote code; ``why_not``: why --target auto did not pick a native class."""

    family: ModuleType | None
    base: dict[str, Any]
    why_not: list[str]


def export_hf(
    checkpoint: str, out_dir: Path, target: str, max_shard_size: str, overrides: list[str] | None = None
) -> Iterator[str]:
    """1. check the output folder; 2. load; 3. choose the target (refusing one that does not compute the
    model) and build config.json; 4. write into a temp folder; 5. rename."""
    shard_bytes = parse_size(max_shard_size)
    _check_out_dir(out_dir)
    loaded = load_checkpoint(checkpoint, overrides)
    cfg = loaded.cfg
    tok = run_tokenizer(cfg.data, loaded.state.get("data_store") or loaded.state.get("data_fingerprint"))
    chosen = choose_target(target, loaded, tok)
    native = chosen.family is not None
    config = family_config(chosen.family, loaded, chosen.base) if native else _remote_config(loaded, tok)
    with staged_in_place_of(out_dir, "OUT_DIR", "tmp") as tmp:  # 4.-5.
        tensors = family_tensors(chosen.family, loaded, config) if native else _weights(loaded)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_generation_config(loaded.run_dir, tok, tmp)
        shards = write_shards(tensors, tmp, shard_bytes)
        write_tokenizer(tok, tmp, cfg.model.max_seq_len)
        if not native:
            shutil.copyfile(MODELING, tmp / MODELING.name)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    kind = chosen.family.ARCHITECTURE if native else "remote code (modeling_moetrain.py)"
    yield f"exported {loaded.folder} (step {loaded.step}) to {out_dir}: {kind}, {len(tensors)} tensors, {size / 1e6:.1f} MB in {shards} shard(s)"
    if not native and target == "auto" and chosen.why_not:
        yield f"not {_auto_family_name(loaded)} because: " + "; ".join(chosen.why_not)
    trust = "" if native else ", trust_remote_code=True"
    yield f"load it with transformers: AutoModelForCausalLM.from_pretrained({str(out_dir)!r}{trust})"


def imported_config(run_dir: Path) -> dict[str, Any] | None:
    """The config.json a run made by ``moetrain import`` keeps (``RUN_DIR/hf/config.json``), else None."""
    path = imported_config_path(run_dir)
    return json.loads(path.read_text()) if path.is_file() else None


def _auto_family_name(loaded: LoadedCheckpoint) -> str:
    imported = imported_config(loaded.run_dir)
    return family_for(imported["model_type"]).ARCHITECTURE if imported else "MixtralForCausalLM"


def choose_target(target: str, loaded: LoadedCheckpoint, tok: RunTokenizer) -> Target:
    """``--target``: auto (an imported run: its family; else Mixtral where the model's math is Mixtral's; else
    remote code), a family by model type (refused, naming why, when it does not compute the model), or
    remote-code."""
    if target == "remote-code":
        return Target(None, {}, [])
    imported = imported_config(loaded.run_dir)
    cfg = loaded.cfg
    own = {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id}  # a model trained here: its tokenizer's ids
    if imported is not None and target in ("auto", imported.get("model_type")):
        family, base = family_for(imported.get("model_type")), imported
    elif target == "auto" or target == "mixtral":
        why = mixtral.mismatches(cfg.model, cfg.moe)
        if not why:
            return Target(family_for("mixtral"), own, [])
        if target == "auto":
            return Target(None, {}, why)
        reasons = "\n".join(f"  - {w}" for w in why)
        raise UserError(
            f"export --target mixtral: MixtralForCausalLM does not compute this model:\n{reasons}\n"
            "export with --target remote-code (what --target auto picks) and load it with "
            "AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)"
        )
    else:
        family, base = family_for(target), own
    try:
        family_config(family, loaded, base)
    except UnsupportedConfigError as exc:
        if target == "auto":
            return Target(None, {}, [str(exc)])
        raise UserError(
            f"export --target {target}: {exc}\nexport with --target remote-code and load it with "
            "AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)"
        ) from None
    return Target(family, base, [])


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise UserError(f"--max-shard-size: {text!r} is not a size; write e.g. 5GB, 200MB or 1000000")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m.group(2)]
    return max(1, int(float(m.group(1)) * unit))


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"OUT_DIR: {str(out_dir)!r} is a file; give a new or empty folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserError(f"OUT_DIR: {str(out_dir)!r} already holds files; give a new or empty folder")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        probe = out_dir.with_name(f".{out_dir.name}.probe-{os.getpid()}")
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise UserError(
            f"OUT_DIR: cannot write {str(out_dir)!r} ({exc.strerror or exc}); give a writable folder"
        ) from None


def _weights(loaded: LoadedCheckpoint) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, fp32, contiguous, none sharing memory (safetensors forbids it)."""
    out = {}
    for name, t in loaded.model.state_dict().items():
        out[name] = t.detach().to(torch.float32 if t.is_floating_point() else t.dtype).contiguous().clone()
    return out


def _remote_config(loaded: LoadedCheckpoint, tok: RunTokenizer) -> dict:
    cfg = loaded.cfg
    moe = cfg.moe.model_copy(update={"expert_parallel_size": 1}).model_dump(mode="json") if cfg.moe else None
    return {
        "architectures": ["MoetrainForCausalLM"],
        "model_type": "moetrain",
        "auto_map": {
            "AutoConfig": "modeling_moetrain.MoetrainConfig",
            "AutoModelForCausalLM": "modeling_moetrain.MoetrainForCausalLM",
        },
        "moetrain_model": cfg.model.model_dump(mode="json"),
        "moetrain_moe": moe,
        "bos_token_id": tok.eos_id,
        "eos_token_id": tok.eos_id,
        "use_cache": False,
        "torch_dtype": "float32",
    }


def _write_generation_config(run_dir: Path, tok: RunTokenizer, folder: Path) -> None:
    """An imported run's generation_config.json as imported; else the run tokenizer's end-of-document id."""
    imported = imported_config_path(run_dir).with_name("generation_config.json")
    if imported.is_file():
        shutil.copyfile(imported, folder / "generation_config.json")
    else:
        (folder / "generation_config.json").write_text(json.dumps(_generation(tok), indent=2) + "\n")


def _generation(tok: RunTokenizer) -> dict:
    return {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id}


def write_shards(tensors: dict[str, torch.Tensor], folder: Path, shard_bytes: int) -> int:
    """``model-0000i-of-0000N.safetensors`` of at most ``shard_bytes`` each (a larger tensor alone) and
    the index; returns N."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k] for k in names}, folder / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return len(groups)


def write_tokenizer(tok: RunTokenizer, folder: Path, max_len: int) -> None:
    """tokenizer.json (+ config) for ``AutoTokenizer``: the run's file as is; the byte tokenizer as a
    byte-level BPE without merges whose ids are the byte values and 256 the end-of-document token."""
    inner = getattr(tok.tok, "tok", None)
    if tok.file is None and inner is not None:  # a hub tokenizer (transformers is installed: it loaded)
        inner.save_pretrained(str(folder))
        return
    if tok.file is not None and (tok.file.parent / "tokenizer_config.json").is_file():
        for name in TOKENIZER_FILES:  # a Hugging Face tokenizer folder (an import's): its files as they are
            if (tok.file.parent / name).is_file():
                shutil.copyfile(tok.file.parent / name, folder / name)
        return
    if tok.file is not None:
        shutil.copyfile(tok.file, folder / "tokenizer.json")
        eos = inner.id_to_token(tok.eos_id)
    else:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab = {ch: b for ch, b in byte_level_alphabet().items()}
        vocab[EOS_TOKEN] = 256
        byte_tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        byte_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        byte_tok.decoder = decoders.ByteLevel()
        byte_tok.add_special_tokens([EOS_TOKEN])
        byte_tok.save(str(folder / "tokenizer.json"))
        eos = EOS_TOKEN
    special = {"bos_token": eos, "eos_token": eos, "pad_token": eos}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, **special,
              "clean_up_tokenization_spaces": False}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
