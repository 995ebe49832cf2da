"""The families' config mappings: defaults, refusals and the way back (no tensors here).

- A config.json that leaves fields out reads as transformers 5.24's config classes fill them in.
- ``check`` refuses every variant moetrain cannot compute exactly, naming the field.
- ``to_hf_config`` refuses a moetrain model that is not (or no longer) the family, naming the field.
- ``family_for`` picks a family by ``model_type`` and names the supported ones otherwise.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
from hf_tiny import CLASSES, VARIANTS, hf_model

from moetrain.hf.families import FAMILIES, deepseek_v3, family_for, mixtral, olmoe, qwen2_moe, qwen3_moe
from moetrain.hf.families.base import UnsupportedConfigError

transformers = pytest.importorskip("transformers")
CONFIG_CLASSES = {**{t: classes[0] for t, classes in CLASSES.items()}, "deepseek_v3": transformers.DeepseekV3Config}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_the_defaults_are_those_of_the_transformers_config_class(model_type):
    family = family_for(model_type)
    config_cls = CONFIG_CLASSES[model_type]
    declared = {f.name: f.default for f in dataclasses.fields(config_cls)}
    aliases = getattr(family, "ALIASES", {})
    for name, value in family.DEFAULTS.items():
        field = name if name in declared else next(a for a, n in aliases.items() if n == name)
        assert declared[field] == value, name
    assert getattr(config_cls, "default_theta", 10000.0) == family.DEFAULT_THETA
    # and a config.json with every field left out maps as the class's full config does
    assert family.to_moetrain({"model_type": model_type}) == family.to_moetrain(config_cls().to_dict())


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_family_reads_rotary_positions_as_its_transformers_class(model_type):
    """One reader for every family (rope.rope_fields): where each transformers version writes the base and
    the scaling, the class's default theta (Mixtral's 1e6) when none is given, and rope_scaling winning over
    rope_parameters when a file has both (transformers 5.24 takes ``rope_scaling or rope_parameters``)."""
    family, config_cls = family_for(model_type), CONFIG_CLASSES[model_type]
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    forms = [
        {},
        {"rope_theta": 5.0, "rope_scaling": None},  # transformers 4
        {"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}, "rope_theta": 5.0},
        {"rope_scaling": {"type": "default"}, "rope_theta": 5.0},
        {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 5.0},
        {"rope_parameters": {**yarn, "rope_theta": 9.0}},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}, "rope_scaling": yarn, "rope_theta": 3.0},
    ]
    for form in forms:
        raw = {"model_type": model_type, "max_position_embeddings": 64, **form}
        ours = family.to_moetrain(raw)["model"]
        theirs = config_cls(**{k: v for k, v in raw.items() if k != "model_type"}).rope_parameters
        assert ours["rope_theta"] == theirs["rope_theta"], form
        assert (ours["rope_scaling"] or {"kind": "default"})["kind"] == theirs["rope_type"], form
        if theirs["rope_type"] != "default":
            assert ours["rope_scaling"]["factor"] == theirs["factor"], form


def test_an_expert_count_given_under_both_names_must_agree():
    config = hf_model("qwen3_moe-bias-sparse_step2").config.to_dict()
    n = config["num_local_experts"]
    assert qwen3_moe.to_moetrain({**config, "num_experts": n})["moe"]["num_experts"] == n
    renamed = {k: v for k, v in config.items() if k != "num_local_experts"} | {"num_experts": n}  # the Hub's name
    assert qwen3_moe.to_moetrain(renamed)["moe"]["num_experts"] == n
    with pytest.raises(UnsupportedConfigError, match="num_experts"):
        qwen3_moe.check({**config, "num_experts": n + 1})


REFUSED = [  # (variant, config.json fields changed, the field named)
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act"),
    ("mixtral", {"router_jitter_noise": 0.01}, "router_jitter_noise"),
    ("mixtral", {"sliding_window": 16}, "sliding_window"),
    ("mixtral", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_parameters.rope_type"),
    ("mixtral", {"rope_scaling": {"type": "longrope", "factor": 4.0}}, "rope_scaling.rope_type"),
    ("mixtral", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("qwen3_moe-yarn", {"rope_parameters": {"rope_type": "linear"}}, "rope_parameters.factor"),
    ("mixtral", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ("mixtral", {"attention_dropout": 0.1}, "attention_dropout"),
    ("mixtral", {"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ("mixtral", {"num_key_value_heads": 3}, "num_key_value_heads"),
    ("mixtral", {"model_type": "qwen2_moe"}, "model_type"),
    ("mixtral", {"num_experts": 6}, "num_experts"),  # beside num_local_experts 4
    ("qwen2_moe-mlp_only", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2,
                            "layer_types": None}, "sliding_window"),  # layer_types null: computed, as transformers does
    ("qwen2_moe-mlp_only", {"layer_types": ["sliding_attention"] * 3}, "layer_types"),
    ("qwen2_moe-mlp_only", {"layer_types": ["chunked_attention"] * 3}, "layer_types"),
    ("qwen2_moe-mlp_only", {"mlp_only_layers": [0, 1, 2]}, "mlp_only_layers"),
    ("qwen2_moe-mlp_only", {"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ("qwen2_moe-mlp_only", {"head_dim": None}, "head_dim"),
    ("qwen2_moe-mlp_only", {"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size"),
    ("qwen2_moe-mlp_only", {"num_experts": 0}, "num_experts"),
    ("qwen3_moe-bias-sparse_step2", {"use_sliding_window": True, "sliding_window": 32}, "sliding_window"),
    ("qwen3_moe-bias-sparse_step2", {"hidden_act": "relu"}, "hidden_act"),
    ("qwen3_moe-bias-sparse_step2", {"head_dim": 7}, "head_dim"),
    ("olmoe", {"head_dim": 16}, "head_dim"),
    ("olmoe", {"hidden_size": 30}, "head_dim"),
    ("olmoe", {"sliding_window": 16}, "sliding_window"),
    ("olmoe", {"clip_qkv": -1.0}, "clip_qkv"),
    ("olmoe", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
]  # fmt: skip


@pytest.mark.parametrize("variant, change, field", REFUSED, ids=[f"{v}:{f}" for v, _, f in REFUSED])
def test_check_refuses_what_moetrain_cannot_compute_naming_the_field(variant, change, field):
    config = {**hf_model(variant).config.to_dict(), **change}
    family = family_for(VARIANTS[variant][0])
    for call in (family.check, family.to_moetrain, family.rules):
        with pytest.raises(UnsupportedConfigError) as err:
            call(config)
        assert err.value.field == field and str(err.value).startswith(f"config.json field {field} = ")


def test_windows_that_never_hide_a_key_are_accepted():
    """A window of at least max_position_embeddings (moetrain's max_seq_len) covers every position."""
    config = hf_model("mixtral").config.to_dict()
    mixtral.check({**config, "sliding_window": config["max_position_embeddings"]})
    qwen3 = hf_model("qwen3_moe-bias-sparse_step2").config.to_dict()
    qwen3_moe.check({**qwen3, "use_sliding_window": True, "sliding_window": qwen3["max_position_embeddings"]})
    qwen3_moe.check({**qwen3, "use_sliding_window": False, "sliding_window": 4})  # transformers ignores it


NOT_THE_FAMILY = [  # (variant, moetrain fields set (dotted paths), the field named)
    ("mixtral", {"model.qk_norm": "head"}, "model.qk_norm"),
    ("mixtral", {"moe.router.renormalize": False}, "moe.router.renormalize"),
    ("mixtral", {"moe.layers": [0, 2]}, "moe.layers"),
    ("mixtral", {"model.bias": True}, "model.bias"),
    ("mixtral", {"moe.router": {"kind": "hash"}}, "moe.router.kind"),
    ("qwen2_moe-mlp_only", {"moe.shared_expert_gate": False}, "moe.shared_expert_gate"),
    ("qwen2_moe-mlp_only", {"model.attn_out_bias": True}, "model.attn_out_bias"),
    ("qwen2_moe-mlp_only", {"moe.capacity_factor": 1.25}, "moe.capacity_factor"),
    ("qwen3_moe-bias-sparse_step2", {"model.qk_norm": "full"}, "model.qk_norm"),
    ("qwen3_moe-bias-sparse_step2", {"model.attn_out_bias": False}, "model.attn_out_bias"),
    ("qwen3_moe-bias-sparse_step2", {"moe.router.bias_update_rate": 0.001}, "moe.router.bias_update_rate"),
    ("olmoe", {"model.head_dim": 16}, "model.head_dim"),
    ("olmoe", {"moe.layers": [1]}, "moe.layers"),
    ("olmoe", {"moe": None}, "moe"),
]  # fmt: skip


@pytest.mark.parametrize("variant, change, field", NOT_THE_FAMILY, ids=[f"{v}:{f}" for v, _, f in NOT_THE_FAMILY])
def test_to_hf_config_refuses_a_model_that_is_not_the_family(variant, change, field):
    config = hf_model(variant).config.to_dict()
    family = family_for(config["model_type"])
    s = copy.deepcopy(family.to_moetrain(config))
    for path, value in change.items():
        *parents, last = path.split(".")
        holder = s
        for key in parents:
            holder = holder[key]
        holder[last] = value
    with pytest.raises(UnsupportedConfigError) as err:
        family.to_hf_config(config, s["model"], s["moe"])
    assert err.value.field == field and str(err.value).startswith(f"moetrain config field {field} = ")
    assert family.ARCHITECTURE in str(err.value)


def test_to_hf_config_writes_moetrains_changes_and_keeps_the_rest():
    config = hf_model("qwen2_moe-mlp_only").config.to_dict() | {"bos_token_id": 5, "custom_note": "kept"}
    s = qwen2_moe.to_moetrain(config)
    model = s["model"] | {"rope_theta": 500.0, "qkv_bias": False}
    moe = s["moe"] | {"layers": [0], "num_experts": 6, "shared_experts": 2, "router": s["moe"]["router"] | {"top_k": 3}}
    out = qwen2_moe.to_hf_config(config, model, moe)
    assert (out["bos_token_id"], out["custom_note"]) == (5, "kept")
    assert out["rope_parameters"] == {"rope_type": "default", "rope_theta": 500.0} and out["qkv_bias"] is False
    assert (out["mlp_only_layers"], out["decoder_sparse_step"], out["num_experts"], out["num_experts_per_tok"]) == (
        [1, 2], 1, 6, 3)  # fmt: skip
    assert out["shared_expert_intermediate_size"] == 2 * config["shared_expert_intermediate_size"]
    back = qwen2_moe.to_moetrain(out)
    assert back["model"]["rope_theta"] == 500.0 and back["moe"]["layers"] == [0]


def test_family_for_names_the_supported_model_types():
    assert {t: family_for(t) for t in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")} == {
        "mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "olmoe": olmoe,
        "deepseek_v3": deepseek_v3}  # fmt: skip
    for family in FAMILIES.values():
        assert getattr(transformers, family.ARCHITECTURE).config_class.model_type in family.MODEL_TYPES
    with pytest.raises(UnsupportedConfigError) as err:
        family_for("deepseek_v2")
    assert err.value.field == "model_type" and "deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe" in str(err.value)
