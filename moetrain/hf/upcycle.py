"""``moetrain upcycle SRC [SRC ...] RUN_DIR --method sparse|granular|btx ...``: dense checkpoints -> an MoE run.

Each SRC is a local dense Hugging Face folder (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``: :mod:`moetrain.hf.families.dense`) or a moetrain run of a dense model
(:mod:`moetrain.hf.upcycle_sources`). RUN_DIR becomes a run directory as
``moetrain import`` writes one (:mod:`moetrain.hf.import_run`): ``config.yaml`` with the MoE model,
``checkpoints/step_000000/`` (weights only), ``tokenizer/`` (the first source's) and ``upcycle.json`` (what
was done). The methods (docs/finetuning.md):

- **sparse** (one SRC): the FFN of every MoE block (every ``--every``-th; the others stay dense,
  ``moe.layers``) becomes E copies of itself;
- **granular** (one SRC): each of E / G copies is cut into G slices of the FFN's hidden units, E experts
  of width F / G (Megatron-Core's granular upcycling);
- **btx** (one SRC per expert, fine-tuned from one seed model): expert i is specialist i's FFN; every
  other tensor is the specialists' mean (Branch-Train-MiX).

The router is fresh (its own init, seeded). Step 0 computes the dense model exactly (tested within 1e-5)
with the router this writes: top-k of a softmax, gates renormalised over the k chosen experts (their
sum is 1, and identical copies give the dense FFN whichever are chosen), and for granular a gate scale of
G with the slices of one copy sharing a router row (the k chosen are k/G whole copies, each slice gated
1/G * G). Without noise, BTX of identical specialists is the dense model too.

Everything that can fail on the input is checked before anything is written (each a UserError: exit 2);
the run directory is built in a temporary folder beside RUN_DIR and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from moetrain.checkpoint import folders
from moetrain.checkpoint.initial import initial_state
from moetrain.config import JobConfig, config_from_dict, dump_config
from moetrain.config.data import DataConfig
from moetrain.config.loading import parse_overrides
from moetrain.config.routers import TopKRouterConfig
from moetrain.errors import UserError
from moetrain.hf.families.decoder import sections
from moetrain.hf.import_run import check_run_dir
from moetrain.hf.plan import ImportPlan, make_plan
from moetrain.hf.run_files import TOKENIZER_DIR
from moetrain.hf.upcycle_sources import Source, TokenizerOrigin, check_alike, check_tokenizer_fits, open_source
from moetrain.hf.upcycle_weights import Layout, upcycle_entries, write_entries
from moetrain.training.resume_checks import model_differences

Method = Literal["sparse", "granular", "btx"]
RECORD = "upcycle.json"
# What an override may change besides the training-only fields: the router is fresh (any kind), and the
# capacity changes which tokens an expert drops, not the weights.
FREE_MOE = ("moe.router", "moe.capacity_factor")


@dataclass(frozen=True)
class UpcycleSpec:
    """``--method``, ``--num-experts`` (btx: the number of SRCs when None), ``--top-k``, ``--granularity``
    (granular only), ``--every``, ``--noise`` (a fraction of each weight's std), ``--seed``."""

    method: Method
    num_experts: int | None
    top_k: int
    granularity: int = 1
    every: int = 1
    noise: float = 0.0
    seed: int = 0


def upcycle(
    srcs: list[Path], run_dir: Path, spec: UpcycleSpec, overrides: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> None:  # fmt: skip
    """1. RUN_DIR; 2. the sources (family, dense sections, tensors planned and checked; BTX: all alike);
    3. the layout and the job config; 4. the tokenizer; 5. write into a temp folder and rename it."""
    run_dir = run_dir.resolve()
    check_run_dir(run_dir)  # 1.
    _check_count(srcs, spec)
    sources = [open_source(p, "SRC" if len(srcs) == 1 else f"SRC {i + 1} ({p})") for i, p in enumerate(srcs)]  # 2.
    own_tokenizer = "tokenizer" not in parse_overrides(overrides or []).get("data", {})
    if not own_tokenizer:  # the run reads another tokenizer: the sources' need not agree
        sources = [replace(s, tokenizer=TokenizerOrigin()) for s in sources]
    check_alike(sources)
    model = sources[0].sections["model"]
    layout = _layout(spec, len(srcs), model["d_ff"])  # 3.
    tokenizer = sources[0].tokenizer
    cfg = _job_config(model, _moe_section(spec, layout, model), run_dir, _tokenizer_setting(tokenizer, overrides))
    not_dense = _check_router(cfg, layout)
    plans = [_plan(s) for s in sources]
    about_tokenizer = check_tokenizer_fits(sources[0], cfg.model.vocab_size) if own_tokenizer else ""  # 4.
    files = upcycle_entries(cfg.model, cfg.moe, plans, [s.tensors.reader() for s in sources], layout)
    record = {"sources": [str(s.resolve()) for s in srcs], "architectures": [s.family.ARCHITECTURE for s in sources],
              **asdict(spec), "num_experts": layout.num_experts}  # fmt: skip
    log(f"upcycling {', '.join(map(str, srcs))} ({spec.method}): {cfg.moe.num_experts} experts, top "
        f"{getattr(cfg.moe.router, 'top_k', '-')}, MoE blocks {cfg.moe.moe_blocks(cfg.model.n_layers)}")  # fmt: skip
    if not_dense:
        log(f"NOTE: step 0 will not compute the dense model: {not_dense}")
    if own_tokenizer:
        log(f"tokenizer: {', '.join(tokenizer.files) or tokenizer.setting} ({about_tokenizer})")

    def write(tmp: Path) -> None:
        if own_tokenizer and tokenizer.files:
            (tmp / TOKENIZER_DIR).mkdir()
            for name, path in tokenizer.files.items():
                shutil.copyfile(path, tmp / TOKENIZER_DIR / name)
        (tmp / "config.yaml").write_text(dump_config(cfg))
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        ckpt = folders.checkpoint_dir(tmp, 0)
        staging = folders.temp_dir(ckpt)
        staging.mkdir(parents=True)
        write_entries(files, staging, log)
        folders.commit(staging, ckpt, initial_state(cfg.model_dump(mode="json"), {"upcycled": record}))

    with folders.staged_in_place_of(run_dir, "RUN_DIR", "upcycle") as tmp:  # 5.
        write(tmp)
    log(f"upcycled into {run_dir}; train it: moetrain train {run_dir / 'config.yaml'}")


def _tokenizer_setting(tokenizer: TokenizerOrigin, overrides: list[str] | None) -> list[str]:
    """The overrides, led by ``data.tokenizer`` where the source's is a setting, not files to copy."""
    lead = [f"data.tokenizer={tokenizer.setting}"] if not tokenizer.files and tokenizer.setting else []
    return [*lead, *(overrides or [])]


def _check_count(srcs: list[Path], spec: UpcycleSpec) -> None:
    if spec.method == "btx" and len(srcs) < 2:
        raise UserError(f"--method btx merges 2 or more specialists (one per expert); got {len(srcs)} SRC")
    if spec.method != "btx" and len(srcs) != 1:
        raise UserError(f"--method {spec.method} upcycles one dense model; got {len(srcs)} SRCs (btx merges several)")
    if spec.granularity != 1 and spec.method != "granular":
        raise UserError(f"--granularity ({spec.granularity}) applies to --method granular only")


def _layout(spec: UpcycleSpec, n_sources: int, d_ff: int) -> Layout:
    E, K, G = spec.num_experts, spec.top_k, spec.granularity
    if spec.method == "btx":
        if E is not None and E != n_sources:
            raise UserError(f"--num-experts ({E}) must be the number of specialists ({n_sources}) for --method btx")
        E = n_sources
    if E is None or E < 1:
        raise UserError(f"--num-experts ({E}) must be 1 or more")
    if not 1 <= K <= E:
        raise UserError(f"--top-k ({K}) must be between 1 and --num-experts ({E})")
    if G < 1 or d_ff % G:
        raise UserError(f"--granularity ({G}) must divide the dense FFN width (intermediate_size {d_ff})")
    if E % G or K % G:
        raise UserError(
            f"--num-experts ({E}) and --top-k ({K}) must be multiples of --granularity ({G}): a token chooses "
            "whole copies of the dense FFN, G slices each"
        )
    if spec.every < 1:
        raise UserError(f"--every ({spec.every}) must be 1 or more")
    if spec.noise < 0:
        raise UserError(f"--noise ({spec.noise}) must be 0 or more (a fraction of each weight's std)")
    return Layout(copies=E // G if spec.method != "btx" else n_sources, granularity=G, noise=spec.noise, seed=spec.seed)


def _moe_section(spec: UpcycleSpec, layout: Layout, model: dict[str, Any]) -> dict[str, Any]:
    """The MoE that starts as the dense model: top-k of a softmax, renormalised (gate scale G)."""
    n_layers = model["n_layers"]
    if spec.every > n_layers:
        raise UserError(f"--every ({spec.every}) must be <= the model's blocks ({n_layers})")
    return {
        "placement": "replace_ffn",
        "layers": [i for i in range(n_layers) if (i + 1) % spec.every == 0],
        "num_experts": layout.num_experts,
        "expert_type": "swiglu",
        "expert_hidden": model["d_ff"] // layout.granularity,
        "capacity_factor": None,
        "router": {
            "kind": "topk",
            "top_k": spec.top_k,
            "score_func": "softmax",
            "renormalize": True,
            "gate_scale": float(layout.granularity),
            "init_std": model["init_std"],
        },
    }


def _job_config(model: dict, moe: dict, run_dir: Path, overrides: list[str]) -> JobConfig:
    """The MoE as a job config with the overrides; one that changes the weights' shapes is refused."""
    seq_len = min(DataConfig.model_fields["seq_len"].default, model["max_seq_len"])
    raw = {"name": run_dir.name, "run_dir": str(run_dir), "model": model, "moe": moe,
           "data": {"tokenizer": str(run_dir / TOKENIZER_DIR), "seq_len": seq_len}}  # fmt: skip
    base = config_from_dict(raw, [], "the upcycled config")
    cfg = config_from_dict(raw, overrides, "the upcycled config")
    changed = [
        line
        for line in model_differences(base.model_dump(mode="json"), cfg.model_dump(mode="json"))
        if not any(line.startswith(free + ".") or line.startswith(free + ":") for free in FREE_MOE)
    ]
    if changed:
        lines = "\n".join(f"  - {c}" for c in changed)
        raise UserError(
            f"overrides change the upcycled model:\n{lines}\nupcycling sets the model and experts from the "
            "sources and the flags; override the router (moe.router.*) and training settings only"
        )
    return cfg


def _check_router(cfg: JobConfig, layout: Layout) -> str | None:
    """Granular needs a top-k router choosing whole copies (the slices of one copy tie, see
    :func:`~moetrain.hf.upcycle_weights.router_values`); refused otherwise. Returns why step 0 will not be
    the dense model when a router override makes it so (None: it will be)."""
    r, G = cfg.moe.router, layout.granularity
    if G > 1 and not (isinstance(r, TopKRouterConfig) and r.top_k % G == 0):
        raise UserError(
            f"--method granular needs moe.router.kind topk with top_k a multiple of --granularity ({G}) (got "
            f"{r.kind}, top_k {getattr(r, 'top_k', None)}): its slices of one copy share a router row so that a "
            "token chooses whole copies"
        )
    if not isinstance(r, TopKRouterConfig):
        return f"moe.router.kind {r.kind} (the exact router: topk, renormalized)"
    exact = {"renormalize": True, "gate_scale": float(G)}
    for name, value in exact.items():
        if getattr(r, name) != value:
            return f"moe.router.{name} = {getattr(r, name)!r} (exact: {value!r})"
    if cfg.moe.capacity_factor is not None:
        return f"moe.capacity_factor = {cfg.moe.capacity_factor} drops tokens (exact: null)"
    return None


def _plan(source: Source) -> ImportPlan:
    model, _ = sections(source.sections["model"], None)
    return make_plan(source.family, source.tensors.config, source.tensors, model, None)
