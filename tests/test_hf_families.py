"""Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE: moetrain computes what transformers computes.

For each family and its config variants (tests/hf_tiny.py), a tiny random model built with
transformers' own classes (5.24) is converted through the family's rules into a moetrain
``MoETransformer`` (fp32), and:

- the logits equal transformers' within 1e-5 (max abs) on random token batches, and a wrong mapping
  (swapped gate/up, a dropped clamp or gate, renormalisation flipped) moves them by far more;
- moetrain's KV-cache greedy decode gives the tokens of transformers' ``generate(do_sample=False)``;
- the same through the files: ``save_pretrained`` (one tensor per expert, the Hub's layout), the fused
  layout (``save_original_format=False``) read by slice, and the Hub layout built by hand;
- every rule converts back bit for bit, every Hugging Face tensor element is read by exactly one rule
  and every moetrain parameter element written by exactly one;
- export: ``to_hf_config`` + the per-expert tensors load into the same transformers class with no
  missing or unexpected keys and exactly the source model's weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import VARIANTS, converted, hf_model, max_logit_difference, moetrain_model, tokens
from safetensors import safe_open
from safetensors.torch import save_file

from moetrain.hf.convert import hf_tensors, load_into, moetrain_value, safetensors_reader, sources_of, state_dict_reader
from moetrain.hf.families import family_for
from moetrain.inference.generate import Sampling, generate

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)

EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}  # others: gate_proj, up_proj, down_proj


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers(variant):
    hf = hf_model(variant)
    assert max_logit_difference(hf, converted(hf)) <= 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_greedy_decode_equals_transformers_generate(variant):
    hf = hf_model(variant)
    ours = converted(hf)
    prompt = tokens(seed=5, batch=1, length=6)
    new = 14
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new,
                         min_new_tokens=new, pad_token_id=0)[0, prompt.shape[1]:].tolist()  # fmt: skip
    mine = generate(
        ours, prompt[0].tolist(), Sampling(max_new_tokens=new, temperature=0.0, stop_at_eos=False), eos_id=2
    )
    assert mine == theirs and len(set(mine)) > 2  # a real sequence, not one token repeated


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe-mlp_only", "qwen2_moe-renorm-sparse_step2-window"])
def test_the_router_picks_and_weighs_as_transformers(variant):
    """Over 4096 tokens (4 or 8 experts, top 2): the same experts in the same order and the same weights,
    softmax over all experts in fp32, renormalised for Mixtral always and for Qwen2-MoE with norm_topk_prob."""
    hf = hf_model(variant)
    ours = converted(hf)
    block = next(i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts"))
    x_TD = torch.randn(4096, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, weights_TK, ids_TK = hf.model.layers[block].mlp.gate(x_TD)
        decision = ours.layers[block].ffn.router(x_TD, torch.zeros(4096, dtype=torch.long))
    assert torch.equal(decision.expert_ids_TK, ids_TK)
    torch.testing.assert_close(decision.gates_TK, weights_TK.float(), rtol=0, atol=1e-7)
    renormalised = torch.allclose(weights_TK.sum(-1), torch.ones(4096))
    assert renormalised == (variant != "qwen2_moe-mlp_only")


@pytest.mark.parametrize(
    "variant, wrong",
    [
        ("qwen2_moe-mlp_only", "w1_w3_swapped"),
        ("qwen2_moe-mlp_only", "shared_gate_zeroed"),
        ("qwen3_moe-head_dim-renorm-mlp_only", "renormalize_flipped"),
        ("olmoe-gqa-bias-clip-renorm", "clip_dropped"),
        ("qwen3_moe-head_dim-renorm-mlp_only", "q_norm_ones"),
    ],
)
def test_the_comparison_sees_a_wrong_mapping(variant, wrong):
    hf = hf_model(variant)
    ours = converted(hf)
    layer = next(m for m in ours.moe_layers())
    with torch.no_grad():
        if wrong == "w1_w3_swapped":
            layer.experts.w1_SLDF.data, layer.experts.w3_SLDF.data = (
                layer.experts.w3_SLDF.data,
                layer.experts.w1_SLDF.data,
            )
        elif wrong == "shared_gate_zeroed":  # sigmoid(0) = 1/2 instead of the gate
            layer.shared.w_gate_D1.zero_()
        elif wrong == "renormalize_flipped":
            for m in ours.moe_layers():
                m.router.cfg = m.router.cfg.model_copy(update={"renormalize": False})
        elif wrong == "clip_dropped":
            for block in ours.layers:
                block.attn.clip_qkv = None
        else:
            ours.layers[0].attn.q_norm.weight.fill_(1.0)
    assert max_logit_difference(hf, ours) > 1e-3


def per_expert_by_hand(hf: transformers.PreTrainedModel) -> dict[str, torch.Tensor]:
    """The Hub's one-tensor-per-expert layout, built from the in-memory fused state dict."""
    model_type = hf.config.model_type
    gate, up, down = EXPERT_NAMES.get(model_type, ("gate_proj", "up_proj", "down_proj"))
    out = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and hf.config.tie_word_embeddings:
            continue
        if model_type == "mixtral":
            name = name.replace(".mlp.", ".block_sparse_moe.")
        prefix = name.rpartition("experts.")[0]
        if name.endswith("experts.gate_up_proj"):
            width = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}experts.{e}.{gate}.weight"] = t[e, :width].clone()
                out[f"{prefix}experts.{e}.{up}.weight"] = t[e, width:].clone()
        elif name.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"{prefix}experts.{e}.{down}.weight"] = t[e].clone()
        else:
            out[name] = t.clone()
    return out


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("layout", ["save_pretrained", "fused", "by_hand"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_files_in_each_layout_convert_exactly(variant, layout, tmp_path):
    hf = hf_model(variant)
    if layout == "by_hand":
        save_file(per_expert_by_hand(hf), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
        (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
        hf.save_pretrained(tmp_path / "written")  # what transformers writes is exactly the Hub layout
        written, by_hand = saved_tensors(tmp_path / "written"), per_expert_by_hand(hf)
        assert written.keys() == by_hand.keys() and all(torch.equal(written[k], by_hand[k]) for k in written)
    else:
        hf.save_pretrained(tmp_path, save_original_format=layout == "save_pretrained")
    config = json.loads((tmp_path / "config.json").read_text())
    family = family_for(config["model_type"])
    ours = moetrain_model(config)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert any(n.endswith("experts.gate_up_proj") for n in names) == (layout == "fused")
        load_into(ours, family.rules(config, names), safetensors_reader(dict.fromkeys(names, f)))
    assert max_logit_difference(hf, ours) <= 1e-5


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rules_round_trip_bit_for_bit_and_cover_every_tensor_once(variant, layout):
    hf = hf_model(variant)
    config = hf.config.to_dict()
    tensors = hf.state_dict() if layout == "fused" else per_expert_by_hand(hf)
    if config["tie_word_embeddings"]:
        tensors.pop("lm_head.weight", None)  # the tied head: the embedding again, no rule of its own
    family, read = family_for(config["model_type"]), state_dict_reader(tensors)
    rules = family.rules(config, set(tensors))
    ours = moetrain_model(config)
    load_into(ours, rules, read)
    params = dict(ours.named_parameters())  # a tied lm_head.weight is the embedding: listed once
    read_count = {k: torch.zeros(t.shape, dtype=torch.int32) for k, t in tensors.items()}
    write_count = {k: torch.zeros(p.shape, dtype=torch.int32) for k, p in params.items()}
    for rule in rules:
        back = rule.to_hf(moetrain_value(params, rule))
        source = sources_of(rule, read)
        assert len(back) == len(source) and all(torch.equal(a, b) for a, b in zip(back, source)), rule
        for name in rule.sources:
            count = read_count[name] if rule.index is None else read_count[name][rule.index]
            (count if rule.rows is None else count[rule.rows[0] : rule.rows[1]]).add_(1)
        (write_count[rule.target] if rule.expert is None else write_count[rule.target][:, rule.expert]).add_(1)
    assert not [k for k, c in read_count.items() if not (c == 1).all()]
    assert not [k for k, c in write_count.items() if not (c == 1).all()]


@pytest.mark.parametrize("start", ["imported", "empty"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_loads_in_the_same_transformers_class_with_the_same_weights(variant, start, tmp_path):
    """``start``: ``to_hf_config`` from the imported config.json, or from none (a model moetrain trained
    from scratch): either way transformers builds the same model."""
    hf = hf_model(variant)
    config = hf.config.to_dict()
    family = family_for(config["model_type"])
    ours = converted(hf)
    s = family.to_moetrain(config)
    out_config = family.to_hf_config(config if start == "imported" else {}, s["model"], s["moe"])
    assert family.to_moetrain(out_config) == s
    tensors = hf_tensors(ours, family.rules(out_config))
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(out_config))
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    assert type(loaded).__name__ == family.ARCHITECTURE == out_config["architectures"][0]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    theirs, mine = loaded.state_dict(), hf.state_dict()
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in mine)
    assert max_logit_difference(loaded.eval(), ours) <= 1e-5
