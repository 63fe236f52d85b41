"""Rotary tables: inverse frequencies equal HF's bit for bit, and rope settings are read from
both the transformers-5 `rope_parameters` and the older `rope_theta` + `rope_scaling` configs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lmserve.model.layers.rotary import (
    apply_rope_tables,
    compute_inv_freq,
    get_rope_parameters,
    rope_tables,
    rotate_half,
)
from tests.tiny_models import tiny_hf_config

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        LLAMA3_ROPE,
    ],
    ids=["default", "linear", "llama3"],
)
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_inv_freq_equals_hf_rope_init(rope_parameters, head_dim):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = tiny_hf_config("llama", head_dim=head_dim, rope_parameters=dict(rope_parameters))
    rope_type = rope_parameters["rope_type"]
    if rope_type == "default":
        expected, expected_scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        expected, expected_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    inv_freq, scaling = compute_inv_freq(head_dim, get_rope_parameters(config))
    assert inv_freq.dtype == torch.float32
    assert torch.equal(inv_freq, expected)
    assert scaling == expected_scaling


def test_legacy_rope_theta_and_rope_scaling_config_is_read():
    legacy = SimpleNamespace(
        rope_theta=250000.0,
        rope_scaling={"type": "linear", "factor": 2.0},
        max_position_embeddings=4096,
    )
    params = get_rope_parameters(legacy)
    assert params["rope_type"] == "linear"
    assert params["rope_theta"] == 250000.0
    assert params["factor"] == 2.0
    modern = {"rope_type": "linear", "rope_theta": 250000.0, "factor": 2.0}
    assert torch.equal(compute_inv_freq(64, params)[0], compute_inv_freq(64, modern)[0])


def test_legacy_llama3_config_defaults_original_max_positions():
    legacy = SimpleNamespace(
        rope_theta=500000.0,
        rope_scaling={
            k: v for k, v in LLAMA3_ROPE.items() if k != "original_max_position_embeddings"
        },
        max_position_embeddings=64,
    )
    assert get_rope_parameters(legacy)["original_max_position_embeddings"] == 64


def test_config_without_rope_settings_uses_default_theta():
    params = get_rope_parameters(SimpleNamespace(max_position_embeddings=128))
    assert params == {"rope_type": "default", "rope_theta": 10000.0}


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_unsupported_rope_type_error_names_the_type(rope_type):
    with pytest.raises(NotImplementedError, match=rope_type):
        compute_inv_freq(64, {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_tables_give_hf_rotary_bit_for_bit(dtype):
    """x * cos + roll(x) * signed sin (one roll, tables made once per forward) equals HF's
    x * cos + rotate_half(x) * sin exactly, not just closely."""
    torch.manual_seed(0)
    x = torch.randn(7, 4, 64, dtype=dtype)  # [tokens, heads, head_dim]
    angles = torch.randn(7, 32)
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype)  # [tokens, head_dim]
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(dtype)
    expected = x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]
    assert torch.equal(apply_rope_tables(x, *rope_tables(cos, sin)), expected)
