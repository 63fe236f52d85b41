"""lmserve reads Llama/Mistral/Qwen2/Qwen3 config.json files itself (no transformers import at
start-up). Each config here is read both ways; everything lmserve's model code and engine take
from a config must agree with transformers' AutoConfig, including the values a file leaves to
the config class's defaults."""

from __future__ import annotations

import json

import pytest
import torch

from lmserve.config import ModelConfig
from lmserve.hf_config import PlainHFConfig, read_plain_config
from lmserve.model.layers.rotary import get_rope_parameters
from lmserve.model.models.llama import get_head_dim, get_num_kv_heads
from lmserve.model.models.qwen2 import check_no_sliding_window
from tests.tiny_models import make_tiny_model

BASE = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "hidden_act": "silu"}  # fmt: skip

CONFIGS = {
    # as the Hub's files spell them (sizes shrunk), with and without optional keys
    "llama3": {
        **BASE,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rope_theta": 500000.0,
        "torch_dtype": "bfloat16",
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "tie_word_embeddings": False,
    },
    "llama31-rope-scaling": {
        **BASE,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
            "rope_type": "llama3",
        },
        "torch_dtype": "bfloat16",
        "eos_token_id": [128001, 128008],
    },
    "llama-linear-rope": {
        **BASE,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rope_scaling": {"type": "linear", "factor": 2.0},
    },
    "llama-minimal": {**BASE, "architectures": ["LlamaForCausalLM"], "model_type": "llama"},
    "smollm2-tied": {
        **BASE,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "tie_word_embeddings": True,
        "rope_theta": 100000,
        "head_dim": 16,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "mistral-v01": {
        **BASE,
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "sliding_window": 4096,
        "rope_theta": 10000.0,
    },
    "mistral-v02": {
        **BASE,
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "sliding_window": None,
        "rope_theta": 1000000.0,
    },
    "mistral-minimal": {**BASE, "architectures": ["MistralForCausalLM"], "model_type": "mistral"},
    "qwen25": {
        **BASE,
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "sliding_window": 256,
        "use_sliding_window": False,
        "max_window_layers": 1,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
        "torch_dtype": "bfloat16",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "qwen2-window-off": {
        **BASE,
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "sliding_window": 32,
        "use_sliding_window": False,
    },
    "qwen2-window-on": {
        **BASE,
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "sliding_window": 32,
        "use_sliding_window": True,
        "max_window_layers": 1,
    },
    "qwen3": {
        **BASE,
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "head_dim": 32,
        "attention_bias": False,
        "rope_theta": 1000000,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": True,
    },
    "qwen3-minimal": {**BASE, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"},
}


def engine_view(config) -> dict:
    """What lmserve takes from a config, read the way its code reads it."""
    try:
        check_no_sliding_window("m", config)
        window = "ok"
    except NotImplementedError:
        window = "refused"
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return {
        "architectures": list(config.architectures),
        **{k: getattr(config, k) for k in BASE if k != "num_key_value_heads"},
        "head_dim": get_head_dim(config),
        "num_kv_heads": get_num_kv_heads(config),
        "rope": get_rope_parameters(config),
        "tie": bool(getattr(config, "tie_word_embeddings", False)),
        "attention_bias": bool(getattr(config, "attention_bias", False)),
        "mlp_bias": bool(getattr(config, "mlp_bias", False)),
        "sliding_window": getattr(config, "sliding_window", None),
        "qwen_window": window,
        "eos": getattr(config, "eos_token_id", None),
        "bos": getattr(config, "bos_token_id", None),
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
    }


def write(tmp_path, values: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps(values))
    return str(tmp_path)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_plain_reader_agrees_with_autoconfig_on_everything_lmserve_reads(name, tmp_path):
    from transformers import AutoConfig

    folder = write(tmp_path, CONFIGS[name])
    plain = read_plain_config(folder)
    assert isinstance(plain, PlainHFConfig), "this config should not need transformers"
    assert engine_view(plain) == engine_view(AutoConfig.from_pretrained(folder))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_a_saved_tiny_model_reads_the_same_both_ways(arch, tmp_path):
    from transformers import AutoConfig

    folder = make_tiny_model(tmp_path / arch, arch)
    plain = read_plain_config(folder)
    assert plain is not None
    assert engine_view(plain) == engine_view(AutoConfig.from_pretrained(folder))


@pytest.mark.parametrize(
    "change",
    [
        {"num_key_value_heads": None},  # left to the class default: transformers decides
        {"model_type": "gemma"},  # a type the reader does not cover
        {"quantization_config": {"quant_method": "gptq"}},
        {"auto_map": {"AutoConfig": "custom.Config"}},
        {"layer_types": ["full_attention", "sliding_attention"]},
        {"layer_types": 4},  # malformed: no TypeError here, transformers explains it
        {"layer_types": "full_attention"},
        {"num_attention_heads": 0},  # nonsense sizes: transformers' checks explain them
        {"hidden_size": "64"},
    ],
)
def test_configs_the_reader_does_not_cover_go_to_transformers(change, tmp_path):
    values = {**CONFIGS["llama3"], **change}
    values = {k: v for k, v in values.items() if v is not None}
    assert read_plain_config(write(tmp_path, values)) is None


def test_model_config_builds_without_importing_transformers(tmp_path):
    import subprocess
    import sys

    folder = write(tmp_path, CONFIGS["llama3"])
    code = (
        "import sys; from lmserve.config import ModelConfig; "
        f"c = ModelConfig({folder!r}, load_format='dummy'); "
        "assert 'transformers' not in sys.modules, 'transformers was imported'; "
        "print(c.dtype, c.max_model_len)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch.bfloat16", "256"]


def test_the_environment_can_force_autoconfig(tmp_path, monkeypatch):
    folder = write(tmp_path, CONFIGS["llama3"])
    monkeypatch.setenv("LMSERVE_HF_CONFIG_READER", "transformers")
    config = ModelConfig(folder, load_format="dummy")
    assert not isinstance(config.hf_config, PlainHFConfig)
    assert config.dtype == torch.bfloat16


def test_an_unknown_reader_setting_is_a_clear_error(tmp_path, monkeypatch):
    from lmserve.config import ConfigError

    folder = write(tmp_path, CONFIGS["llama3"])
    monkeypatch.setenv("LMSERVE_HF_CONFIG_READER", "transfomers")
    with pytest.raises(ConfigError, match="LMSERVE_HF_CONFIG_READER='transfomers'"):
        ModelConfig(folder, load_format="dummy")
