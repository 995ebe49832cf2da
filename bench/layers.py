"""The layers the benchmarks compare, built to share one set of weights and one routing.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.

- moetrain's :class:`~moetrain.moe.layer.MoELayer` (GELU experts, top-k softmax router);
- ``deepspeed.moe.layer.MoE`` with the same router and expert weights, deterministic routing
  (no random token selection, no sampled second expert) and renormalised top-2 gates, as moetrain;
- a naive per-expert loop (``nonzero`` per expert, index_add back), on the same parameters;
- a dense FFN with the same active expert FLOPs (hidden K*F; the router's 2*T*D*E is not in it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config.model import MoEConfig
from moetrain.moe.layer import MoELayer


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int

    def as_dict(self) -> dict:
        return asdict(self)

    def ideal_train_flops(self, matrices: int = 2) -> int:
        """F_train = 3 * (2*T*D*E + 2*n*T*K*D*F) (benchmarks.md roofline; n=2 for GELU experts)."""
        t, d, f, e, k = self.tokens, self.d_model, self.d_hidden, self.num_experts, self.top_k
        return 3 * (2 * t * d * e + 2 * matrices * t * k * d * f)


def build_moetrain(shape: Shape, capacity_factor: float | None, kernels: str = "torch", seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    cfg = MoEConfig(
        num_experts=shape.num_experts,
        expert_type="gelu",
        capacity_factor=capacity_factor,
        kernels=kernels,
        router={"kind": "topk", "top_k": shape.top_k, "renormalize": shape.top_k > 1},
    )
    return MoELayer(cfg, shape.d_model, shape.d_hidden, vocab_size=256)


def deepspeed_moe(
    d_model: int, d_hidden: int, num_experts: int, top_k: int, capacity_factor: float | None, ep_size: int = 1
) -> nn.Module:
    """``deepspeed.moe.layer.MoE`` configured as moetrain's layer: GELU experts without biases,
    deterministic routing (no random token selection, no sampled second expert), ``min_capacity=1``,
    dropless (``drop_tokens=False``: every expert padded to the busiest) when ``capacity_factor`` is None.
    Needs torch.distributed initialised."""
    from deepspeed.moe.layer import MoE

    expert = nn.Sequential(
        nn.Linear(d_model, d_hidden, bias=False), nn.GELU(), nn.Linear(d_hidden, d_model, bias=False)
    )
    return MoE(
        hidden_size=d_model,
        expert=expert,
        num_experts=num_experts,
        ep_size=ep_size,
        k=top_k,
        capacity_factor=capacity_factor or 1.0,
        eval_capacity_factor=capacity_factor or 1.0,
        min_capacity=1,
        drop_tokens=capacity_factor is not None,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )


def build_deepspeed(layer: MoELayer, shape: Shape, capacity_factor: float | None) -> nn.Module:
    """``deepspeed.moe.layer.MoE`` holding copies of ``layer``'s router and expert weights.

    Needs torch.distributed initialised (``common.init_single_process_deepspeed``).
    """
    moe = deepspeed_moe(shape.d_model, shape.d_hidden, shape.num_experts, shape.top_k, capacity_factor)
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(layer.router.weight_ED)
        for e, ffn in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            ffn[0].weight.copy_(layer.experts.w1_SLDF[0, e].t())
            ffn[2].weight.copy_(layer.experts.w2_SLFD[0, e].t())
    return moe.to(layer.router.weight_ED.device, layer.experts.w1_SLDF.dtype)


class NaiveLoopMoE(nn.Module):
    """The textbook MoE: per expert, find its tokens (a host sync), run its FFN, add back weighted.

    Experts are separate parameters (as in a ``ModuleList`` of FFNs), holding copies of ``layer``'s.
    """

    def __init__(self, layer: MoELayer, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.weight_ED = nn.Parameter(layer.router.weight_ED.detach().clone())
        self.w1_DF = nn.ParameterList(w.detach().clone() for w in layer.experts.w1_SLDF[0])
        self.w2_FD = nn.ParameterList(w.detach().clone() for w in layer.experts.w2_SLFD[0])

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        probs_TE = torch.softmax(x_TD.float() @ self.weight_ED.float().t(), dim=-1)
        gates_TK, ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.top_k > 1:
            gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True)
        y_TD = torch.zeros_like(x_TD)
        for e, (w1_DF, w2_FD) in enumerate(zip(self.w1_DF, self.w2_FD)):
            tok, slot = torch.where(ids_TK == e)
            h = F.gelu(x_TD[tok] @ w1_DF) @ w2_FD
            y_TD.index_add_(0, tok, h * gates_TK[tok, slot, None].to(h.dtype))
        return y_TD


class DenseFFN(nn.Module):
    """A dense GELU FFN with hidden K*F: the same expert FLOPs per token as the MoE layer."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        hidden = shape.top_k * shape.d_hidden
        self.w1 = nn.Parameter(torch.randn(shape.d_model, hidden) / shape.d_model**0.5)
        self.w2 = nn.Parameter(torch.randn(hidden, shape.d_model) / hidden**0.5)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.gelu(x_TD @ self.w1) @ self.w2


class ExpertsOnly(nn.Module):
    """The floor under moetrain's layer: only its experts (grouped GEMMs and GELU) on the rows its
    routing gives them, already permuted; no router, permute, gates or combine. ``deepspeed /
    experts-only`` is the most any layer built around these GEMMs could reach.

    :meth:`train_step` (used by :func:`train_step_fn`) runs forward + backward of <y_rows, w_rows> on
    the kept rows; the layer's ``x_TD`` is not used.
    """

    def __init__(self, layer: MoELayer, x_TD: torch.Tensor, token_ids_T: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        self.experts = layer.experts  # the same weights
        seen = {}

        def grab(module, args, kwargs):
            seen.update(x_ND=args[0], counts_L=args[1], padded=kwargs.get("padded", False))

        hook = layer.experts.register_forward_pre_hook(grab, with_kwargs=True)
        with torch.no_grad():
            layer(x_TD, token_ids_T)
        hook.remove()
        self.x_ND = seen["x_ND"].detach().clone().requires_grad_(True)
        self.counts_L, self.padded = seen["counts_L"].clone(), seen["padded"]
        self.kept = int(self.counts_L.sum())
        g = torch.Generator().manual_seed(seed)
        self.w_ND = torch.randn(self.kept, self.x_ND.shape[-1], generator=g)

    def train_step(self) -> None:
        self.zero_grad(set_to_none=True)
        self.x_ND.grad = None
        y_ND = self.experts(self.x_ND, self.counts_L, padded=self.padded)
        (y_ND[: self.kept] * self.w_ND).sum().backward()


def forward_fn(kind: str, module: nn.Module, x_TD: torch.Tensor, token_ids_T: torch.Tensor) -> Callable:
    """A closure running one forward of ``module`` and returning (y_TD, aux loss or 0)."""
    if kind == "moetrain":

        def fwd():
            out = module(x_TD, token_ids_T)
            return out.y_TD, out.aux_loss

    elif kind == "deepspeed":

        def fwd():
            y_TD, l_aux, _ = module(x_TD)
            return y_TD, l_aux

    else:

        def fwd():
            return module(x_TD), 0.0

    return fwd


def train_step_fn(
    kind: str, module: nn.Module, x_TD: torch.Tensor, token_ids_T: torch.Tensor, w_TD: torch.Tensor
) -> Callable:
    """A closure running forward + backward (loss = <y, w> + aux), clearing gradients first."""
    if isinstance(module, ExpertsOnly):
        return module.train_step
    fwd = forward_fn(kind, module, x_TD, token_ids_T)

    def step():
        module.zero_grad(set_to_none=True)
        x_TD.grad = None
        y_TD, aux = fwd()
        ((y_TD.float() * w_TD).sum() + aux).backward()

    return step
