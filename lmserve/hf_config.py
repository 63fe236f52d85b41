"""A transformers config as plain attributes, and the language model's part of one. No
imports beyond the standard library: the EngineCore process reads configs without transformers,
and both `lmserve.config` and the model code use these."""

from __future__ import annotations

import json
import os
from typing import Any


class PlainHFConfig:
    """The attributes of a transformers PretrainedConfig, without transformers."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def get_text_config(self, *args: Any, **kwargs: Any) -> PlainHFConfig:
        return text_config_of(self)


def text_config_of(hf_config: Any) -> Any:
    """The language model's part of a config: `text_config` of a vision-language model (as
    an attribute view when it is a plain dict), else the config itself."""
    text = getattr(hf_config, "text_config", None)
    if text is None:
        return hf_config
    return PlainHFConfig(text) if isinstance(text, dict) else text


# ---- reading config.json without transformers --------------------------------------------------
# `from transformers import AutoConfig` costs 1-3 s on a workstation and 8.4 s on the GPU machine
# (transformers pulls in torchvision and torch._dynamo there), and `lmserve serve` used to pay it
# before the EngineCore could start. For the text models lmserve runs, the config is read here
# when config.json states every size; transformers then loads only with the tokenizer, in a
# thread, while the EngineCore starts. What the file leaves out takes the transformers config
# class's default; tests/model/test_plain_config.py checks the result against AutoConfig.
_REQUIRED = (
    "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
    "hidden_act",
)  # fmt: skip
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
              "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"tie_word_embeddings": False, "sliding_window": 4096, "bos_token_id": 1,
                "eos_token_id": 2},
    "qwen2": {"tie_word_embeddings": False, "use_sliding_window": False},
    "qwen3": {"tie_word_embeddings": False, "use_sliding_window": False,
              "attention_bias": False, "head_dim": 128},
}  # fmt: skip
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "max_position_embeddings")  # fmt: skip


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# Anything that needs transformers' own handling: remote code, quantized checkpoints, a vision
# tower. (Per-layer attention patterns too, unless every layer is full attention.)
_NEEDS_TRANSFORMERS = ("auto_map", "quantization_config", "text_config")


def read_plain_config(folder: str) -> PlainHFConfig | None:
    """The config of model `folder` as plain attributes, read from its config.json without
    transformers; None when the file is not one this reader covers (then use AutoConfig)."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, ValueError):
        return None
    defaults = _DEFAULTS.get(values.get("model_type")) if isinstance(values, dict) else None
    if defaults is None or any(k not in values for k in _REQUIRED):
        return None
    if not all(_positive_int(values[k]) for k in _SIZES):
        return None  # transformers' own checks say what is wrong with the file
    if any(k in values for k in _NEEDS_TRANSFORMERS):
        return None
    layer_types = values.get("layer_types") or []
    if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
        return None  # sliding layers, or a malformed list: transformers decides
    values = {**defaults, **values}
    if values["model_type"] in ("qwen2", "qwen3") and not values["use_sliding_window"]:
        values["sliding_window"] = None  # as Qwen2Config/Qwen3Config do
    if "dtype" not in values and "torch_dtype" in values:
        values["dtype"] = values.pop("torch_dtype")  # transformers >= 5 spells it `dtype`
    if values.get("head_dim") is None:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    return PlainHFConfig(values)
