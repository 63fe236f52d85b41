"""Linear layers, split across the tensor-parallel ranks of `get_tp_group()`:

  ColumnParallelLinear        y = x W^T       W split by output rows; no communication
  MergedColumnParallelLinear  [gate | up]     several column layers fused into one GEMM
  QKVParallelLinear           [q | k | v]     the attention projections fused, split by heads
  RowParallelLinear           y = x W^T       W split by input columns; all-reduce of y

Each parameter's `weight_loader` takes the FULL checkpoint tensor and copies this rank's slice,
so model files load the same way at any tensor-parallel size. A fused layer's parameter lists
the checkpoint pieces it is built from in `param.shard_ids`, so a model's `load_weights` can
tell when every piece has arrived.

A layer whose weight was packed after loading (lmserve/model/quantize.py: int4/int8 on the CPU)
multiplies through `self.packed`; its `.weight` is then a placeholder of the same shape.
"""

from __future__ import annotations

import torch
from torch import nn

from lmserve.distributed.parallel_state import get_tp_group
from lmserve.model.layers.gemv import linear
from lmserve.model.layers.quantization import PackedWeight
from lmserve.model.layers.utils import default_weight_loader, make_param


class _Linear(nn.Module):
    """y = x W^T + b with this rank's W [output_size_per_partition, input_size_per_partition]."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        local_input: int,
        local_output: int,
        local_bias: int,
    ) -> None:
        super().__init__()
        self.tp = get_tp_group()
        self.input_size, self.output_size = input_size, output_size
        self.weight = make_param(local_output, local_input, weight_loader=self.weight_loader)
        if bias:
            self.bias = make_param(local_bias, weight_loader=self.weight_loader)
        else:
            self.register_parameter("bias", None)
        self.packed: PackedWeight | None = None  # set by quantize_model

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None):
        default_weight_loader(param, loaded_weight, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., input_size] -> [..., output]
        return self.matmul(x, self.bias)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x W^T (+ bias) with this rank's weight, packed or not."""
        if self.packed is None:
            return linear(x, self.weight, bias)
        y = self.packed.matmul(x)  # [..., output]
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}, "
            f"tp={self.tp.world_size}"
        )


class ColumnParallelLinear(_Linear):
    """Output features split across ranks; each rank keeps its slice of y."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        local = output_size // get_tp_group().world_size
        super().__init__(input_size, output_size, bias, input_size, local, local)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None):
        start, end = self.tp.shard_range(loaded_weight.shape[0])
        default_weight_loader(param, loaded_weight[start:end])


class RowParallelLinear(_Linear):
    """Input features split across ranks; the partial outputs are summed (all-reduce)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        local = input_size // get_tp_group().world_size
        super().__init__(input_size, output_size, bias, local, output_size, output_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None):
        if loaded_weight.dim() == 2:  # the weight: split the input columns; a bias is whole
            start, end = self.tp.shard_range(loaded_weight.shape[1])
            loaded_weight = loaded_weight[:, start:end]
        default_weight_loader(param, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return self.matmul(x, self.bias)
        y = self.tp.all_reduce(self.matmul(x, None))  # [..., output_size]
        return y if self.bias is None else y + self.bias


class MergedColumnParallelLinear(_Linear):
    """Several column-parallel layers over the same input, stacked along the output dimension
    (e.g. the MLP's gate and up projections): one GEMM instead of several.

    Shard `i` fills this rank's output rows [sum(local_sizes[:i]), sum(local_sizes[:i+1])).
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        local_sizes: list[int] | None = None,
    ) -> None:
        """`local_sizes`: this rank's rows of each part (default: an equal share of each)."""
        world = get_tp_group().world_size
        self.output_sizes = list(output_sizes)
        self.local_sizes = local_sizes or [size // world for size in output_sizes]
        local = sum(self.local_sizes)
        super().__init__(input_size, sum(output_sizes), bias, input_size, local, local)
        for param in self.parameters():
            param.shard_ids = self._shard_ids()

    def _local_rows(self, shard_id) -> tuple[int, int]:
        """(offset in this rank's parameter, rows) of shard `shard_id`."""
        return sum(self.local_sizes[:shard_id]), self.local_sizes[shard_id]

    def _checkpoint_rows(self, shard_id, loaded_rows: int) -> tuple[int, int]:
        """[start, end) of this rank's rows within the checkpoint tensor of `shard_id`."""
        return self.tp.shard_range(loaded_rows)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None):
        if shard_id is None:  # a checkpoint that stores the fused tensor: split it first
            sizes = self.output_sizes
            for i, part in enumerate(loaded_weight.split(sizes, dim=0)):
                self.weight_loader(param, part, self._shard_ids()[i])
            return
        offset, rows = self._local_rows(shard_id)
        start, end = self._checkpoint_rows(shard_id, loaded_weight.shape[0])
        default_weight_loader(param.narrow(0, offset, rows), loaded_weight[start:end])

    def _shard_ids(self) -> tuple:
        return tuple(range(len(self.output_sizes)))


class QKVParallelLinear(MergedColumnParallelLinear):
    """The query, key and value projections as one GEMM: this rank's output rows are
    [q: its query heads | k: its KV heads | v: its KV heads]. With fewer KV heads than ranks,
    each KV head is replicated on the ranks whose query heads use it."""

    _SHARD_INDEX = {"q": 0, "k": 1, "v": 2}

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ) -> None:
        tp = get_tp_group()
        if num_heads % tp.world_size:
            raise ValueError(
                f"num_attention_heads={num_heads} does not split over "
                f"tensor_parallel_size={tp.world_size}"
            )
        if num_kv_heads % tp.world_size and tp.world_size % num_kv_heads:
            raise ValueError(
                f"num_key_value_heads={num_kv_heads} neither splits over nor "
                f"divides tensor_parallel_size={tp.world_size}"
            )
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        self.num_heads_per_partition = num_heads // tp.world_size
        self.num_kv_heads_per_partition = max(num_kv_heads // tp.world_size, 1)
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        local_kv = self.num_kv_heads_per_partition * head_dim  # replicated KV: one head
        local_sizes = [self.num_heads_per_partition * head_dim, local_kv, local_kv]
        super().__init__(hidden_size, [q_size, kv_size, kv_size], bias, local_sizes)

    def _shard_ids(self) -> tuple:
        return ("q", "k", "v")

    def _local_rows(self, shard_id) -> tuple[int, int]:
        return super()._local_rows(self._SHARD_INDEX[shard_id])

    def _checkpoint_rows(self, shard_id, loaded_rows: int) -> tuple[int, int]:
        if shard_id == "q" or self.num_kv_heads >= self.tp.world_size:
            return self.tp.shard_range(loaded_rows)
        # replicated: ranks [h * world / num_kv, (h + 1) * world / num_kv) share KV head h
        head = self.tp.rank * self.num_kv_heads // self.tp.world_size
        return head * self.head_dim, (head + 1) * self.head_dim
