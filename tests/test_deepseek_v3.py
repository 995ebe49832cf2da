"""The DeepSeek-V3 family (``moetrain/hf/families/deepseek_v3.py``): a random ``DeepseekV3ForCausalLM``
and the moetrain model built from ``to_moetrain`` and the rules give the same logits (fp32, 1e-5) and the
same greedy continuation; the rules read both on-disk layouts (save_pretrained's per-expert tensors, a
fused state_dict read with get_slice, a hand-built Hub layout with a multi-token-prediction layer), every
rule round-trips bit for bit, export's config and tensors load back into transformers, and ``check``
refuses what moetrain does not compute, naming the field."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hf_import import SafetensorsReader, dict_reader, moetrain_model, randomize  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from moetrain.hf.families import deepseek_v3  # noqa: E402
from moetrain.hf.families.base import UnsupportedConfigError  # noqa: E402
from moetrain.inference.generate import Sampling, generate  # noqa: E402

pytestmark = pytest.mark.timeout(300)

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=12,
    routed_scaling_factor=2.5,
    max_position_embeddings=128,
    rope_parameters=YARN,
)
VARIANTS = {
    "dense1-shared1-yarn": {},
    "shared2-qlora-null": {"n_shared_experts": 2, "q_lora_rank": None},
    "plain-rope-no-renorm": {
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
        "norm_topk_prob": False,
    },
    "no-dense-no-interleave-tied": {"first_k_dense_replace": 0, "rope_interleave": False, "tie_word_embeddings": True},
}


def hf_model(variant: str, seed: int = 0) -> tuple[DeepseekV3ForCausalLM, dict]:
    config = DeepseekV3Config(**{**BASE, **VARIANTS[variant]})
    hf = DeepseekV3ForCausalLM(config).eval()
    randomize(hf, seed)
    if config.tie_word_embeddings:
        hf.tie_weights()
    return hf, config.to_dict()


def tokens(n: int = 2, s: int = 21) -> torch.Tensor:
    return torch.randint(0, 96, (n, s), generator=torch.Generator().manual_seed(5))


def assert_same_logits(hf, model) -> None:
    x = tokens()
    with torch.no_grad():
        want, got = hf(x).logits, model(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers(variant):
    hf, hc = hf_model(variant)
    sd = hf.state_dict()  # transformers' in-memory layout: fused [E, ...] experts
    assert deepseek_v3.is_fused(hc, set(sd))
    assert_same_logits(hf, moetrain_model(deepseek_v3.to_moetrain(hc), deepseek_v3.rules(hc, set(sd)), dict_reader(sd)))


def test_greedy_decoding_with_the_kv_cache_equals_transformers_generate():
    hf, hc = hf_model("dense1-shared1-yarn")
    sd = hf.state_dict()
    model = moetrain_model(deepseek_v3.to_moetrain(hc), deepseek_v3.rules(hc, set(sd)), dict_reader(sd))
    prompt = tokens(1, 7)
    hf.generation_config.eos_token_id = None
    want = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
    got = generate(model, prompt[0].tolist(), Sampling(12, temperature=0.0, stop_at_eos=False), eos_id=0)
    assert got == want[0, 7:].tolist()


def test_save_pretrained_layout_is_per_expert_and_imports(tmp_path):
    hf, hc = hf_model("shared2-qlora-null")
    hf.save_pretrained(tmp_path)
    reader = SafetensorsReader(tmp_path)
    assert not deepseek_v3.is_fused(hc, reader.names())
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in reader.names()
    hc = json.loads((tmp_path / "config.json").read_text())
    rules = deepseek_v3.rules(hc, reader.names())
    assert {s for r in rules for s in r.sources} == reader.names()  # every tensor read, none missing
    assert_same_logits(hf, moetrain_model(deepseek_v3.to_moetrain(hc), rules, reader))


def test_fused_layout_is_read_one_expert_slice_at_a_time(tmp_path):
    hf, hc = hf_model("dense1-shared1-yarn")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(tmp_path)
    rules = deepseek_v3.rules(hc, reader.names())
    assert {s for r in rules for s in r.sources} == reader.names()
    assert_same_logits(hf, moetrain_model(deepseek_v3.to_moetrain(hc), rules, reader))
    fused = {name for name, _ in reader.sliced}
    assert fused == {f"model.layers.{i}.mlp.experts.{w}" for i in (1, 2) for w in ("gate_up_proj", "down_proj")}
    assert {i for _, i in reader.sliced} == set(range(8))


def test_hub_layout_with_an_mtp_layer_in_two_shards(tmp_path):
    """The Hub's arrangement by hand: per-expert tensors over two files, plus layer n (multi-token
    prediction, as the Hub's model.layers.61), which no rule reads and skipped_tensors names."""
    hf, hc = hf_model("dense1-shared1-yarn")
    hf.save_pretrained(tmp_path / "saved")
    saved = SafetensorsReader(tmp_path / "saved")
    tensors = {name: saved(name, None) for name in saved.names()}
    mtp = {
        f"model.layers.3.{k.split('.', 3)[3]}": v.clone() for k, v in tensors.items() if k.startswith("model.layers.2.")
    }
    mtp.update({"model.layers.3.enorm.weight": torch.ones(32), "model.layers.3.eh_proj.weight": torch.zeros(32, 64)})
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[: len(names) // 2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(
        {**{k: tensors[k] for k in names[len(names) // 2 :]}, **mtp}, str(tmp_path / "model-00002-of-00002.safetensors")
    )
    reader = SafetensorsReader(tmp_path)
    hub = {
        **hc,
        "num_nextn_predict_layers": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "moe_layer_freq": 1,
    }
    rules = deepseek_v3.rules(hub, reader.names())
    skipped = deepseek_v3.skipped_tensors(hub, reader.names())
    assert set(skipped) == set(mtp)
    assert {s for r in rules for s in r.sources} | set(skipped) == reader.names()
    assert_same_logits(hf, moetrain_model(deepseek_v3.to_moetrain(hub), rules, reader))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fused", [False, True])
def test_every_rule_round_trips_bit_for_bit(variant, fused):
    hf, hc = hf_model(variant)
    sd = hf.state_dict()
    names = set(sd) if fused else None
    per_expert = {}
    for rule in deepseek_v3.rules(hc, names):
        sources = [sd[s] if rule.index is None else sd[s][rule.index] for s in rule.sources] if fused else None
        if not fused:  # the export layout: build the sources from the fused tensors the way transformers splits them
            sources = [per_expert_tensor(sd, s, hc) for s in rule.sources]
        back = rule.to_hf(rule.to_moetrain(*sources))
        if rule.index is not None and rule.target.endswith(("w1_SLDF", "w3_SLDF")):
            rows = slice(0, 16) if rule.target.endswith("w1_SLDF") else slice(16, 32)
            sources = [sources[0][rows]]  # a gate_up slice feeds two rules: each gives back its rows
            per_expert.setdefault((rule.sources[0], rule.index), []).append(back[0])
        assert len(back) == len(sources)
        for b, s in zip(back, sources):
            assert b.dtype == s.dtype and torch.equal(b, s), rule.target
    for (name, e), parts in per_expert.items():  # the two halves give the whole slice back
        assert torch.equal(torch.cat(parts), sd[name][e])


def per_expert_tensor(sd: dict, name: str, hc: dict) -> torch.Tensor:
    if ".experts." not in name or name.endswith("_proj") or "shared" in name:
        return sd[name]
    prefix, e, which, _ = name.rsplit(".", 3)
    i = hc["moe_intermediate_size"]
    if which == "down_proj":
        return sd[f"{prefix}.down_proj"][int(e)]
    gate_up = sd[f"{prefix}.gate_up_proj"][int(e)]
    return gate_up[:i] if which == "gate_proj" else gate_up[i:]


def test_export_config_and_tensors_load_back_into_transformers(tmp_path):
    """moetrain -> to_hf_config + rules' to_hf (per-expert layout) -> DeepseekV3ForCausalLM.from_pretrained:
    the same logits. The bias moved by training is folded into e_score_correction_bias first."""
    hf, hc = hf_model("dense1-shared1-yarn")
    sd = hf.state_dict()
    sections = deepseek_v3.to_moetrain(hc)
    sections["moe"]["router"]["bias_update_rate"] = 0.01
    model = moetrain_model(sections, deepseek_v3.rules(hc, set(sd)), dict_reader(sd))
    router = model.layers[1].ffn.router
    router.bias_steps_E.copy_(torch.tensor([3, -2, 0, 1, 5, -5, 0, 0]))
    for m in model.moe_layers():
        m.router.fold_bias_steps()
    out_cfg = deepseek_v3.to_hf_config(hc, model.cfg.model_dump(), sections["moe"])
    state = model.state_dict()
    tensors = {}
    for rule in deepseek_v3.rules(out_cfg):
        value = state[rule.target] if rule.expert is None else state[rule.target][:, rule.expert]
        tensors.update(zip(rule.sources, (t.contiguous() for t in rule.to_hf(value))))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    mtp_layers = lambda c: deepseek_v3.fields(c)["num_mtp_layers"]  # noqa: E731 - under either of its names
    assert mtp_layers(out_cfg) == mtp_layers(hc) == 1  # the file's own count, kept
    out_cfg.update(deepseek_v3.without_skipped(out_cfg))  # what export writes for a trained model
    (tmp_path / "config.json").write_text(json.dumps(out_cfg))
    back = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.num_nextn_predict_layers == 0
    assert_same_logits(back, model)
    assert deepseek_v3.to_moetrain(back.config.to_dict())["model"] == deepseek_v3.to_moetrain(hc)["model"]


REFUSALS = [
    ({"topk_method": "greedy"}, "topk_method"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"moe_layer_freq": 2}, "moe_layer_freq"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"n_group": 3}, "n_group"),
    ({"n_group": 8}, "n_group"),  # groups of one expert: no top-2 group score
    ({"topk_group": 5}, "topk_group"),
    ({"num_experts_per_tok": 5, "topk_group": 1}, "num_experts_per_tok"),
    ({"n_shared_experts": 0}, "n_shared_experts"),
    ({"first_k_dense_replace": None}, "first_k_dense_replace"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_parameters.rope_type"),
    ({"model_type": "deepseek_v2"}, "model_type"),
]


@pytest.mark.parametrize("change,field", REFUSALS, ids=[f for _, f in REFUSALS])
def test_check_refuses_by_field(change, field):
    hc = {**DeepseekV3Config(**BASE).to_dict(), **change}
    with pytest.raises(UnsupportedConfigError) as err:
        deepseek_v3.to_moetrain(hc)
    assert err.value.field == field and str(err.value).startswith(f"config.json field {field} = ")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"router": {"score_func": "softmax"}}, "moe.router.score_func is 'softmax'"),
        ({"layers": [0, 2]}, "the MoE blocks is \\[0, 2\\]"),
        ({"layers": None, "every": 2}, "the MoE blocks is \\[1\\]"),
        ({"shared_expert_hidden": 8}, "moe.shared_expert_hidden is 8"),
    ],
)
def test_export_refuses_a_model_that_is_no_longer_deepseek(change, message):
    sections = deepseek_v3.to_moetrain(DeepseekV3Config(**BASE).to_dict())
    moe = {**sections["moe"], **change, "router": {**sections["moe"]["router"], **change.get("router", {})}}
    with pytest.raises(UnsupportedConfigError, match=message):
        deepseek_v3.to_hf_config({}, sections["model"], moe)


def test_export_of_a_moetrain_native_model_with_every_block_moe():
    """moe.layers unset (every block routed) and widths left to their defaults: a valid DeepSeek-V3."""
    sections = deepseek_v3.to_moetrain(DeepseekV3Config(**BASE).to_dict())
    moe = {**sections["moe"], "layers": None, "expert_hidden": None, "shared_expert_hidden": None}
    out = deepseek_v3.to_hf_config({}, sections["model"], moe)
    assert out["first_k_dense_replace"] == 0 and out["moe_intermediate_size"] == BASE["intermediate_size"]
    back = deepseek_v3.to_moetrain(DeepseekV3Config(**out).to_dict())
    assert back["model"] == sections["model"] and back["moe"]["layers"] == [0, 1, 2]


def test_rules_cover_every_moetrain_tensor():
    hf, hc = hf_model("dense1-shared1-yarn")
    sections = deepseek_v3.to_moetrain(hc)
    model = moetrain_model(sections, deepseek_v3.rules(hc, set(hf.state_dict())), dict_reader(hf.state_dict()))
    covered = {r.target for r in deepseek_v3.rules(hc)}
    persistent = set(model.state_dict())
    assert persistent - covered == set()  # parameters and the router's bias bits; no steps (rate 0)
    experts = [r for r in deepseek_v3.rules(hc) if r.expert is not None]
    assert {(r.target, r.expert) for r in experts} == {
        (f"layers.{i}.ffn.experts.{w}", e) for i in (1, 2) for w in ("w1_SLDF", "w2_SLFD", "w3_SLDF") for e in range(8)
    }
