"""moetrain's gradient clipping (one process) against ``torch.nn.utils.clip_grad_norm_``."""

from __future__ import annotations

import pytest
import torch

from moetrain.config import load_config
from moetrain.model import MoETransformer
from moetrain.parallel.grad_norm import clip_grad_norm


def model_with_grads(seed: int = 0) -> MoETransformer:
    cfg = load_config("configs/tiny.yaml", ["model.vocab_size=64", "moe.num_experts=4"])
    torch.manual_seed(seed)
    model = MoETransformer(cfg.model, cfg.moe)
    x = torch.randint(0, 64, (2, 16))
    model(x, x).loss.backward()
    return model


@pytest.mark.parametrize("max_norm", [0.0, 1e-3, 1e6])
def test_norm_and_clipped_gradients_match_torch(max_norm):
    ours, ref = model_with_grads(), model_with_grads()
    assert any(".experts." in n for n, p in ours.named_parameters() if p.grad is not None)  # both kinds counted
    norm = clip_grad_norm(ours, max_norm, ep_group=None)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm if max_norm > 0 else float("inf"))
    torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-12, msg=name)
    if max_norm == 1e-3:  # clipped: the new norm is max_norm
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ours.parameters() if p.grad is not None]))
        assert after.item() == pytest.approx(1e-3, rel=1e-4)
