"""Linear layers, named after the tensor-parallel role each will play.

For now every layer holds the full weight (tensor-parallel size 1). The names say how each will be
split across ranks, and each `weight_loader` is where that split will happen:

  ColumnParallelLinear        y = x W^T       W split by output rows; no communication
  MergedColumnParallelLinear  [gate | up]     several column layers fused into one GEMM
  QKVParallelLinear           [q | k | v]     the attention projections fused into one GEMM
  RowParallelLinear           y = x W^T       W split by input columns; all-reduce of y

A fused layer's parameter lists the checkpoint pieces it is built from in `param.shard_ids`, so a
model's `load_weights` can tell when every piece has arrived.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.model.layers.utils import default_weight_loader, make_param


class _Linear(nn.Module):
    """y = x W^T + b with W [output_size, input_size]."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = make_param(output_size, input_size, weight_loader=self.weight_loader)
        if bias:
            self.bias = make_param(output_size, weight_loader=self.weight_loader)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None):
        default_weight_loader(param, loaded_weight, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., input_size] -> [..., output_size]
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"


class ColumnParallelLinear(_Linear):
    """Output features will be split across ranks; each rank keeps its slice of y."""


class RowParallelLinear(_Linear):
    """Input features will be split across ranks; partial outputs will be all-reduced."""


class MergedColumnParallelLinear(_Linear):
    """Several column-parallel layers over the same input, stacked along the output dimension
    (e.g. the MLP's gate and up projections): one GEMM instead of several.

    Shard `i` of the checkpoint fills output rows [sum(output_sizes[:i]), sum(output_sizes[:i+1])).
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias)
        for param in self.parameters():
            param.shard_ids = tuple(range(len(output_sizes)))

    def _shard_offset_size(self, shard_id) -> tuple[int, int]:
        return sum(self.output_sizes[:shard_id]), self.output_sizes[shard_id]

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None):
        if shard_id is None:  # a checkpoint that already stores the fused tensor
            default_weight_loader(param, loaded_weight)
            return
        offset, size = self._shard_offset_size(shard_id)
        default_weight_loader(param.narrow(0, offset, size), loaded_weight)


class QKVParallelLinear(MergedColumnParallelLinear):
    """The query, key and value projections as one GEMM: output rows are laid out as
    [q: num_heads * head_dim | k: num_kv_heads * head_dim | v: num_kv_heads * head_dim]."""

    _SHARD_INDEX = {"q": 0, "k": 1, "v": 2}

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ) -> None:
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, [q_size, kv_size, kv_size], bias)
        for param in self.parameters():
            param.shard_ids = ("q", "k", "v")

    def _shard_offset_size(self, shard_id) -> tuple[int, int]:
        return super()._shard_offset_size(self._SHARD_INDEX[shard_id])
