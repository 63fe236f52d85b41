"""Shared-prefix (cascade) decode attention against the float64 reference, and how a step's
shared prefix is found on the host.

The kernels run on CUDA, or on CPU under TRITON_INTERPRET=1 (slow); the host helper anywhere.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from lmserve.attention.shared_prefix import (
    MIN_PREFIX_READS,
    MIN_REQS,
    MIN_TOKENS,
    pays_off,
    shared_prefix_len,
)
from tests.interpreted import run_kernel_tests_interpreted

BS = 16


def _tables(rows: list[list[int]]) -> np.ndarray:
    width = max(len(r) for r in rows)
    return np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int32)


def test_shared_prefix_len_counts_the_blocks_every_request_holds():
    shared = list(range(100, 120))  # 20 blocks = 320 tokens
    rows = [shared + [200 + 3 * i, 201 + 3 * i] for i in range(MIN_REQS)]
    seq_lens = np.full(MIN_REQS, 22 * BS - 5, dtype=np.int32)
    assert shared_prefix_len(_tables(rows), seq_lens, BS) == 20 * BS
    # One request diverging at block 17 ends the prefix there.
    rows[3] = shared[:17] + [999] * 5
    assert shared_prefix_len(_tables(rows), seq_lens, BS) == 17 * BS


def test_shared_prefix_len_stops_at_the_shortest_request():
    """Keys past a request's own length are not part of its prefix, even when the block id
    column agrees (block tables are padded)."""
    shared = list(range(40))
    rows = [list(shared) for _ in range(MIN_REQS)]
    seq_lens = np.full(MIN_REQS, 40 * BS, dtype=np.int32)
    seq_lens[5] = 25 * BS + 3  # holds 25 full blocks and part of the 26th
    assert shared_prefix_len(_tables(rows), seq_lens, BS) == 25 * BS


@pytest.mark.parametrize(
    "case", ["few requests", "short prefix", "first block differs", "padding row"]
)
def test_shared_prefix_len_is_zero_when_cascade_would_not_pay(case):
    blocks = MIN_TOKENS // BS + 4
    rows = [list(range(blocks)) + [500 + i] for i in range(MIN_REQS + 2)]
    seq_lens = np.full(len(rows), (blocks + 1) * BS, dtype=np.int32)
    if case == "few requests":
        rows, seq_lens = rows[: MIN_REQS - 1], seq_lens[: MIN_REQS - 1]
    elif case == "short prefix":
        for i, r in enumerate(rows):  # they part inside the first MIN_TOKENS
            r[MIN_TOKENS // BS - 1] = 700 + i
    elif case == "first block differs":
        rows[-1][0] = 777
    else:  # a CUDA-graph padding request has no keys
        seq_lens[-1] = 0
    assert shared_prefix_len(_tables(rows), seq_lens, BS) == 0


def test_the_shared_path_is_taken_only_where_it_was_measured_to_pay():
    """Few requests or a short prefix: the plain kernels were faster (see MIN_PREFIX_READS)."""
    assert pays_off(MIN_PREFIX_READS // MIN_REQS, MIN_REQS)
    assert not pays_off(MIN_PREFIX_READS // MIN_REQS - BS, MIN_REQS)
    assert not pays_off(10 * MIN_PREFIX_READS, MIN_REQS - 1)
    assert pays_off(512, 64) and not pays_off(512, 16)


# ---- the kernels --------------------------------------------------------------------------------
if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    DEVICE = None
needs_kernels = pytest.mark.skipif(
    DEVICE is None or __import__("importlib").util.find_spec("triton") is None,
    reason="needs triton and CUDA (or TRITON_INTERPRET=1)",
)


def shared_batch(contexts, prefix_blocks, num_heads, num_kv_heads, head_dim, dtype, seed):
    """A decode batch (one token per request after `contexts[i]` cached tokens) whose first
    `prefix_blocks` block ids are row 0's in every row with enough keys; slots follow."""
    from tests.attention.test_triton_attention import make_batch

    query, key, value, kv_cache, metadata = make_batch(
        [(c, 1) for c in contexts], num_heads, num_kv_heads, head_dim, dtype, seed=seed
    )
    tables = metadata.block_tables.cpu()
    for i, c in enumerate(contexts):
        if c + 1 >= prefix_blocks * BS:
            tables[i, :prefix_blocks] = tables[0, :prefix_blocks]
    pos = torch.tensor([c for c in contexts])
    slots = tables[torch.arange(len(contexts)), pos // BS].long() * BS + pos % BS
    metadata.block_tables = tables.to(DEVICE)
    metadata.slot_mapping = slots.to(DEVICE)
    return query, key, value, kv_cache, metadata


def run_and_compare(
    contexts, prefix_tokens, heads, head_dim, dtype, seed, tables_prefix=None, pad=0, sm_count=None
):
    """Attention with metadata.shared_prefix = prefix_tokens against the float64 reference
    (which reads every request's keys through its own block table row). `pad` CUDA-graph
    padding requests (one query token, no keys, a block table row of zeros) follow the real
    ones. Returns the real rows' output."""
    import dataclasses

    from lmserve.attention.shared_prefix import shared_prefix_decode
    from lmserve.attention.triton_backend import triton_paged_attention, triton_write_kv_cache
    from tests.attention.test_triton_attention import MAX_REL_ERROR, reference, relative_error

    blocks = (prefix_tokens if tables_prefix is None else tables_prefix) // BS
    query, key, value, kv_cache, metadata = shared_batch(
        contexts, blocks, *heads, head_dim, dtype, seed
    )
    scale = 1.0 / math.sqrt(head_dim)
    ref_out, _, _ = reference(query, key, value, kv_cache, metadata, scale)
    triton_write_kv_cache(key, value, kv_cache[0], kv_cache[1], metadata.slot_mapping)
    n = len(contexts)
    starts = list(range(n + pad + 1))
    seq_lens = [c + 1 for c in contexts] + [0] * pad
    tables = metadata.block_tables
    padded = dataclasses.replace(
        metadata,
        num_reqs=n + pad,
        num_tokens=n + pad,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=torch.cat([tables, torch.zeros_like(tables[:1]).expand(pad, -1)]),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
        shared_prefix=torch.tensor([prefix_tokens], dtype=torch.int32, device=DEVICE),
    )
    padded_query = torch.cat([query, torch.randn_like(query[:1]).expand(pad, -1, -1)])
    out = torch.full_like(padded_query, float("nan"))
    if sm_count is None:  # through the backend's entry point
        triton_paged_attention(padded_query, kv_cache[0], kv_cache[1], padded, scale, out=out)
    else:  # the SM count sets the key segments (the interpreter's is 1)
        shared_prefix_decode(padded_query, *kv_cache, padded, scale, out, sm_count)
    out = out[:n]
    assert not out.isnan().any(), f"{out.isnan().sum().item()} output elements never written"
    error = relative_error(out, ref_out)
    assert error < MAX_REL_ERROR[dtype], f"relative error {error:.2e}"
    return out


INTERPRETED = DEVICE == "cpu"


@pytest.mark.skipif(
    DEVICE is not None or __import__("importlib").util.find_spec("triton") is None,
    reason="the kernel tests run here directly (or triton is missing)",
)
def test_kernel_tests_pass_in_tritons_interpreter():
    """Without CUDA: this file's kernel tests in Triton's interpreter, in a fresh process."""
    run_kernel_tests_interpreted(__file__, "15 passed")


# Under the interpreter float32 and float16 are exact enough; bf16 runs on the GPU only.
DTYPES = [torch.float32] if INTERPRETED else [torch.float32, torch.bfloat16]


@needs_kernels
@pytest.mark.parametrize("sm_count", [None, 132], ids=["backend", "16-segments"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(8, 2), (14, 2), (4, 4)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_shared_prefix_decode_matches_reference(heads, dtype, sm_count):
    """Suffixes of every length around block and tile edges, one request whose keys end with
    the prefix (empty suffix), GQA groups of 4, 7 and 1; the prefix read whole or in 16 key
    segments (most of them empty: the prefix is 320 keys)."""
    prefix = 20 * BS
    contexts = [prefix - 1, prefix, prefix + 15, prefix + 16, prefix + 63, prefix + 64,
                prefix + 200, prefix + 1, prefix + 7]  # fmt: skip
    run_and_compare(contexts, prefix, heads, 32, dtype, seed=heads[0], sm_count=sm_count)


@needs_kernels
def test_prefix_shorter_than_the_shared_blocks_and_padding_requests_stay_exact():
    """The kernels take any prefix the host passes, up to the blocks really shared; requests
    with no keys (CUDA-graph padding) read nothing and merge nothing."""
    prefix = 24 * BS
    contexts = [prefix + 5 * i for i in range(9)]
    run_and_compare(
        contexts, 17 * BS, (8, 2), 32, torch.float32, 3, tables_prefix=prefix, pad=5, sm_count=40
    )


@needs_kernels
def test_zero_prefix_is_plain_decode():
    """A graph captured with the shared-prefix path replays with P = 0 when a step has none."""
    contexts = [40 + 17 * i for i in range(10)]
    run_and_compare(contexts, 0, (8, 2), 32, torch.float32, seed=4, tables_prefix=0)
