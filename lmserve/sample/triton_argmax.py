"""Greedy argmax over a large vocabulary in one Triton launch, for the few rows of small-batch
decode: `logits.argmax(-1)` exactly (the first maximum; a NaN counts as the maximum, as in
PyTorch).

PyTorch runs a one-row argmax on a single block, and a chunked max-then-argmax takes four
kernels (~20 us together on an H100 at a 152k vocabulary). Here one program per
[row, chunk of CHUNK entries] finds its chunk's maximum and first index, stores them, and takes
a ticket (an atomic counter per row); the program that draws the last ticket picks the first
chunk holding the row's maximum -- whose index is then the first occurrence overall -- and
resets the counter for the next launch.
"""

from __future__ import annotations

import functools

import torch

from lmserve.triton_utils import pdl_launch_options, ticket_counters

CHUNK = 4096  # entries per program: 16 KB of float32
MAX_ROWS = 64  # tickets kept per device


def _tickets(device: torch.device) -> torch.Tensor:  # [MAX_ROWS] int32, zero at rest
    return ticket_counters(device, "argmax", MAX_ROWS)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def triton_argmax(logits: torch.Tensor) -> torch.Tensor:  # [rows, vocab] -> [rows] int64
    rows, vocab = logits.shape
    assert rows <= MAX_ROWS and logits.stride(1) == 1, (logits.shape, logits.stride())
    num_chunks = -(-vocab // CHUNK)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    partial_max = torch.empty((rows, num_chunks), dtype=torch.float32, device=logits.device)
    partial_idx = torch.empty((rows, num_chunks), dtype=torch.int32, device=logits.device)
    _kernel()[(rows, num_chunks)](
        logits,
        partial_max,
        partial_idx,
        _tickets(logits.device),
        out,
        vocab,
        logits.stride(0),
        NUM_CHUNKS=num_chunks,
        BLOCK_C=_next_power_of_2(num_chunks),
        CHUNK=CHUNK,
        num_warps=8,
        **pdl_launch_options(logits),
    )
    return out


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def argmax_kernel(
        logits_ptr,  # [rows, vocab]
        partial_max_ptr,  # [rows, NUM_CHUNKS] float32: each chunk's max (NaN if it has one)
        partial_idx_ptr,  # [rows, NUM_CHUNKS] int32: its first index
        tickets_ptr,  # [rows] int32, zero at rest
        out_ptr,  # [rows] int64
        vocab,
        stride_row,
        NUM_CHUNKS: tl.constexpr,
        BLOCK_C: tl.constexpr,  # NUM_CHUNKS padded to a power of two
        CHUNK: tl.constexpr,
        USE_PDL: tl.constexpr,  # programmatic dependent launch (lmserve.triton_utils)
    ):
        if USE_PDL:  # the previous kernel's writes are visible past this line
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        offs = chunk * CHUNK + tl.arange(0, CHUNK)  # [CHUNK]
        valid = offs < vocab
        v = tl.load(logits_ptr + row.to(tl.int64) * stride_row + offs, mask=valid)
        v = v.to(tl.float32)
        is_nan = (v != v) & valid
        top = tl.max(tl.where(valid & ~is_nan, v, float("-inf")), axis=0)
        first_top = tl.min(tl.where(valid & (v == top), offs, vocab), axis=0)
        first_nan = tl.min(tl.where(is_nan, offs, vocab), axis=0)
        has_nan = first_nan < vocab
        part = row * NUM_CHUNKS + chunk
        tl.store(partial_max_ptr + part, tl.where(has_nan, float("nan"), top))
        tl.store(partial_idx_ptr + part, tl.where(has_nan, first_nan, first_top))

        tl.debug_barrier()  # the partials before the ticket (release)
        if tl.atomic_add(tickets_ptr + row, 1, sem="acq_rel", scope="gpu") == NUM_CHUNKS - 1:
            cs = tl.arange(0, BLOCK_C)
            c_ok = cs < NUM_CHUNKS
            tops = tl.load(partial_max_ptr + row * NUM_CHUNKS + cs, mask=c_ok,
                           other=float("-inf"), cache_modifier=".cg")  # fmt: skip
            idxs = tl.load(partial_idx_ptr + row * NUM_CHUNKS + cs, mask=c_ok,
                           other=vocab, cache_modifier=".cg")  # fmt: skip
            nans = (tops != tops) & c_ok
            best = tl.max(tl.where(nans, float("-inf"), tops), axis=0)
            # Chunk indices grow with the chunk: the smallest index among the winners is the
            # first occurrence (a NaN anywhere wins over every number).
            winner = tl.where(tl.sum(nans.to(tl.int32), axis=0) > 0, nans, c_ok & (tops == best))
            tl.store(out_ptr + row, tl.min(tl.where(winner, idxs, vocab), axis=0).to(tl.int64))
            tl.store(tickets_ptr + row, 0)

    return argmax_kernel
