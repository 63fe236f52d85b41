"""The tensor-parallel group of this process, and its collectives.

Set once per worker process by `init_tensor_parallel` (and guarded against a second, different
call); read by the parallel layers when they are built and when they run. With one rank every
collective is a no-op, so single-device code pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int
    world_size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place when possible."""
        if self.world_size == 1:
            return x
        dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `x` along `dim` (rank order)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=dim)

    def shard_range(self, size: int) -> tuple[int, int]:
        """[start, end) of this rank's equal share of `size` (which must divide evenly)."""
        if size % self.world_size:
            raise ValueError(
                f"{size} does not split evenly over tensor_parallel_size={self.world_size}"
            )
        part = size // self.world_size
        return self.rank * part, (self.rank + 1) * part


_SINGLE = TensorParallelGroup(rank=0, world_size=1)
_group: TensorParallelGroup = _SINGLE


def init_tensor_parallel(
    world_size: int, rank: int, init_method: str = "", backend: str = "gloo"
) -> TensorParallelGroup:
    """Join the process group (every rank calls this with the same init_method)."""
    global _group
    if world_size == 1:
        _group = _SINGLE
        return _group
    if _group.world_size != 1:
        if (_group.world_size, _group.rank) != (world_size, rank):
            raise RuntimeError("tensor parallelism is already initialised differently")
        return _group
    dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank)
    _group = TensorParallelGroup(rank=rank, world_size=world_size)
    return _group


def get_tp_group() -> TensorParallelGroup:
    return _group


def destroy_tensor_parallel() -> None:
    global _group
    if _group.world_size != 1 and dist.is_initialized():
        dist.barrier()  # no rank tears down its connections while another still uses them
        dist.destroy_process_group()
    _group = _SINGLE
