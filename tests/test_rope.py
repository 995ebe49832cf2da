"""Rotary scaling (``model.rope_scaling``) equals transformers' ``ROPE_INIT_FUNCTIONS`` bit for bit, and
``rope_fields`` reads every config form transformers reads, refusing what moetrain does not compute."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from moetrain.backbone.attention import Rotary  # noqa: E402
from moetrain.backbone.rope import rope_frequencies  # noqa: E402
from moetrain.config.model import ModelConfig  # noqa: E402
from moetrain.hf.families.base import UnsupportedConfigError  # noqa: E402
from moetrain.hf.families.rope import hf_rope_parameters, rope_fields  # noqa: E402

HEAD_DIM = 24  # 12 pairs: yarn's ramp runs over a range of dims, not all or none

PARAMETERS = {
    "linear": {"rope_type": "linear", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256},
    "yarn-deepseek": {
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "yarn-mscale-differs": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 512,
        "beta_fast": 16,
        "beta_slow": 2,
        "mscale": 0.707,
        "mscale_all_dim": 1.3,
        "truncate": False,
    },
    "yarn-attention-factor": {
        "rope_type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 1024,
        "attention_factor": 0.9,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    },
}


def hf_config(params: dict, theta: float = 50000.0) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=96,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=4096,
        rope_parameters={**params, "rope_theta": theta},
    )


@pytest.mark.parametrize("case", list(PARAMETERS))
def test_inverse_frequencies_and_attention_factor_equal_transformers(case):
    config = hf_config(PARAMETERS[case])
    inv_freq_hf, factor_hf = ROPE_INIT_FUNCTIONS[PARAMETERS[case]["rope_type"]](config, None)
    fields = rope_fields(config.to_dict())
    model = ModelConfig(arch="llama", d_model=96, n_heads=4, **fields)
    got = rope_frequencies(HEAD_DIM, model.rope_theta, model.rope_scaling)
    assert got.inv_freq.dtype == torch.float32
    assert torch.equal(got.inv_freq, inv_freq_hf), (got.inv_freq - inv_freq_hf).abs().max()
    assert got.attention_factor == factor_hf
    unscaled = rope_frequencies(HEAD_DIM, model.rope_theta)
    assert not torch.equal(got.inv_freq, unscaled.inv_freq)  # the scaling did change something


@pytest.mark.parametrize("case", ["yarn-deepseek", "llama3", "default"])
def test_cos_and_sin_equal_transformers_rotary_embedding(case):
    """The rotary module of a transformers model (cos/sin times the attention factor) vs moetrain's."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = PARAMETERS.get(case, {"rope_type": "default"})
    config = hf_config(params)
    positions = torch.arange(0, 3000, 7)
    x = torch.zeros(1, dtype=torch.float32)
    cos_hf, sin_hf = LlamaRotaryEmbedding(config)(x, positions[None])
    fields = rope_fields(config.to_dict())
    cos, sin = Rotary(HEAD_DIM, fields["rope_theta"], ModelConfig(arch="llama", **fields).rope_scaling)(positions)
    assert torch.equal(cos, cos_hf[0]) and torch.equal(sin, sin_hf[0])


def test_the_frequencies_stay_fp32_in_a_bf16_model():
    """Nothing rotary is a buffer or parameter: a bf16 cast leaves the frequencies as computed."""
    scaling = ModelConfig(arch="llama", rope_scaling={"kind": "linear", "factor": 2.0}).rope_scaling
    rotary = Rotary(16, 10000.0, scaling).to(torch.bfloat16)
    assert not list(rotary.buffers()) and not list(rotary.parameters())
    cos, _ = rotary(torch.arange(10))
    assert cos.dtype == torch.float32


@pytest.mark.parametrize(
    "config",
    [
        {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},  # transformers 4.x
        {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}},  # transformers 5
    ],
)
def test_old_and_new_config_forms_read_the_same(config):
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 64}
    assert rope_fields({**base, **config}) == {
        "rope_theta": 500000.0,
        "rope_scaling": {"kind": "linear", "factor": 2.0},
    }
    # transformers reads the old form into the same parameters
    hf = LlamaConfig(**{**base, **config})
    assert hf.rope_parameters["rope_type"] == "linear" and hf.rope_parameters["rope_theta"] == 500000.0


def test_defaults_follow_transformers():
    """No rope fields: theta 10000, no scaling. yarn without original_max_position_embeddings: transformers
    takes max_position_embeddings; a top-level original_max_position_embeddings wins."""
    assert rope_fields({"max_position_embeddings": 64}) == {"rope_theta": 10000.0, "rope_scaling": None}
    yarn = {"max_position_embeddings": 2048, "rope_scaling": {"type": "yarn", "factor": 4.0}}
    scaling = rope_fields(yarn)["rope_scaling"]
    assert scaling["original_max_position_embeddings"] == 2048 and scaling["beta_fast"] == 32.0
    scaling = rope_fields({**yarn, "original_max_position_embeddings": 512})["rope_scaling"]
    assert scaling["original_max_position_embeddings"] == 512


@pytest.mark.parametrize("case", list(PARAMETERS))
def test_export_writes_parameters_that_read_back_the_same(case):
    fields = rope_fields(hf_config(PARAMETERS[case]).to_dict())
    model = ModelConfig(arch="llama", **fields).model_dump()
    params = hf_rope_parameters(model)
    assert rope_fields({"rope_parameters": params, "max_position_embeddings": 4096}) == fields
    config = hf_config(params, theta=params["rope_theta"])  # transformers accepts it
    inv_freq_hf, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None)
    assert torch.equal(rope_frequencies(HEAD_DIM, fields["rope_theta"], model_scaling(fields)).inv_freq, inv_freq_hf)


def model_scaling(fields: dict):
    return ModelConfig(arch="llama", **fields).rope_scaling


@pytest.mark.parametrize(
    "params,field",
    [
        ({"rope_type": "dynamic", "factor": 2.0}, "rope_parameters.rope_type"),
        ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "rope_parameters.rope_type"),
        ({"rope_type": "mrope"}, "rope_parameters.rope_type"),
        ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "rope_parameters.partial_rotary_factor"),
        ({"rope_type": "linear", "factor": 2.0, "mscale_all_dim": 1.0}, "rope_parameters.mscale_all_dim"),
        ({"rope_type": "linear"}, "rope_parameters.factor"),
        ({"rope_type": "llama3", "factor": 8.0}, "rope_parameters.low_freq_factor"),
        (
            {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}},
            "rope_parameters",
        ),
    ],
)
def test_what_is_not_computed_exactly_is_refused_by_name(params, field):
    with pytest.raises(UnsupportedConfigError) as err:
        rope_fields({"rope_parameters": params, "max_position_embeddings": 64})
    assert err.value.field == field and f"config.json field {field} = " in str(err.value)


def test_dynamic_is_refused_with_the_reason():
    with pytest.raises(UnsupportedConfigError, match="longest sequence"):
        rope_fields({"rope_scaling": {"type": "dynamic", "factor": 2.0}})


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.rope_scaling scales rotary positions"):
        ModelConfig(arch="gpt2", rope_scaling={"kind": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="high_freq_factor"):
        ModelConfig(
            arch="llama",
            rope_scaling={
                "kind": "llama3",
                "factor": 8,
                "low_freq_factor": 1,
                "high_freq_factor": 1,
                "original_max_position_embeddings": 8,
            },
        )
