"""The tensor-parallel group of this process, and its collectives.

Set once per worker process by `init_tensor_parallel` (and guarded against a second, different
call); read by the parallel layers when they are built and when they run. With one rank every
collective is a no-op, so single-device code pays nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn
from urllib.parse import urlparse

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
# The rendezvous store, kept so teardown can order the exits: rank 0 serves it and must leave last.
_store: dist.Store | None = None
_EXIT_KEY = "lmserve/tp_exited"
_EXIT_TIMEOUT_S = 30.0


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
    global _store
    _store = _tcp_store(init_method, world_size, rank)
    if _store is None:
        dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank)
    else:
        dist.init_process_group(backend, store=_store, world_size=world_size, rank=rank)
    _group = TensorParallelGroup(rank=rank, world_size=world_size)
    return _group


def _tcp_store(init_method: str, world_size: int, rank: int) -> dist.TCPStore | None:
    """The store behind a `tcp://host:port` init method, served by rank 0 (None otherwise)."""
    url = urlparse(init_method)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        return None
    return dist.TCPStore(
        url.hostname,
        url.port,
        world_size,
        is_master=rank == 0,
        timeout=timedelta(seconds=300),
        wait_for_workers=False,
    )


def get_tp_group() -> TensorParallelGroup:
    return _group


def destroy_tensor_parallel() -> None:
    """Leave the group in order: a barrier so no rank tears down connections another still
    uses, then every other rank reports its exit before rank 0 stops serving the store (a
    store server gone under a connected client can abort that process at exit)."""
    global _group, _store
    if _group.world_size != 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        if _store is not None:
            _leave_store(_store, _group)
    _group, _store = _SINGLE, None


def _leave_store(store: dist.Store, group: TensorParallelGroup) -> None:
    if group.rank != 0:
        store.add(_EXIT_KEY, 1)
        return
    deadline = time.monotonic() + _EXIT_TIMEOUT_S
    while store.add(_EXIT_KEY, 0) < group.world_size - 1 and time.monotonic() < deadline:
        time.sleep(0.005)


def exit_worker_process(code: int) -> NoReturn:
    """End a tensor-parallel worker process now, after its own teardown (destroy_tensor_parallel
    and whatever else it closes), without interpreter finalization: the C++ destructors of
    torch.distributed's background threads (gloo, the TCP store) may run at exit while a thread
    is still joinable, and abort the process ("terminate called without an active exception",
    exit -6) after a clean shutdown. Logs and stdio are flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
