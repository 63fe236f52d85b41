"""Rotary position embedding (RoFormer, Su et al. 2021), "rotate half" layout as in HF Llama.

Pair (x[i], x[i + d/2]) of each head is rotated by angle position * inv_freq[i]:

    q' = q * cos + rotate_half(q) * sin,   rotate_half([x1 | x2]) = [-x2 | x1]
    cos = cos(cat(freqs, freqs)),          freqs[t, i] = position[t] * inv_freq[i]

`inv_freq` is computed in float32 with exactly the expressions HF uses for each rope type, so
the angles, and hence float32 outputs, match the reference.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lmserve.model.layers.fused_ops import rotary_inplace, use_fused

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def get_rope_parameters(hf_config) -> dict[str, Any]:
    """The rope settings of a config as one flat dict with at least `rope_type` and `rope_theta`.

    transformers >= 5 keeps them all in `config.rope_parameters`; older configs carry `rope_theta`
    at top level and an optional `rope_scaling` dict naming its type under `type` or `rope_type`.
    """
    params: dict[str, Any] = {}
    for attr in ("rope_scaling", "rope_parameters"):  # the newer field wins
        value = getattr(hf_config, attr, None)
        if isinstance(value, dict):
            params.update(value)
    if any(isinstance(v, dict) for v in params.values()):
        raise NotImplementedError("per-layer-type rope parameters are not supported")
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    params["rope_theta"] = (
        params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0
    )
    if params["rope_type"] == "llama3":
        params.setdefault("original_max_position_embeddings", hf_config.max_position_embeddings)
    return params


def compute_inv_freq(head_dim: int, rope_parameters: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] (float32, CPU) and the cos/sin scaling factor."""
    rope_type = rope_parameters["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial_rotary_factor != 1 is not supported")
    base = rope_parameters["rope_theta"]
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (base**exponents)  # [head_dim // 2] float32
    if rope_type == "linear":  # position interpolation: positions / factor
        inv_freq = inv_freq / rope_parameters["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope_parameters)
    return inv_freq, 1.0


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: wavelengths shorter than the high-frequency
    cutoff are kept, longer than the low-frequency cutoff are divided by `factor`, and the band
    between is interpolated smoothly."""
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Turns positions into (cos, sin) tables, computed once per forward and shared by all layers.

    NOTE: `inv_freq` is a float32 buffer; build the model under the target default dtype rather
    than calling `model.to(bfloat16)`, which would round it.
    """

    def __init__(self, head_dim: int, rope_parameters: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rope_type = rope_parameters["rope_type"]
        inv_freq, self.attention_scaling = compute_inv_freq(head_dim, rope_parameters)
        # Computed on the CPU (as HF does) and then moved, so every device gets the same values.
        device = torch.get_default_device()
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)  # [head_dim // 2]

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [num_tokens] -> 2 x [num_tokens, head_dim]
        freqs = positions[:, None].float() * self.inv_freq.float()  # [num_tokens, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [num_tokens, head_dim]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rope_type={self.rope_type}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_emb(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos: torch.Tensor,  # [num_tokens, head_dim]
    sin: torch.Tensor,  # [num_tokens, head_dim]
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_fused(query):  # one kernel, in place (query/key may be views into the qkv output)
        return rotary_inplace(query, key, cos, sin)
    cos, sin_signed = rope_tables(cos, sin)
    return apply_rope_tables(query, cos, sin_signed), apply_rope_tables(key, cos, sin_signed)


def rope_tables(
    cos: torch.Tensor,  # [num_tokens, head_dim]
    sin: torch.Tensor,  # [num_tokens, head_dim]
) -> tuple[torch.Tensor, torch.Tensor]:  # 2 x [num_tokens, 1, head_dim]
    """The tables `apply_rope_tables` takes (made once per forward, used by every layer): cos,
    and sin with its first half negated, both broadcast over heads."""
    half = sin.shape[-1] // 2
    sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    return cos[:, None, :], sin_signed[:, None, :]


def apply_rope_tables(
    x: torch.Tensor,  # [num_tokens, heads, head_dim]
    cos: torch.Tensor,  # [num_tokens, 1, head_dim]
    sin_signed: torch.Tensor,  # [num_tokens, 1, head_dim]
) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, as HF computes it and bit for bit the same: rolling x by
    half a head gives [x2, x1], and [x2, x1] * [-s1, s2] == [-x2, x1] * [s1, s2] exactly."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed
