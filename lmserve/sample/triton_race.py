"""The exponential race for a whole batch in one Triton launch, each row keyed by its own seed.

`exponential_race` draws a seeded row's noise from the request's torch.Generator: one kernel
launch per seeded row (256 seeded rows cost ~2 ms of host time a step on an H100 host, more
than the GPU's own sampling), and makes three passes over the probabilities (noise, divide,
argmax). Here the race reads them once, and the noise is a counter-based hash instead (Philox-4x32, the
generator torch's CUDA kernels use): E[row, token] = -log(U), U = philox(key = the row's seed,
counter = (token, position)), where `position` is where the sampled token goes in its request.
A row's draw therefore depends only on (seed, position, its probabilities): not on the batch,
its order, the step or earlier preemptions (a recomputed position draws the same noise again).
Unseeded rows get a fresh random key each step.

    grid (rows, chunks of CHUNK tokens): each program finds its chunk's largest p / E and the
    first index holding it; `partial.argmax` then picks the first chunk holding the row's
    maximum, so ties go to the lowest token id, as `argmax` does.

U has 31 random bits; U = 0 (probability 2**-31 per token) gives E = inf and p / E = 0: that
token cannot win that step, a bias far below sampling noise.
"""

from __future__ import annotations

import functools

import torch

from lmserve.triton_utils import pdl_launch_options

CHUNK = 4096  # tokens per program


def seeded_race(
    probs: torch.Tensor,  # [rows, vocab] float, each row's proportions (need not sum to 1)
    keys: torch.Tensor,  # [2, rows] int64: (seed, position of the token drawn) per row
    chunk: int = CHUNK,  # tokens per program, a power of two (tests take small ones)
) -> torch.Tensor:  # [rows] int64
    """argmax(p / E) per row, E ~ Exp(1) from the row's (seed, position): token i wins with
    probability p_i / sum(p)."""
    rows, vocab = probs.shape
    assert probs.stride(1) == 1 and keys.shape == (2, rows), (probs.stride(), keys.shape)
    num_chunks = -(-vocab // chunk)
    partial_max = torch.empty((rows, num_chunks), dtype=torch.float32, device=probs.device)
    partial_idx = torch.empty((rows, num_chunks), dtype=torch.int64, device=probs.device)
    if rows:
        _kernel()[(rows, num_chunks)](
            probs,
            keys,
            partial_max,
            partial_idx,
            vocab,
            probs.stride(0),
            keys.stride(0),
            NUM_CHUNKS=num_chunks,
            CHUNK=chunk,
            num_warps=8 if chunk >= 2048 else 4,
            **pdl_launch_options(probs),
        )
    best_chunk = partial_max.argmax(dim=1, keepdim=True)  # [rows, 1]: the first largest chunk
    return partial_idx.gather(1, best_chunk).squeeze(1)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def race_kernel(
        probs_ptr,  # [rows, vocab] float
        keys_ptr,  # [2, rows] int64: seeds, then positions
        partial_max_ptr,  # [rows, NUM_CHUNKS] float32: the chunk's largest p / E
        partial_idx_ptr,  # [rows, NUM_CHUNKS] int64: the first token holding it
        vocab,
        stride_row,
        stride_key,
        NUM_CHUNKS: tl.constexpr,
        CHUNK: tl.constexpr,
        USE_PDL: tl.constexpr,  # programmatic dependent launch (lmserve.triton_utils)
    ):
        if USE_PDL:  # the previous kernel's writes are visible past this line
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        seed = tl.load(keys_ptr + row)
        position = tl.load(keys_ptr + stride_key + row)
        cols = chunk * CHUNK + tl.arange(0, CHUNK)  # [CHUNK] token ids
        valid = cols < vocab
        p = tl.load(probs_ptr + row.to(tl.int64) * stride_row + cols, mask=valid, other=0.0)
        zero = tl.zeros([CHUNK], dtype=tl.uint32)
        c1 = zero + (position & 0xFFFFFFFF).to(tl.uint32)
        c2 = zero + ((position >> 32) & 0xFFFFFFFF).to(tl.uint32)
        r0, _, _, _ = tl.philox(seed, cols.to(tl.uint32), c1, c2, zero)
        u = tl.uint_to_uniform_float(r0)  # [CHUNK] in [0, 1)
        score = p.to(tl.float32) / -tl.log(u)  # p / E; u = 0 -> 0
        best = tl.max(score, axis=0)
        first = tl.min(tl.where(score == best, cols, vocab), axis=0)
        tl.store(partial_max_ptr + row * NUM_CHUNKS + chunk, best)
        tl.store(partial_idx_ptr + row * NUM_CHUNKS + chunk, first.to(tl.int64))

    return race_kernel
