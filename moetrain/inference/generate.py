"""``moetrain generate``: autoregressive sampling with a KV cache (shapes: moetrain/moe/__init__.py).

The prompt runs through the model once (prefill), filling the cache; then each new token runs alone,
attending over the cache, and every MoE layer routes it as it would in evaluation. Temperature 0 is
greedy (argmax); otherwise logits / temperature, then top-k, then top-p (nucleus) filtering, sampled
from a generator seeded by ``seed``. An empty prompt starts from the end-of-document token.

A model never saw positions past ``model.max_seq_len``: when the context would grow past it, the cache
is rebuilt from the last ``max_seq_len // 2`` tokens (one prefill) and decoding goes on.

A chat reply (``generate --chat``) ends at the end-of-document token or at the chat template's
end-of-turn marker (``ReplyStream``), which ``on_token`` reports by returning True.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moetrain.backbone.kv_cache import KVCache
from moetrain.model import MoETransformer


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_at_eos: bool = True


def next_token(logits_V: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
    """One token from the last position's logits (ties in greedy mode go to the lower id)."""
    logits_V = logits_V.float()
    if s.temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V / s.temperature
    if s.top_k is not None and s.top_k < logits_V.numel():
        kth = torch.topk(logits_V, s.top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    if s.top_p is not None and s.top_p < 1.0:
        sorted_p, order = torch.sort(probs_V, descending=True)
        before = torch.cumsum(sorted_p, 0) - sorted_p  # mass of the tokens ranked above each one
        sorted_p = sorted_p.masked_fill(before >= s.top_p, 0.0)  # keep the smallest set reaching top_p
        probs_V = torch.zeros_like(probs_V).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs_V, 1, generator=gen))


@torch.no_grad()
def generate(
    model: MoETransformer,
    prompt_ids: list[int],
    s: Sampling,
    eos_id: int,
    on_token: Callable[[int], bool | None] | None = None,
) -> list[int]:
    """The new tokens (the end-of-document token, when sampled, ends the list and is not included).
    ``on_token`` sees each new token; returning True stops the generation after it."""
    model.eval()
    cfg = model.cfg
    window = cfg.max_seq_len
    context = list(prompt_ids) or [eos_id]
    context = context[-(window - 1) :] if len(context) >= window else context
    gen = torch.Generator().manual_seed(s.seed)
    cache = KVCache(cfg.n_layers)
    device = next(model.parameters()).device
    logits_V = model(torch.tensor([context], device=device), cache=cache).logits[0, -1]
    out: list[int] = []
    for i in range(s.max_new_tokens):
        token = next_token(logits_V, s, gen)
        if s.stop_at_eos and token == eos_id:
            break
        out.append(token)
        context.append(token)
        if on_token is not None and on_token(token):
            break
        if i == s.max_new_tokens - 1:
            break
        if cache.length >= window:  # past the trained positions: rebuild from the recent half
            cache = KVCache(cfg.n_layers)
            logits_V = model(torch.tensor([context[-(window // 2) :]], device=device), cache=cache).logits[0, -1]
        else:
            logits_V = model(torch.tensor([[token]], device=device), cache=cache).logits[0, -1]
    return out


class ReplyStream:
    """The text of a chat reply as its tokens arrive (``decoder``: a ``text.StreamDecoder``), up to the
    template's end-of-turn marker ``end``, which is never shown: text that could still grow into the
    marker is held back until it cannot. ``done`` once the marker has appeared."""

    def __init__(self, decoder, end: str) -> None:
        self.decoder, self.end = decoder, end
        self.pending = ""
        self.done = False

    def push(self, token: int) -> str:
        if self.done:
            return ""
        self.pending += self.decoder.push(token)
        if self.end and (at := self.pending.find(self.end)) >= 0:
            self.done = True
            out, self.pending = self.pending[:at], ""
            return out
        keep = next(
            (n for n in range(min(len(self.end), len(self.pending)), 0, -1) if self.end.startswith(self.pending[-n:])),
            0,
        )
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out

    def flush(self) -> str:
        return "" if self.done else self.pending + self.decoder.flush()
