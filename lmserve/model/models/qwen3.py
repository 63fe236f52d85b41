"""Qwen3 (Qwen team, 2025): Llama plus QK-norm — an RMSNorm over head_dim applied to every
query and key head before rotary — with an explicit head_dim and no q/k/v bias by default."""

from __future__ import annotations

import torch

from lmserve.attention.backend import ForwardContext
from lmserve.model.layers.norm import RMSNorm
from lmserve.model.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP
from lmserve.model.models.qwen2 import Qwen2ForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, hf_config, layer_idx: int, bias: bool) -> None:
        super().__init__(hf_config, layer_idx, qkv_bias=bias, o_bias=bias)
        self.q_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [num_tokens, hidden_size]
        cos: torch.Tensor,  # [num_tokens, head_dim]
        sin: torch.Tensor,  # [num_tokens, head_dim]
        ctx: ForwardContext,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        q, k, v = self.project_qkv(hidden_states)
        q, k = self.q_norm(q), self.k_norm(k)  # per head, over head_dim
        return self.attend(q, k, v, cos, sin, ctx)  # rotary, attention, o_proj


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    @classmethod
    def make_layer(cls, hf_config, layer_idx: int) -> LlamaDecoderLayer:
        self_attn = Qwen3Attention(
            hf_config, layer_idx, bias=bool(getattr(hf_config, "attention_bias", False))
        )
        mlp = LlamaMLP(
            hf_config.hidden_size, hf_config.intermediate_size, hf_config.hidden_act, bias=False
        )
        return LlamaDecoderLayer(hf_config, self_attn, mlp)
