"""Launch options and scratch shared by lmserve's Triton kernels (layers, attention, sampler).

Programmatic dependent launch (PDL, Hopper and later): a kernel launched with it may start while
the kernel before it on the stream is still finishing -- its programs get SMs as the previous
kernel's last wave runs, instead of after the previous kernel has fully drained and the next
launch has gone through. A batch-1 decode step is a chain of ~200-350 small kernels, each a few
microseconds long, so the launch gap between two of them is a real share of the step.

The contract, kept by every kernel that takes `USE_PDL`: its first statement is
`tl.extra.cuda.gdc_wait()`, which blocks until the previous kernel has completed and its memory
is visible -- so no load or store can see a half-written input -- followed by
`gdc_launch_dependents()`, which lets the next PDL kernel be scheduled once every program of
this one has started. Kernels that are not launched with PDL (PyTorch's) keep ordinary stream
order, both before and after. CUDA graphs capture the dependency as a programmatic edge.

`LMSERVE_DISABLE_PDL=1` turns it off; it is off before compute capability 9.0 and off the GPU
(Triton's interpreter).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from lmserve import envs


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _supports_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_enabled(x: torch.Tensor) -> bool:
    """Whether kernels on x's device launch with programmatic dependent launch."""
    return (
        x.is_cuda
        and not envs.LMSERVE_DISABLE_PDL
        and _supports_pdl(x.device.index if x.device.index is not None else 0)
    )


def pdl_launch_options(x: torch.Tensor) -> dict:
    """Keyword arguments for a kernel launch on x's device: the kernel's `USE_PDL` constexpr,
    and Triton's `launch_pdl` option when it is on."""
    if pdl_enabled(x):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@functools.cache
def ticket_counters(device: torch.device, kernel: str, size: int) -> torch.Tensor:  # [size] int32
    """Zeroed int32 counters on `device`, one buffer per kernel family, kept for the process.

    The "last program reduces" pattern (split-K GEMV, split-KV attention, the argmax) works on
    them: each program stores its partial result, `tl.debug_barrier()`s so every thread's
    stores come first, then `tl.atomic_add(counter, 1, sem="acq_rel")`; the program that draws
    the last ticket reads all partials (`cache_modifier=".cg"`, from L2) in a fixed order and
    stores 0 back, so the counters are zero again for the next launch -- and for CUDA-graph
    replays, which capture this buffer's address. Kernels on one device run one after another
    on its stream, so one buffer per family serves every call."""
    return torch.zeros(size, dtype=torch.int32, device=device)
