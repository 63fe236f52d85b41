"""Llama (Touvron et al., 2023) — also serves Llama 2/3, Mistral and SmolLM checkpoints.

    x = embed(input_ids)
    for each layer:
        x = x + o_proj(attention(rope(q), rope(k), v))   with q, k, v = qkv_proj(rms_norm(x))
                                                         (the attention backend applies rope)
        x = x + down_proj(silu(gate) * up)               with gate, up = gate_up_proj(rms_norm(x))
    logits = lm_head(rms_norm(x))

All requests of a step travel as one flat sequence of tokens (`num_tokens` rows); only the
attention backend knows where one request ends and the next begins.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lmserve.attention.backend import ForwardContext
from lmserve.model.layers.activation import SiluAndMul, get_gated_activation
from lmserve.model.layers.embedding import LMHead, VocabEmbedding
from lmserve.model.layers.gemv import gemv_silu_and_mul, use_gemv
from lmserve.model.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from lmserve.model.layers.norm import RMSNorm
from lmserve.model.layers.rotary import RotaryEmbedding, get_rope_parameters


def get_head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads
    )


def get_num_kv_heads(hf_config) -> int:
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias)
        self.act_fn = get_gated_activation(hidden_act)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden_size]
        proj = self.gate_up_proj
        if isinstance(self.act_fn, SiluAndMul) and use_gemv(x, proj.weight):
            # Few rows on CUDA: projection and activation in one kernel.
            h = gemv_silu_and_mul(x, proj.weight, proj.bias)  # [num_tokens, intermediate]
            return self.down_proj(h)
        return self.down_proj(self.act_fn(proj(x)))  # via [num_tokens, 2 * intermediate]


class LlamaAttention(nn.Module):
    """Grouped-query attention (num_kv_heads <= num_heads) over the paged KV cache of layer
    `layer_idx`; the backend in `ctx` writes this step's k/v into the cache and attends."""

    def __init__(self, hf_config, layer_idx: int, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = get_head_dim(hf_config)
        self.scale = self.head_dim**-0.5
        total_heads = hf_config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(
            hf_config.hidden_size,
            self.head_dim,
            total_heads,
            get_num_kv_heads(hf_config),
            qkv_bias,
        )
        # This rank's heads (all of them without tensor parallelism).
        self.num_heads = self.qkv_proj.num_heads_per_partition
        self.num_kv_heads = self.qkv_proj.num_kv_heads_per_partition
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, hf_config.hidden_size, o_bias)

    def project_qkv(
        self, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_tokens = hidden_states.shape[0]
        qkv = self.qkv_proj(hidden_states)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [num_tokens, kv_heads, head_dim]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [num_tokens, kv_heads, head_dim]
        return q, k, v

    def forward(
        self,
        hidden_states: torch.Tensor,  # [num_tokens, hidden_size]
        cos: torch.Tensor,  # [num_tokens, head_dim]
        sin: torch.Tensor,  # [num_tokens, head_dim]
        ctx: ForwardContext,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        q, k, v = self.project_qkv(hidden_states)
        return self.attend(q, k, v, cos, sin, ctx)

    def attend(self, q, k, v, cos, sin, ctx: ForwardContext) -> torch.Tensor:
        """Rotary on q and k, attention, o_proj. The backend applies the rotary embedding, so it
        can fuse it into its KV-cache write."""
        kv_cache = ctx.kv_caches[self.layer_idx]
        if ctx.kv_connector is not None:  # this layer's loaded KV must be in place first
            ctx.kv_connector.wait_for_layer_load(self.layer_idx)
        out = ctx.attn_backend.forward(
            q, k, v, kv_cache, ctx.attn_metadata, self.scale, rope=(cos, sin)
        )  # [num_tokens, num_heads, head_dim]
        if ctx.kv_connector is not None:  # the cache now holds this layer's new KV
            ctx.kv_connector.save_kv_layer(self.layer_idx)
        return self.o_proj(out.reshape(out.shape[0], self.q_size))  # [num_tokens, hidden_size]


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then the gated MLP."""

    def __init__(self, hf_config, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.mlp = mlp

    def forward(
        self,
        hidden_states: torch.Tensor,  # [num_tokens, hidden_size]: the previous block's output
        residual: torch.Tensor | None,  # [num_tokens, hidden_size]; None in the first layer
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual adds happen inside the norms (`norm(x, residual)` adds, then
        normalises): returns (this block's MLP output, the residual stream before it)."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(hidden_states, cos, sin, ctx)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(self, hf_config, layers: list[LlamaDecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        self.rotary_emb = RotaryEmbedding(get_head_dim(hf_config), get_rope_parameters(hf_config))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(
        self, input_ids, positions, ctx: ForwardContext, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`inputs_embeds` [num_tokens, hidden_size]: given instead of embedding `input_ids`
        (a vision-language model's prompt, image embeddings in place)."""
        if inputs_embeds is None:
            hidden_states = self.embed_tokens(input_ids)  # [num_tokens, hidden_size]
        else:
            hidden_states = inputs_embeds
        cos, sin = self.rotary_emb(positions, hidden_states.dtype)  # [num_tokens, head_dim] each
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, cos, sin, ctx)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


# How HF checkpoint names map onto the fused parameters: (fused name, HF name, shard id).
STACKED_PARAMS = [
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
]


class LlamaForCausalLM(nn.Module):
    def __init__(self, hf_config) -> None:
        super().__init__()
        self.config = hf_config
        self.check_config(hf_config)
        layers = [self.make_layer(hf_config, i) for i in range(hf_config.num_hidden_layers)]
        self.model = LlamaModel(hf_config, layers)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        tied_to = self.model.embed_tokens if self.tie_word_embeddings else None
        self.lm_head = LMHead(hf_config.vocab_size, hf_config.hidden_size, tied_to=tied_to)

    @classmethod
    def check_config(cls, hf_config) -> None:
        """Refuse configs whose features this implementation lacks, rather than run them wrong."""
        # A window at least as long as the longest sequence never masks anything.
        sliding_window = getattr(hf_config, "sliding_window", None)
        if sliding_window is not None and sliding_window < hf_config.max_position_embeddings:
            raise NotImplementedError(
                f"{cls.__name__}: sliding-window attention (sliding_window="
                f"{hf_config.sliding_window}) is not supported"
            )

    @classmethod
    def make_layer(cls, hf_config, layer_idx: int) -> LlamaDecoderLayer:
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        self_attn = LlamaAttention(
            hf_config, layer_idx, qkv_bias=attention_bias, o_bias=attention_bias
        )
        mlp = LlamaMLP(
            hf_config.hidden_size,
            hf_config.intermediate_size,
            hf_config.hidden_act,
            bias=bool(getattr(hf_config, "mlp_bias", False)),
        )
        return LlamaDecoderLayer(hf_config, self_attn, mlp)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64, all requests concatenated
        positions: torch.Tensor,  # [num_tokens] int64
        ctx: ForwardContext,
        inputs_embeds: torch.Tensor | None = None,  # [num_tokens, hidden_size]
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        return self.model(input_ids, positions, ctx, inputs_embeds)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)  # [num_tokens] -> [num_tokens, hidden_size]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states).float()  # [n, hidden_size] -> [n, vocab_size] float32

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors into the parameters; returns the names of parameters
        fully loaded (a fused parameter counts once all its shards arrived). Raises on a
        checkpoint tensor that matches no parameter."""
        params = dict(self.named_parameters())
        shards_loaded: dict[str, set] = {}
        unexpected: list[str] = []
        for name, loaded_weight in weights:
            if self.skip_checkpoint_tensor(name):
                continue
            param_name, shard_id = _to_param_name(name)
            param = params.get(param_name)
            if param is None:
                unexpected.append(name)
                continue
            try:
                param.weight_loader(param, loaded_weight, shard_id)
            except ValueError as e:
                into = "" if param_name == name else f" into {param_name!r}"
                raise ValueError(f"loading checkpoint tensor {name!r}{into}: {e}") from e
            shards_loaded.setdefault(param_name, set()).add(shard_id)
        if unexpected:
            raise ValueError(
                f"checkpoint tensors match no parameter of {type(self).__name__}: {unexpected}"
            )
        return {
            name
            for name, shards in shards_loaded.items()
            if shards >= set(getattr(params[name], "shard_ids", (None,)))
        }

    def skip_checkpoint_tensor(self, name: str) -> bool:
        # Some old checkpoints store the rotary table; a tied head duplicates the embedding.
        if "rotary_emb.inv_freq" in name:
            return True
        return self.tie_word_embeddings and name == "lm_head.weight"


def _to_param_name(checkpoint_name: str) -> tuple[str, str | int | None]:
    for fused, hf_name, shard_id in STACKED_PARAMS:
        if f".{hf_name}." in checkpoint_name:
            return checkpoint_name.replace(f".{hf_name}.", f".{fused}."), shard_id
    return checkpoint_name, None
