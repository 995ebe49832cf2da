"""``moetrain import SRC RUN_DIR [key=value ...]``: a Hugging Face model folder -> a moetrain run directory.

    RUN_DIR/
        config.yaml                       the job: the family's model and moe sections, data.tokenizer
                                          pointing at tokenizer/, the overrides (steps, lr, data, layout)
        hf/config.json                    the imported config.json as it was (+ generation_config.json):
                                          what `moetrain export` writes the family's class back from;
        hf/import.json                    the source, its class, the tensors left out (moetrain.hf.run_files)
        tokenizer/                        the source's tokenizer files
        checkpoints/step_000000/          an initial (weights-only) checkpoint, committed
                                          (moetrain.checkpoint.initial)

``moetrain train RUN_DIR/config.yaml`` starts from the step-0 checkpoint (checkpoint.resume: auto), under
any world size, expert-parallel size and ZeRO stage; eval, generate and export load it as any checkpoint.

Everything that can fail on the input is checked before anything is written: RUN_DIR, config.json (the
family, every field it maps, :class:`UnsupportedConfigError` naming a value moetrain cannot represent),
the overrides (they may not change the model), the shards' headers and every tensor's shape
(:mod:`.plan`), and the tokenizer. The run directory is then built in a temporary folder beside RUN_DIR
and renamed into place: RUN_DIR is complete or absent. The weights stream (one tensor in memory at a
time: :func:`moetrain.hf.plan.write_plan`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moetrain.checkpoint import folders
from moetrain.checkpoint.initial import initial_state
from moetrain.config import JobConfig, config_from_dict, dump_config
from moetrain.config.data import DataConfig
from moetrain.config.loading import parse_overrides
from moetrain.errors import UserError
from moetrain.hf.families import family_for
from moetrain.hf.families.base import UnsupportedConfigError
from moetrain.hf.plan import make_plan, write_plan
from moetrain.hf.run_files import HF_DIR, IMPORT_RECORD, KEPT, TOKENIZER_DIR
from moetrain.hf.source import read_source
from moetrain.hf.tokenizer import check_tokenizer, copy_tokenizer, tokenizer_files
from moetrain.training.resume_checks import model_differences


def import_hf(src: Path, run_dir: Path, overrides: list[str] | None = None, log: Callable[[str], None] = print) -> None:
    """1. RUN_DIR; 2. the source's config and family; 3. the job config with the overrides; 4. the shards,
    planned and checked; 5. the tokenizer, loaded; 6. write into a temp folder (``log`` says each file as it
    is written); 7. rename."""
    run_dir = run_dir.resolve()
    check_run_dir(run_dir)  # 1.
    source = read_source(src)  # 2.
    family = _family(source.config)
    try:
        sections = family.to_moetrain(source.config)
    except UnsupportedConfigError as exc:
        raise UserError(f"SRC: {exc}") from None
    cfg = _job_config(sections, run_dir, overrides or [])  # 3.
    plan = make_plan(family, source.config, source, cfg.model, cfg.moe)  # 4.
    own_tokenizer = "tokenizer" not in parse_overrides(overrides or []).get("data", {})
    tokenizer = tokenizer_files(src) if own_tokenizer else []  # 5.
    about_tokenizer = check_tokenizer(src, cfg.model.vocab_size) if own_tokenizer else ""
    with folders.staged_in_place_of(run_dir, "RUN_DIR", "import") as tmp:  # 7. renamed into place at the end
        log(f"importing {src} ({family.ARCHITECTURE}): {plan.nbytes / 1e6:.1f} MB of fp32 weights to write")
        log(_copy_kept(src, tmp / HF_DIR))
        if own_tokenizer:
            copy_tokenizer(src, tmp / TOKENIZER_DIR, tokenizer)
            log(f"tokenizer: {', '.join(tokenizer)} ({about_tokenizer})")
        (tmp / "config.yaml").write_text(dump_config(cfg))
        ckpt = folders.checkpoint_dir(tmp, 0)
        staging = folders.temp_dir(ckpt)
        staging.mkdir(parents=True)
        write_plan(plan, source.reader(), staging, log)  # 6.
        origin = {"source": str(src.resolve()), "model_type": source.config.get("model_type"),
                  "architecture": family.ARCHITECTURE, "skipped_tensors": plan.skipped,
                  "unmapped_tensors": [t.key for t in plan.unmapped]}  # fmt: skip
        (tmp / HF_DIR / IMPORT_RECORD).write_text(json.dumps(origin, indent=1) + "\n")
        folders.commit(staging, ckpt, initial_state(cfg.model_dump(mode="json"), origin))
    if plan.skipped:
        log(f"left out of the model (not part of {family.ARCHITECTURE}'s forward pass): {len(plan.skipped)} tensors")
    log(f"imported into {run_dir}; train it: moetrain train {run_dir / 'config.yaml'}")


def check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"RUN_DIR: {str(run_dir)!r} is a file; give a new or empty folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(f"RUN_DIR: {str(run_dir)!r} already holds files; give a new or empty folder")


def _family(config: dict[str, Any]):
    try:
        family = family_for(config.get("model_type"))
        family.check(config)
    except UnsupportedConfigError as exc:
        raise UserError(f"SRC: {exc}") from None
    return family


def _job_config(sections: dict[str, Any], run_dir: Path, overrides: list[str]) -> JobConfig:
    """The imported model as a job config, the overrides applied; an override that changes the model
    (its weights or what it computes) is refused: the checkpoint holds the source's model."""
    model = sections["model"]
    seq_len = min(DataConfig.model_fields["seq_len"].default, model["max_seq_len"])
    raw = {
        "name": run_dir.name,
        "run_dir": str(run_dir),
        "model": model,
        "moe": sections["moe"],
        "data": {"tokenizer": str(run_dir / TOKENIZER_DIR), "seq_len": seq_len},
    }
    base = config_from_dict(raw, [], "the imported config")
    cfg = config_from_dict(raw, overrides, "the imported config")
    changed = model_differences(base.model_dump(mode="json"), cfg.model_dump(mode="json"))
    if changed:
        lines = "\n".join(f"  - {c}" for c in changed)
        raise UserError(
            f"overrides change the imported model:\n{lines}\nimport keeps the model the checkpoint holds; override "
            "training settings only (train.*, optim.*, data.*, checkpoint.*, moe.expert_parallel_size, "
            "moe.router.load_balance_coeff, model.dropout, ...)"
        )
    return cfg


def _copy_kept(src: Path, dest: Path) -> str:
    """config.json (and generation_config.json) as they were, for export."""
    dest.mkdir(parents=True)
    kept = [name for name in KEPT if (src / name).is_file()]
    for name in kept:
        shutil.copyfile(src / name, dest / name)
    return f"kept {', '.join(kept)} in {HF_DIR}/"
