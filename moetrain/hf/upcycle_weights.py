"""The weights of an upcycled MoE, built from dense checkpoints one tensor at a time (``moetrain upcycle``).

Every source is first planned as the dense model its family maps it to (:func:`moetrain.hf.plan.make_plan`:
each tensor present, of a float dtype and the shape ``config.json`` gives, and every tensor read), so the
sources are checked before anything is written. The MoE checkpoint (the format of
:mod:`moetrain.checkpoint`) is then written entry by entry:

- ``shared.safetensors``: every tensor outside the MoE blocks' FFNs as the dense model has it (BTX: the
  mean over the specialists, in fp32), the dense FFNs of blocks left dense, and each MoE block's router,
  built fresh (:func:`router_values`);
- ``experts_<k>.safetensors``, one per MoE layer k: each global expert's ``w1`` (gate), ``w3`` (up) and
  ``w2`` (down) slice, cut from its copy's dense FFN (:func:`expert_slice`), optionally with noise.

Expert ``e`` of a layer is slice ``g = e % G`` of copy ``c = e // G`` (G the granularity, 1 unless
granular): columns ``g*F/G .. (g+1)*F/G`` of the dense FFN's hidden units, from the source ``c`` (BTX) or
the one source. Memory holds one dense FFN (its two moetrain tensors) besides the tensor being written.

Shape letters: the legend in ``moetrain/moe/__init__.py`` (D model dim, F dense FFN width, W = F / G an
expert's width, E experts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moetrain.checkpoint.streaming import SafetensorsWriter, TensorSpec
from moetrain.checkpoint.tensors import SHARED, experts_file
from moetrain.config.model import ModelConfig, MoEConfig
from moetrain.hf.convert import Reader, sources_of
from moetrain.hf.plan import ImportPlan, meta_model
from moetrain.kernels import select_backend
from moetrain.moe.experts import is_expert_param
from moetrain.moe.routers import build_router

# moetrain's stacked expert parameters, in write order, and what each is cut from
EXPERT_PARAMS = ("w1_SLDF", "w3_SLDF", "w2_SLFD")


@dataclass(frozen=True)
class Layout:
    """Where each expert comes from. ``copies``: dense FFNs per layer (BTX: the specialists);
    ``granularity``: slices per copy (G); ``noise``: the std of the Gaussian noise added to each expert
    weight, as a fraction of the dense weight's std (0: none); ``seed``: of the noise and the routers."""

    copies: int
    granularity: int
    noise: float
    seed: int

    @property
    def num_experts(self) -> int:
        return self.copies * self.granularity


@dataclass(frozen=True)
class Entry:
    spec: TensorSpec
    build: Callable[[], torch.Tensor]


class DenseFFNs:
    """The dense FFN of one block of one source, as moetrain's ``DenseFFN`` holds it (``up.weight``
    [2F, D]: gate rows, then up rows; ``down.weight`` [D, F]); keeps only the last one read."""

    def __init__(self, plans: list[ImportPlan], readers: list[Reader]) -> None:
        self.rules = [{e.rule.target: e.rule for e in plan.shared} for plan in plans]
        self.readers = readers
        self.key: tuple[int, int] | None = None
        self.up_2FD = self.down_DF = torch.empty(0)

    def of(self, source: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key != (source, block):
            rules, read = self.rules[source], self.readers[source]
            prefix = f"layers.{block}.ffn."
            self.up_2FD = rules[prefix + "up.weight"].to_moetrain(*sources_of(rules[prefix + "up.weight"], read))
            self.down_DF = rules[prefix + "down.weight"].to_moetrain(*sources_of(rules[prefix + "down.weight"], read))
            self.key = (source, block)
        return self.up_2FD, self.down_DF


def expert_slice(up_2FD: torch.Tensor, down_DF: torch.Tensor, param: str, g: int, G: int) -> torch.Tensor:
    """Slice ``g`` of ``G`` of a dense SwiGLU FFN as one expert's ``param`` ([1, D, W] or [1, W, D]).

    The dense FFN is a sum over its hidden units: ``down(silu(gate x) * up x) = sum_g down_g(silu(gate_g x)
    * up_g x)``, each term over W = F/G units; so the G slices, each gated by 1, add up to the dense FFN
    exactly (up to the order of the sum)."""
    F = down_DF.shape[1]
    W = F // G
    cols = slice(g * W, (g + 1) * W)
    if param == "w1_SLDF":
        return up_2FD[:F][cols].t().unsqueeze(0)
    if param == "w3_SLDF":
        return up_2FD[F:][cols].t().unsqueeze(0)
    return down_DF[:, cols].t().unsqueeze(0)


def with_noise(w: torch.Tensor, dense: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    """``w + scale * std(dense) * N(0, 1)`` drawn from a generator seeded by ``seed`` (the same noise in
    any write order); ``dense``: the whole dense weight the slice ``w`` comes from."""
    if scale == 0:
        return w
    gen = torch.Generator().manual_seed(seed)
    return w + scale * dense.float().std() * torch.randn(w.shape, generator=gen, dtype=torch.float32)


def router_values(moe: MoEConfig, model: ModelConfig, block: int, layout: Layout) -> dict[str, torch.Tensor]:
    """The parameters of block ``block``'s router, built fresh by the router's own init (top-k:
    ``normal(0, moe.router.init_std)``), from a generator seeded by ``layout.seed`` and the block.

    Granular (G > 1, top-k router): the G slices of one copy share that copy's row of the router weight,
    so their scores tie exactly and a token chooses whole copies (Megatron-Core's granular upcycling)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(layout.seed * 100_003 + block)
        router = build_router(
            moe.router,
            d_model=model.d_model,
            num_experts=moe.num_experts,
            vocab_size=model.vocab_size,
            backend=select_backend("torch"),
        )
    values = {name: p.detach().float() for name, p in router.named_parameters()}
    G = layout.granularity
    if G > 1:
        w_ED = values["weight_ED"]
        values["weight_ED"] = w_ED[::G].repeat_interleave(G, dim=0).contiguous()
    return values


def upcycle_entries(
    model: ModelConfig, moe: MoEConfig, plans: list[ImportPlan], readers: list[Reader], layout: Layout
) -> dict[str, list[Entry]]:
    """Checkpoint file -> its entries in write order (see the module docstring); checks that they build
    every parameter of the MoE model exactly once, with its shape."""
    params = dict(meta_model(model, moe).named_parameters())
    moe_blocks = moe.moe_blocks(model.n_layers)
    ffns = DenseFFNs(plans, readers)
    files: dict[str, list[Entry]] = {SHARED: []}
    for entry in plans[0].shared:
        target = entry.rule.target
        if target.startswith("layers.") and int(target.split(".")[1]) in moe_blocks and ".ffn." in target:
            continue  # the FFN of an MoE block: the experts below
        files[SHARED].append(Entry(TensorSpec(f"value/{target}", torch.float32, entry.spec.shape),
                                   _mean_of(target, plans, readers)))  # fmt: skip
    for k, block in enumerate(moe_blocks):
        prefix = f"layers.{block}.ffn."
        for name, value in router_values(moe, model, block, layout).items():
            files[SHARED].append(Entry(TensorSpec(f"value/{prefix}router.{name}", torch.float32, tuple(value.shape)),
                                       lambda v=value: v))  # fmt: skip
        files[experts_file(k)] = [
            _expert_entry(ffns, params, prefix, block, e, p, layout)
            for e in range(layout.num_experts)
            for p in EXPERT_PARAMS
        ]
    _check_covers(files, params)
    return files


def _mean_of(target: str, plans: list[ImportPlan], readers: list[Reader]) -> Callable[[], torch.Tensor]:
    """The tensor of the one source, or the mean over the sources in fp32 (BTX)."""
    rules = [next(e.rule for e in plan.shared if e.rule.target == target) for plan in plans]

    def build() -> torch.Tensor:
        total = rules[0].to_moetrain(*sources_of(rules[0], readers[0])).float()
        for rule, read in zip(rules[1:], readers[1:]):
            total = total + rule.to_moetrain(*sources_of(rule, read)).float()
        return total / len(rules) if len(rules) > 1 else total

    return build


def _expert_entry(ffns: DenseFFNs, params: dict, prefix: str, block: int, e: int, param: str, layout: Layout) -> Entry:
    G = layout.granularity
    copy, g = divmod(e, G)
    source = copy if len(ffns.readers) > 1 else 0
    shape = params[prefix + "experts." + param].shape
    spec = TensorSpec(f"value/{prefix}experts.{param}/{e}", torch.float32, (shape[0], *shape[2:]))

    def build() -> torch.Tensor:
        up_2FD, down_DF = ffns.of(source, block)
        w = expert_slice(up_2FD, down_DF, param, g, G).float()
        F = down_DF.shape[1]
        dense = {"w1_SLDF": up_2FD[:F], "w3_SLDF": up_2FD[F:], "w2_SLFD": down_DF}[param]
        seed = ((layout.seed * 1009 + block) * 100_003 + e) * 3 + EXPERT_PARAMS.index(param)
        return with_noise(w, dense, layout.noise, seed).contiguous()

    return Entry(spec, build)


def _check_covers(files: dict[str, list[Entry]], params: dict) -> None:
    """Every parameter (every global expert of a stacked one) written exactly once: an upcycling bug else."""
    keys = [e.spec.key for entries in files.values() for e in entries]
    expected = []
    for name, p in params.items():
        ids = [None] if not is_expert_param(name) else list(range(p.shape[1]))
        expected += [f"value/{name}" if i is None else f"value/{name}/{i}" for i in ids]
    if sorted(keys) != sorted(expected):
        missing, extra = sorted(set(expected) - set(keys)), sorted(set(keys) - set(expected))
        raise RuntimeError(f"upcycling builds the wrong tensors: missing {missing[:3]}, unexpected {extra[:3]}")


def write_entries(files: dict[str, list[Entry]], folder: Path, log: Callable[[str], None]) -> None:
    """Write each file one tensor at a time; a built tensor of the wrong shape is a bug (refused)."""
    for file, entries in files.items():
        with SafetensorsWriter(folder / file, [e.spec for e in entries]) as out:
            for entry in entries:
                value = entry.build()
                if tuple(value.shape) != tuple(entry.spec.shape):
                    raise RuntimeError(f"{entry.spec.key}: built {tuple(value.shape)}, expected {entry.spec.shape}")
                out.write(entry.spec.key, value.to(entry.spec.dtype).contiguous())
        log(f"  wrote {file}: {len(entries)} tensors, {sum(e.spec.nbytes for e in entries) / 1e6:.1f} MB")
