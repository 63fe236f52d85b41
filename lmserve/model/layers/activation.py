"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """SwiGLU's gate (Shazeer, 2020): silu(gate) * up, for the output of a fused [gate | up]
    projection."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:  # [..., 2 * d] -> [..., d]
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def get_gated_activation(hidden_act: str) -> nn.Module:
    if hidden_act != "silu":
        raise NotImplementedError(f"hidden_act {hidden_act!r} is not supported (supported: silu)")
    return SiluAndMul()
