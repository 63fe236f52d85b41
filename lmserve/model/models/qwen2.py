"""Qwen2 / Qwen2.5 (Qwen team, 2024): Llama with a bias on the q/k/v projections (none on o_proj
or the MLP)."""

from __future__ import annotations

from lmserve.model.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
)


def check_no_sliding_window(model_name: str, hf_config) -> None:
    layer_types = getattr(hf_config, "layer_types", None) or []
    if getattr(hf_config, "use_sliding_window", False) or "sliding_attention" in layer_types:
        raise NotImplementedError(
            f"{model_name}: sliding-window attention (use_sliding_window=true) is not supported"
        )


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def check_config(cls, hf_config) -> None:
        check_no_sliding_window(cls.__name__, hf_config)

    @classmethod
    def make_layer(cls, hf_config, layer_idx: int) -> LlamaDecoderLayer:
        self_attn = LlamaAttention(hf_config, layer_idx, qkv_bias=True, o_bias=False)
        mlp = LlamaMLP(
            hf_config.hidden_size, hf_config.intermediate_size, hf_config.hidden_act, bias=False
        )
        return LlamaDecoderLayer(hf_config, self_attn, mlp)
