"""RMSNorm (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + eps) * weight."""

from __future__ import annotations

import torch
from torch import nn

from lmserve.model.layers.utils import make_param


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = make_param(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., hidden_size]
        # NOTE: op order follows HF transformers exactly (normalise in float32, cast back to the
        # input dtype, then scale) so that float32 and bf16 outputs match the reference bit for bit.
        input_dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)  # [..., 1]
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
