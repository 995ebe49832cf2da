"""Packed rows on the CPU: what block-diagonal causal attention costs against plain causal attention.

    python bench/packed_attention.py            # writes bench/results/packed_attention.json

Two measurements in one process on one thread (``--threads``), each the median of ``--repeats`` timed runs
after one warm-up, the two variants of a comparison alternating run by run (so a change of machine load
hits both):

1. the attention op alone (``F.scaled_dot_product_attention``, forward + backward, fp32): causal
   (``is_causal``) against the boolean block-diagonal mask of ``moetrain/backbone/packing.py``, at the tiny
   LM's shape (B 16, 4 heads, S 128, head dim 32) and at S 1024 (B 4, 8 heads, head dim 64); FlexAttention
   (eager, and compiled) is timed forward only, as torch 2.13 has no FlexAttention backward on the CPU;
2. a training step (forward + backward) of configs/llama_tiny.yaml's model and of configs/tiny.yaml's (B 16,
   S 128): plain rows against rows of packed samples (``segments_BS``: samples of 16-64 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moetrain.backbone.packing import block_causal_mask  # noqa: E402
from moetrain.config import load_config  # noqa: E402
from moetrain.model import MoETransformer  # noqa: E402


def random_segments(B: int, S: int, lo: int, hi: int, gen: torch.Generator) -> torch.Tensor:
    segments = torch.zeros(B, S, dtype=torch.long)
    for b in range(B):
        at, k = 0, 0
        while at < S:
            n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
            segments[b, at : at + n] = k
            at, k = at + n, k + 1
    return segments


def timed(fn, repeats: int) -> float:
    return compared([fn], repeats)[0]


def compared(fns: list, repeats: int) -> list[float]:
    """Median milliseconds of each of ``fns``, run in turn ``repeats`` times after one warm-up each."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def attention_op(B: int, H: int, S: int, A: int, repeats: int, gen: torch.Generator) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v = (torch.randn(B, H, S, A, generator=gen, requires_grad=True) for _ in range(3))
    segments = random_segments(B, S, S // 8, S // 2, gen)
    mask = block_causal_mask(segments)

    def causal():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    def masked():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

    block_mask = create_block_mask(
        lambda b, h, i, j: (segments[b, i] == segments[b, j]) & (j <= i), B, None, S, S, device="cpu"
    )
    compiled = torch.compile(flex_attention)

    @torch.no_grad()
    def flex_eager():
        flex_attention(q.detach(), k.detach(), v.detach(), block_mask=block_mask)

    @torch.no_grad()
    def flex_compiled():
        compiled(q.detach(), k.detach(), v.detach(), block_mask=block_mask)

    @torch.no_grad()
    def causal_forward():
        F.scaled_dot_product_attention(q, k, v, is_causal=True)

    causal_ms, mask_ms = compared([causal, masked], repeats)
    row = {"shape": f"B{B} H{H} S{S} A{A}", "causal_ms": causal_ms, "mask_ms": mask_ms}
    row["mask_over_causal"] = row["mask_ms"] / row["causal_ms"]
    row["causal_forward_ms"] = timed(causal_forward, repeats)
    row["flex_eager_forward_ms"] = timed(flex_eager, max(2, repeats // 5))
    row["flex_compiled_forward_ms"] = timed(flex_compiled, repeats)
    return row


def model_step(config: str, repeats: int, gen: torch.Generator) -> dict:
    cfg = load_config(REPO / "configs" / config, ["model.vocab_size=257"])
    torch.manual_seed(0)
    model = MoETransformer(cfg.model, cfg.moe).train()
    B, S = 16, cfg.data.seq_len
    x = torch.randint(0, 257, (B, S), generator=gen)
    y = torch.randint(0, 257, (B, S), generator=gen)
    segments = random_segments(B, S, 16, 64, gen)

    def plain():
        model(x, y).loss.backward()

    def packed():
        model(x, y, segments_BS=segments).loss.backward()

    plain_ms, packed_ms = compared([plain, packed], repeats)
    row = {"config": config, "plain_ms": plain_ms, "packed_ms": packed_ms}
    row["packed_over_plain"] = row["packed_ms"] / row["plain_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "packed_attention.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    ops = [attention_op(16, 4, 128, 32, args.repeats, gen), attention_op(4, 8, 1024, 64, args.repeats, gen)]
    for r in ops:
        print(
            f"attention {r['shape']}: causal {r['causal_ms']:.2f} ms, mask {r['mask_ms']:.2f} ms "
            f"({r['mask_over_causal']:.2f}x), forward: causal {r['causal_forward_ms']:.2f} ms, flex eager "
            f"{r['flex_eager_forward_ms']:.2f} ms, flex compiled {r['flex_compiled_forward_ms']:.2f} ms",
            flush=True,
        )
    steps = [model_step(c, args.repeats, gen) for c in ("llama_tiny.yaml", "tiny.yaml")]
    for r in steps:
        print(
            f"step {r['config']}: plain {r['plain_ms']:.1f} ms, packed {r['packed_ms']:.1f} ms "
            f"({r['packed_over_plain']:.2f}x)",
            flush=True,
        )
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "load_avg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "attention": ops, "steps": steps}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
