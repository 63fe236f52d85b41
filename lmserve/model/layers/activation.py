"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.model.layers.fused_ops import silu_and_mul, use_fused


class SiluAndMul(nn.Module):
    """SwiGLU's gate (Shazeer, 2020): silu(gate) * up, for the output of a fused [gate | up]
    projection."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:  # [..., 2 * d] -> [..., d]
        if use_fused(gate_up) and gate_up.dim() == 2:
            return silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def get_gated_activation(hidden_act: str) -> nn.Module:
    if hidden_act != "silu":
        raise NotImplementedError(f"hidden_act {hidden_act!r} is not supported (supported: silu)")
    return SiluAndMul()
