"""The masked loss: a hand-computed masked cross-entropy on a tiny example; the prompt's targets do not
change it; one mean over the global batch's target tokens, whatever the micro-batches hold."""

from __future__ import annotations

import numpy as np
import torch
from chat_data import chat_cfg, conversation, write_jsonl
from test_isolation import model_for

from moetrain import data
from moetrain.data.sampling import _isolated
from moetrain.training.masked_loss import loss_share, target_tokens

IGNORE = data.IGNORE


@torch.no_grad()
def test_the_loss_is_the_hand_computed_masked_cross_entropy():
    model = model_for("llama", "topk")
    x = torch.tensor([[5, 6, 7, 8, 9, 10]])
    y = torch.tensor([[IGNORE, IGNORE, 8, 9, IGNORE, 11]])
    logits = model(x).logits[0].double()
    by_hand = -(
        logits[2].log_softmax(-1)[8] + logits[3].log_softmax(-1)[9] + logits[5].log_softmax(-1)[11]
    ) / 3  # fmt: skip
    assert abs(model(x, y).lm_loss.item() - by_hand.item()) < 1e-6  # the mean over the 3 targets
    summed = model(x, y, loss_tokens=1.0).lm_loss.item()
    assert abs(summed - 3 * by_hand.item()) < 1e-5
    assert abs(model(x, y, loss_tokens=torch.tensor(6.0)).lm_loss.item() - summed / 6) < 1e-6


@torch.no_grad()
def test_the_prompts_targets_do_not_change_the_chat_loss(tmp_path):
    """Rows of a chat store with the targets of every non-assistant token replaced by other tokens give the
    same loss; replacing one assistant target changes it (so the check can fail)."""
    path = write_jsonl(tmp_path / "chat.jsonl", [conversation(i, turns=2) for i in range(20)])
    cfg = chat_cfg([path], tmp_path / "cache", seq_len=256)
    rows = data.split_rows(data.prepare_tokens(cfg), "train", cfg)
    model = model_for("gpt2", "topk", max_seq_len=256)
    packed = [rows.packed_row(i) for i in range(4)]
    batch = _isolated(packed)
    base = model(batch.tokens_BS, batch.targets_BS, segments_BS=batch.segments_BS).lm_loss

    def loss_with_targets(change) -> float:
        rows_changed = []
        for tokens, mask, segments in packed:
            targets = tokens.copy()
            change(targets, mask)
            rows_changed.append((targets, mask, segments))
        y = _isolated(rows_changed).targets_BS  # the inputs stay those of ``batch``
        return model(batch.tokens_BS, y, segments_BS=batch.segments_BS).lm_loss

    def prompt_targets(targets, mask):
        targets[~mask] = (targets[~mask] + 1) % 256

    def one_assistant_target(targets, mask):
        j = int(np.flatnonzero(mask)[3])
        targets[j] = (targets[j] + 1) % 256

    assert torch.equal(loss_with_targets(prompt_targets), base)
    assert not torch.equal(loss_with_targets(one_assistant_target), base)


def test_the_normalisation_is_one_mean_over_the_global_batch():
    """Two micro-batches of 1 and 3 targets: with the share N / grad_accum each, the trainer's mean of the
    micro-batch losses is the mean over all 4 tokens, not the mean of the two means."""
    ce = [torch.tensor([2.0]), torch.tensor([1.0, 1.0, 1.0])]
    batches = [
        data.Batch(torch.zeros(1, 4), torch.tensor([[IGNORE, IGNORE, 3, IGNORE]]), None),
        data.Batch(torch.zeros(1, 4), torch.tensor([[1, IGNORE, 2, 3]]), None),
    ]
    assert int(target_tokens(batches)) == 4
    share = loss_share(batches, grad_accum=2, world_size=1, device=torch.device("cpu"))
    assert float(share) == 2.0
    logged = sum(c.sum() / share for c in ce) / 2  # what backward sees after DeepSpeed's 1 / grad_accum
    assert float(logged) == 5.0 / 4
    assert float(sum(c.mean() for c in ce) / 2) == 1.5  # the per-micro-batch mean would say this
