"""The baseline of bench/e2e_lm.py: moetrain's small GPT-2-style MoE LM rebuilt on ``deepspeed.moe``.

Shape suffixes: the legend in ``moetrain/moe/__init__.py`` (B micro-batch, S sequence length).

    python bench/e2e_baseline.py configs/tiny.yaml KEY=VALUE ... --result out.json
    python -m torch.distributed.run --standalone --nproc-per-node=2 bench/e2e_baseline.py \\
        configs/tiny.yaml KEY=VALUE ... moe.expert_parallel_size=2 --result out.json

It reads the moetrain job config (with the same overrides as the moetrain run) for everything it needs,
so both sides train the same model on the same batches:

- the model: a plain pre-LN GPT-2 (learned positions, biases, tied embeddings) whose FFN of every
  ``moe.every``-th block is ``deepspeed.moe.layer.MoE`` with GELU experts
  ``Sequential(Linear(D, F, bias=False), GELU, Linear(F, D, bias=False))``, deterministic routing
  (``use_rts=False``, ``top2_2nd_expert_sampling=False``, ``min_capacity=1``) and ``drop_tokens`` off
  when ``moe.capacity_factor`` is null (dropless). Parameter names mirror moetrain's and the weights are
  copied from moetrain's model built with the same seed, so step 1 computes the same loss (dropless);
  the parameter counts are asserted equal (DeepSpeed's gate, like moetrain's router, has no bias).
- the data: moetrain's token store and :class:`moetrain.data.TrainStream` (seed, micro-batch, rank).
- the loop: ``deepspeed.initialize`` with AdamW (the same groups: no decay on norms, biases and
  positions), moetrain's LR schedule, the job's precision (fp32, or bf16 through DeepSpeed's
  bf16 engine), ZeRO stage 0, DeepSpeed's own gradient clipping at
  ``optim.grad_clip``; loss = LM loss + ``load_balance_coeff`` * the sum of DeepSpeed's ``l_aux``.
  Expert parameters go into their own optimizer groups with
  ``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer``, as DeepSpeed documents;
  with ``moe.expert_parallel_size=2`` the layer is built with ``ep_size=2``.

Rank 0 writes ``--result``: per-step wall time (data + forward + backward + step, as moetrain's
``tokens_per_s`` counts it), global tokens and LM loss (mean over ranks), and both parameter counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if not torch.cuda.is_available():  # before deepspeed is imported: its CPU accelerator, without probing
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bench.layers import deepspeed_moe  # noqa: E402
from moetrain.config import load_config  # noqa: E402
from moetrain.config.job import JobConfig  # noqa: E402
from moetrain.config.model import ModelConfig, MoEConfig  # noqa: E402


def check_mirrorable(cfg: JobConfig) -> None:
    """The baseline mirrors one family of moetrain models; refuse the others by name."""
    m, moe = cfg.model, cfg.moe
    problems = []
    if m.arch != "gpt2" or m.dropout:
        problems.append(f"model.arch gpt2 without dropout (got {m.arch}, dropout {m.dropout})")
    if moe is None or moe.placement != "replace_ffn" or moe.expert_type != "gelu":
        problems.append("moe.placement replace_ffn with moe.expert_type gelu")
    elif moe.router.kind != "topk" or moe.router.top_k not in (1, 2) or moe.router.score_func != "softmax":
        problems.append("moe.router.kind topk, softmax, top_k 1 or 2")
    elif moe.router.renormalize != (moe.router.top_k == 2):  # DeepSpeed renormalises top-2 only
        problems.append("moe.router.renormalize true for top-2, false for top-1 (DeepSpeed's gates)")
    elif moe.router.z_loss_coeff or moe.router.seq_aux_coeff or moe.router.bias_update_rate:
        problems.append("no z-loss, sequence loss or bias balancing")
    elif moe.shared_experts or moe.residual or moe.null_experts or moe.num_experts_per_layer:
        problems.append("no shared, residual, null or per-layer experts")
    if cfg.train.precision not in ("fp32", "bf16") or cfg.train.grad_accum_steps != 1:
        problems.append("train.precision fp32 or bf16 and train.grad_accum_steps 1")
    if problems:
        raise SystemExit("e2e_baseline mirrors only: " + "; ".join(problems))


# -------------------------------------------------------------------------------------------- model


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = (t.view(B, S, self.n_heads, -1).transpose(1, 2) for t in self.qkv(x_BSD).split(D, dim=-1))
        y_BHSA = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y_BHSA.transpose(1, 2).reshape(B, S, D))


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.down(F.gelu(self.up(x_BSD))), None


class DeepSpeedMoEFFN(nn.Module):
    """``deepspeed.moe.layer.MoE`` with GELU experts; returns (y, l_aux)."""

    def __init__(self, moe: MoEConfig, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.moe = deepspeed_moe(
            d_model, d_hidden, moe.num_experts, moe.router.top_k, moe.capacity_factor, moe.expert_parallel_size
        )

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y_BSD, l_aux, _ = self.moe(x_BSD)
        return y_BSD, l_aux

    @torch.no_grad()
    def copy_from(self, layer, ep_rank: int) -> int:
        """Copy moetrain's router and this rank's experts (global ids ep_rank*L ...); returns tensors copied."""
        inner = self.moe.deepspeed_moe
        inner.gate.wg.weight.copy_(layer.router.weight_ED)
        experts = inner.experts.deepspeed_experts
        first = ep_rank * len(experts)
        for j, ffn in enumerate(experts):
            ffn[0].weight.copy_(layer.experts.w1_SLDF[0, first + j].t())
            ffn[2].weight.copy_(layer.experts.w2_SLFD[0, first + j].t())
        return 1 + 2 * len(experts)


class Block(nn.Module):
    def __init__(self, m: ModelConfig, ffn: nn.Module) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(m.d_model, eps=m.norm_eps)
        self.attn = Attention(m.d_model, m.n_heads)
        self.ln2 = nn.LayerNorm(m.d_model, eps=m.norm_eps)
        self.ffn = ffn

    def forward(self, h_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h_BSD = h_BSD + self.attn(self.ln1(h_BSD))
        y_BSD, l_aux = self.ffn(self.ln2(h_BSD))
        return h_BSD + y_BSD, l_aux


class GPT(nn.Module):
    """Pre-LN GPT-2 with learned positions and tied embeddings; returns (LM loss, sum of l_aux)."""

    def __init__(self, m: ModelConfig, moe: MoEConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        self.pos = nn.Embedding(m.max_seq_len, m.d_model)
        moe_at = set(moe.moe_blocks(m.n_layers))
        d_hidden = moe.expert_hidden or m.d_ff
        self.layers = nn.ModuleList(
            Block(m, DeepSpeedMoEFFN(moe, m.d_model, d_hidden) if i in moe_at else DenseFFN(m.d_model, m.d_ff))
            for i in range(m.n_layers)
        )
        self.ln_f = nn.LayerNorm(m.d_model, eps=m.norm_eps)
        self.lm_head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(tokens_BS) + self.pos(torch.arange(tokens_BS.shape[1], device=tokens_BS.device))
        aux = torch.zeros((), device=tokens_BS.device)
        for block in self.layers:
            h, l_aux = block(h)
            if l_aux is not None:
                aux = aux + l_aux
        logits = self.lm_head(self.ln_f(h))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets_BS.reshape(-1)), aux


def copy_moetrain_weights(model: GPT, ref: nn.Module, ep_rank: int) -> None:
    """Start from moetrain's initial weights: same names outside the MoE layers, mapped inside them."""
    from moetrain.moe.layer import MoELayer

    ref_params = dict(ref.named_parameters())
    done: set[int] = set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ref_params:
                p.copy_(ref_params[name])
                done.add(id(p))
    for block, ref_block in zip(model.layers, ref.layers):
        if isinstance(ref_block.ffn, MoELayer):
            block.ffn.copy_from(ref_block.ffn, ep_rank)
            done.update(id(p) for p in block.ffn.parameters())
    missed = [n for n, p in model.named_parameters() if id(p) not in done]
    assert not missed, f"no moetrain weight for {missed}"


def param_counts(model: GPT, ref: nn.Module, ep_size: int) -> tuple[int, int]:
    """(deepspeed, moetrain) parameters of the whole model (this rank's experts times ep_size)."""
    from deepspeed.moe.utils import is_moe_param

    ours = sum(p.numel() * (ep_size if is_moe_param(p) else 1) for p in model.parameters())
    return ours, sum(p.numel() for p in ref.parameters())


# ------------------------------------------------------------------------------------------ training


def optimizer_groups(model: GPT, weight_decay: float) -> list[dict]:
    """moetrain's rule (no decay on norms, biases, positions), then DeepSpeed's MoE split of each group."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, p in model.named_parameters():  # named_parameters() yields the tied weight once
        skip = p.ndim < 2 or name.endswith(".bias") or ".ln" in name or "ln_" in name or name.startswith("pos.")
        (no_decay if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]


def init_distributed() -> tuple[int, int]:
    """(rank, world size): torchrun's variables, or a lone process; gloo on the CPU, NCCL on a GPU."""
    import deepspeed

    from moetrain.parallel.layout import free_port

    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def build(cfg: JobConfig, vocab_size: int, rank: int):
    """1. moetrain's model from the seed (the trainer's draw); 2. ours, with its weights."""
    from moetrain.model import MoETransformer

    m = cfg.model.model_copy(update={"vocab_size": cfg.model.vocab_size or vocab_size})
    torch.manual_seed(cfg.seed)
    ref = MoETransformer(m, cfg.moe)
    model = GPT(m, cfg.moe)
    copy_moetrain_weights(model, ref, rank % cfg.moe.expert_parallel_size)
    return model, param_counts(model, ref, cfg.moe.expert_parallel_size)


def train(cfg: JobConfig, rank: int, world: int) -> dict:
    """A plain DeepSpeed loop over moetrain's batches; per-step wall time, tokens and LM loss."""
    import deepspeed

    from moetrain import data
    from moetrain.training.optim import lr_lambda

    prepared = data.wait_for_data(cfg.data)
    blocks = data.PackedBlocks(prepared.stores[0].tokens("train"), cfg.data.seq_len)
    stream = data.TrainStream(blocks, cfg.seed, cfg.train.micro_batch_size, 1, rank, world)
    model, (n_ds, n_mt) = build(cfg, prepared.vocab_size, rank)
    assert n_ds == n_mt, f"parameter counts differ: deepspeed {n_ds}, moetrain {n_mt}"
    o = cfg.optim
    optimizer = torch.optim.AdamW(optimizer_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, cfg.train.steps))
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": 0},
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    coeff = cfg.moe.router.load_balance_coeff
    tokens = stream.global_batch * cfg.data.seq_len
    times, losses = [], []
    cuda = engine.device.type == "cuda"
    for step in range(cfg.train.steps):
        start = time.perf_counter()
        x_BS, y_BS, _ = stream.batch(step, 0)
        lm_loss, aux = engine(x_BS.to(engine.device), y_BS.to(engine.device))
        engine.backward(lm_loss + coeff * aux)
        engine.step()
        if cuda:  # the step's kernels have run (moetrain's per-step log reads the loss, which waits too)
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(lm_loss.detach())
    losses_T = torch.stack(losses)
    dist.all_reduce(losses_T)  # once at the end: moetrain averages over ranks outside its timed window too
    return {
        "steps": [
            {"step": i + 1, "loss": float(v) / world, "tokens": tokens, "time_s": t}
            for i, (v, t) in enumerate(zip(losses_T, times))
        ],  # fmt: skip
        "params_deepspeed": n_ds,
        "params_moetrain": n_mt,
        "threads": torch.get_num_threads(),
        "device": str(engine.device),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "world_size": world,
        "ep_size": cfg.moe.expert_parallel_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="the moetrain job config (YAML)")
    parser.add_argument("overrides", nargs="*", help="key.path=value, as for `moetrain train`")
    parser.add_argument("--result", required=True, help="JSON written by rank 0")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    check_mirrorable(cfg)
    rank, world = init_distributed()
    from moetrain.training.engine import quiet_deepspeed

    quiet_deepspeed()
    result = train(cfg, rank, world)
    if rank == 0:
        print(f"params: deepspeed {result['params_deepspeed']}, moetrain {result['params_moetrain']}", flush=True)
        Path(args.result).write_text(json.dumps(result) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
