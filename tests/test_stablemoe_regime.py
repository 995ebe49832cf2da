"""StableMoE in its own regime (issue 11): gate statistics, the adaptive switch, the backbone options.

Gate statistics worked example (one micro-batch, top-1, E = 2):

    gates   [0.05, 0.5, 0.9, 0.02]   -> gate_mean = 1.47 / 4 = 0.3675, gate_low_frac = 2 / 4 (0.05, 0.02 < 0.1)

Adaptive switch (window 3, min_agreement 0.8, max_load 2.0, stage1_steps 12), agreement of the
distilled router per step 1, 2, ...:

    0.1 0.5 0.9 0.9 0.85 0.95 ...    window means: step 3: 0.5, step 4: 0.767, step 5: 0.883 >= 0.8
    -> the switch fires after step 5 (reason CRITERIA); with an unbalanced distilled load
       (max/mean 13/4 = 3.25 > 2) it never does, and stage 1 ends at stage1_steps (reason MAX_STEPS).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_metrics, train_ok
from pydantic import ValidationError

from moetrain.config.model import ModelConfig, MoEConfig
from moetrain.config.routers import StableMoERouterConfig
from moetrain.model import MoETransformer
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.hooks import StepReport
from moetrain.moe.metrics import LayerStats, MoEMetrics
from moetrain.moe.routers.base import RoutingDecision
from moetrain.moe.routers.stablemoe import RouterStage, StableMoERouter, SwitchReason
from moetrain.moe.routers.stablemoe_schedule import StableRoutingSchedule
from moetrain.training.optim import freeze_groups, isolate_tagged_params, param_groups

# --- gate statistics ---------------------------------------------------------------------------------


def test_gate_statistics_on_a_hand_built_routing():
    ids = torch.tensor([[0], [1], [1], [0]])
    gates = torch.tensor([[0.05], [0.5], [0.9], [0.02]])
    terms = {"distill_acc": torch.tensor(0.5), "distilled_load": torch.tensor([3.0, 1.0])}
    stats = LayerStats.from_decision(RoutingDecision(ids, gates, torch.zeros(()), terms), 2, torch.zeros(()))
    metrics = MoEMetrics()
    metrics.add([stats])
    metrics.add([stats])  # two micro-steps of the same routing: the same means
    out = metrics.flush()
    assert out["moe/layer0/gate_mean"] == pytest.approx(1.47 / 4)
    assert out["moe/layer0/gate_low_frac"] == pytest.approx(0.5)
    assert out["moe/layer0/distill_acc"] == pytest.approx(0.5)
    assert out["moe/layer0/distilled_load_max_over_mean"] == pytest.approx(6 / 4)  # [6, 2] over 2 steps
    assert "moe/layer0/distilled_load" not in out


# --- the adaptive switch, driven by a scripted agreement sequence -------------------------------------


def tiny_model(**router) -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=2, d_ff=16, max_seq_len=8)
    moe = MoEConfig(num_experts=4, expert_hidden=8, router=StableMoERouterConfig(**router))
    return MoETransformer(cfg, moe)


class FakeContext:
    """The trainer's side of the hooks (moetrain.moe.hooks.HookContext) over a plain optimizer."""

    def __init__(self, model: MoETransformer, step: int = 0) -> None:
        groups = isolate_tagged_params(model, param_groups(model, 0.0))
        self.optimizer = torch.optim.AdamW(groups, lr=1e-3)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        self.step, self.total_steps = step, 100
        self.records: list[tuple[int, dict]] = []
        self.lines: list[str] = []

    def log(self, step: int, metrics: dict) -> None:
        self.records.append((step, metrics))

    def say(self, text: str) -> None:
        self.lines.append(text)

    def freeze_group(self, tag: str) -> int:
        return freeze_groups(self.optimizer, self.scheduler, tag)


def stable_routers(model: MoETransformer) -> list[StableMoERouter]:
    return [m for m in model.modules() if isinstance(m, StableMoERouter)]


def schedule_of(model: MoETransformer) -> StableRoutingSchedule:
    """The hook the model's StableMoE routers declare (the one the trainer would run)."""
    (schedule,) = StableMoERouter.declare_hooks(stable_routers(model))
    return schedule


def scripted_result(step: int, agreement: float, distilled_load: list[float]) -> StepReport:
    layers = []
    for _ in range(2):  # replace_ffn in both blocks: 2 MoE layers
        terms = {
            "distill_acc": torch.tensor(agreement),
            "distill": torch.tensor(1.0 - agreement),
            "distilled_load": torch.tensor(distilled_load),
        }
        layers.append(LayerStats(torch.full((4,), 4.0), torch.zeros(()), torch.zeros(()), torch.tensor(16.0), terms))
    return StepReport(step, [layers])


AGREEMENT = [0.1, 0.5, 0.9, 0.9, 0.85, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95]
ADAPTIVE = {"switch": "adaptive", "stage1_steps": 12, "adaptive": {"window": 3, "min_agreement": 0.8, "max_load": 2}}


def drive(ctx, schedule, first: int, last: int, load: list[float]) -> int | None:
    """Steps first..last (1-based counts of updates done); returns the step the switch happened at."""
    for step in range(first, last + 1):
        schedule.before_step(ctx, step - 1)
        if schedule.frozen:
            return step - 1
        schedule.after_step(ctx, scripted_result(step, AGREEMENT[step - 1], load))
        if schedule.frozen:
            return step
    return None


def test_adaptive_switch_fires_when_the_window_meets_the_criteria():
    model = tiny_model(**ADAPTIVE)
    trainer = FakeContext(model)
    schedule = schedule_of(model)
    schedule.on_train_start(trainer)
    assert drive(trainer, schedule, 1, 12, [4.0, 4.0, 4.0, 4.0]) == 5
    routers = stable_routers(model)
    assert all(r.stage is RouterStage.FROZEN for r in routers)
    assert all(r.switch_buf.tolist() == [5, int(SwitchReason.CRITERIA)] for r in routers)
    step, logged = trainer.records[-1]
    assert step == 5 and logged["moe/switch_step"] == 5 and logged["moe/switch_reason"] == SwitchReason.CRITERIA
    assert logged["moe/layer1/switch_distill_acc"] == pytest.approx((0.9 + 0.9 + 0.85) / 3)
    assert logged["moe/layer0/switch_distill"] == pytest.approx(1 - (0.9 + 0.9 + 0.85) / 3)
    assert logged["moe/layer0/switch_distilled_load_max_over_mean"] == pytest.approx(1.0)
    assert "criteria" in trainer.lines[-1]


def test_adaptive_switch_waits_for_a_balanced_distilled_router_then_times_out():
    model = tiny_model(**ADAPTIVE)
    trainer = FakeContext(model)
    schedule = schedule_of(model)
    schedule.on_train_start(trainer)
    assert drive(trainer, schedule, 1, 14, [13.0, 1.0, 1.0, 1.0]) == 12  # agreement high, load 3.25 > 2
    step, logged = trainer.records[-1]
    assert (step, logged["moe/switch_reason"]) == (12, SwitchReason.MAX_STEPS)
    assert logged["moe/layer0/switch_distilled_load_max_over_mean"] == pytest.approx(13 / 4)


def test_fixed_switch_records_the_window_at_the_switch():
    model = tiny_model(stage1_steps=4, adaptive={"window": 2})
    trainer = FakeContext(model)
    schedule = schedule_of(model)
    schedule.on_train_start(trainer)
    assert drive(trainer, schedule, 1, 10, [4.0, 4.0, 4.0, 4.0]) == 4  # agreement 0.9 at step 3 does not matter
    step, logged = trainer.records[-1]
    assert (step, logged["moe/switch_reason"]) == (4, SwitchReason.STEPS)
    assert logged["moe/layer0/switch_distill_acc"] == pytest.approx((0.9 + 0.9) / 2)  # steps 3 and 4


def test_adaptive_switch_state_is_checkpointed_and_survives_resume():
    """Interrupt at step 4 (mid-window), resume from the state dict: the switch still fires at step 5;
    a run resumed after the switch starts frozen with the recorded step and reason, and logs nothing."""
    model = tiny_model(**ADAPTIVE)
    trainer = FakeContext(model)
    schedule = schedule_of(model)
    schedule.on_train_start(trainer)
    assert drive(trainer, schedule, 1, 4, [4.0] * 4) is None
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    resumed = tiny_model(**ADAPTIVE)
    resumed.load_state_dict(saved)
    trainer2 = FakeContext(resumed, step=4)
    schedule2 = schedule_of(resumed)
    schedule2.on_train_start(trainer2)
    assert not schedule2.frozen
    assert drive(trainer2, schedule2, 5, 12, [4.0] * 4) == 5

    after = tiny_model(**ADAPTIVE)
    trainer3 = FakeContext(after, step=7)  # the trainer builds the optimizer, then loads the checkpoint
    after.load_state_dict(resumed.state_dict())
    assert all(r.stage is RouterStage.FROZEN for r in stable_routers(after))
    assert all(r.switch_buf.tolist() == [5, int(SwitchReason.CRITERIA)] for r in stable_routers(after))
    schedule3 = schedule_of(after)
    schedule3.on_train_start(trainer3)
    assert schedule3.frozen and trainer3.records == []
    groups = [g for g in trainer3.optimizer.param_groups if g["name"].startswith("distilled_router")]
    assert groups and all(g["lr"] == 0.0 for g in groups)


def test_adaptive_switch_end_to_end_across_a_resume(tmp_path, data_cache):
    """A real run stopped after step 1 (inside the first window) and resumed: the switch fires by its
    criteria after step 2, is logged once in metrics.jsonl and is in the later checkpoint."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    args = [
        "moe.router={kind: stablemoe, switch: adaptive, stage1_steps: 8, "
        "adaptive: {window: 2, min_agreement: 0.01, max_load: 4}}",
        "train.steps=4",
        "checkpoint.interval=1",
    ]
    train_ok(run, data_cache, *args, "train.stop_at_step=1")
    assert not [r for r in read_metrics(run) if "moe/switch_step" in r]
    first = load_file(run / "checkpoints" / "step_000001" / "shared.safetensors")
    ring = [v for k, v in first.items() if k.endswith("switch_window_buf")]
    assert ring and all(int(r[:, 0].sum()) == 1 for r in ring)  # one valid row: step 1
    train_ok(run, data_cache, *args)
    recs = read_metrics(run)
    switch = [r for r in recs if "moe/switch_step" in r]
    assert len(switch) == 1 and switch[0]["moe/switch_step"] == 2 and switch[0]["moe/switch_reason"] == 2
    assert switch[0]["moe/layer0/switch_window_steps"] == 2  # step 1 came from the checkpoint
    assert all("moe/layer0/gate_mean" in r and "moe/layer0/gate_low_frac" in r for r in recs if "loss" in r)
    last = load_file(run / "checkpoints" / "step_000004" / "shared.safetensors")
    bufs = [v for k, v in last.items() if k.endswith("switch_buf")]
    assert bufs and all(b.tolist() == [2, int(SwitchReason.CRITERIA)] for b in bufs)


# --- config ------------------------------------------------------------------------------------------


def test_adaptive_criteria_without_adaptive_switch_is_one_clear_error():
    with pytest.raises(ValidationError, match=r"moe\.router\.adaptive\.min_agreement .*switch=adaptive"):
        StableMoERouterConfig(adaptive={"min_agreement": 0.5})
    StableMoERouterConfig(adaptive={"window": 10})  # the window also sizes the switch record
    StableMoERouterConfig.model_validate(StableMoERouterConfig().model_dump())  # a dumped config.yaml loads again


def test_fairseq_expert_init_needs_stacked_experts():
    with pytest.raises(ValidationError, match="moe.expert_init fairseq .* moe.expert_type is gelu"):
        MoEConfig(expert_init="fairseq", expert_type="gelu")


# --- backbone options --------------------------------------------------------------------------------


def test_sqrt_d_embedding_changes_only_the_token_embedding():
    def build(scale: str) -> MoETransformer:
        torch.manual_seed(3)
        cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=2, d_ff=64, max_seq_len=8, embed_scale=scale)
        return MoETransformer(cfg, MoEConfig(num_experts=4, expert_hidden=16))

    plain, scaled = build("none"), build("sqrt_d")
    a, b = dict(plain.named_parameters()), dict(scaled.named_parameters())
    assert a.keys() == b.keys()
    differ = [n for n in a if not torch.equal(a[n], b[n])]
    assert differ == ["embed.weight"]  # lm_head is tied to it
    assert torch.allclose(b["embed.weight"], a["embed.weight"] * (64**-0.5 / 0.02))
    assert b["embed.weight"].std().item() == pytest.approx(64**-0.5, rel=0.05)

    seen = {}
    tokens = torch.tensor([[1, 2, 3, 4]])
    for name, model in (("plain", plain), ("scaled", scaled)):
        hook = model.layers[0].register_forward_pre_hook(lambda _m, args, name=name: seen.update({name: args[0]}))
        model(tokens)
        hook.remove()
    pos = plain.pos.weight[:4]
    # the block input is embed * sqrt(d) + positions: sqrt(64) * (64^-0.5 / 0.02) = 50 times the plain embedding
    assert torch.allclose(seen["scaled"] - pos, (seen["plain"] - pos) * math.sqrt(64) * 64**-0.5 / 0.02, atol=1e-5)


def test_fairseq_expert_init_is_the_official_sublayer_init():
    torch.manual_seed(0)
    ours = GroupedExperts("stacked", 4, 16, 64, 3)
    torch.manual_seed(0)
    official = GroupedExperts("stacked", 4, 16, 64, 3, init="fairseq")
    assert ours.b2_SLD.abs().max() == 0 and ours.b1_SLF.abs().max() == 0
    assert official.w2_SLFD.abs().max() == 0  # only the second weight is zeroed
    assert 0 < official.b2_SLD.abs().max() <= 64**-0.5 and official.b2_SLD.std() > 0.5 * 64**-0.5 / math.sqrt(3)
    assert 0 < official.b1_SLF.abs().max() <= 16**-0.5
    assert official.w1_SLDF.abs().max() <= 16**-0.5 < ours.w1_SLDF.abs().max()  # uniform, not normal
    x = torch.randn(8, 16)
    assert not torch.allclose(official(x, torch.tensor([2, 2, 2, 2])), torch.zeros(8, 16))  # x + b2 per sublayer
    assert torch.equal(ours(x, torch.tensor([2, 2, 2, 2])), torch.zeros(8, 16))  # the identity


def test_expert_init_option_reaches_the_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=2, d_ff=16, max_seq_len=8)
    moe = MoEConfig(placement="insert", expert_type="stacked", expert_init="fairseq", num_experts=4, expert_hidden=8)
    experts = MoETransformer(cfg, moe).moe_layers()[0].experts
    assert experts.b2_SLD.abs().max() > 0 and experts.w2_SLFD.abs().max() == 0
