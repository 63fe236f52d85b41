"""RMSNorm (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + eps) * weight.

With a residual stream, `norm(x, residual)` first adds (residual <- x + residual), then
normalises the sum: the pre-norm block's residual add and the next norm in one step (one fused
kernel on CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.model.layers.fused_ops import rms_norm, use_fused
from lmserve.model.layers.utils import make_param


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = make_param(hidden_size)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """[..., hidden_size] -> normalised x; with `residual`: (normalised x + residual, the
        sum as the new residual). On CUDA the residual tensor is updated in place."""
        if use_fused(x):
            return self._fused(x, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _fused(self, x: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps, residual=residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one kernel; bit-identical to the steps below in float32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # NOTE: op order follows HF transformers exactly (normalise in float32, cast back to the
        # input dtype, then scale) so that bf16 outputs match the reference bit for bit.
        input_dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)  # [..., 1]
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
