"""Shared-prefix ("cascade") decode attention: a prefix that every request of a decode batch
holds in the same KV blocks is read once for the whole batch, not once per request.

Many requests that share a system prompt, the `n` samples of one prompt, or the batch of a
benchmark that repeats a prefix all decode over the same physical blocks (the prefix cache
shares them). The per-request decode kernel reads those blocks once per request and KV head:
64 requests over a 1,900-token prefix read it 64 times each step. Here a decode step splits
every request's keys in two:

    keys of request r:  [0, P)              the shared prefix: same block ids in every row
                        [P, seq_len[r])     its own suffix

  1. `shared_prefix_kernel`: for each KV head, the queries of *all* requests (request x GQA
     group rows, BLOCK_M at a time) attend to the prefix together: one pass over its keys per
     row tile, split over NUM_SPLITS key segments so the grid fills the GPU. Each writes a
     partial output and its log-sum-exp per segment.
  2. `shared_prefix_suffix_kernel`: per (request, KV head), the suffix as in plain decode, then
     the merge with the prefix partials (log-sum-exp weights), and the final output.

P is read from a device scalar, so a CUDA graph captured with this path replays for any
prefix length (P = 0: the first kernel returns at once and the second is plain decode).
Exact in the usual sense: the same softmax, computed by parts and merged, as split-KV decode
is; tests compare it with the float64 reference.

`shared_prefix_len` finds P on the host from the step's block tables, and `pays_off` says
whether a batch gains from it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from lmserve.attention.backend import AttentionMetadata
from lmserve.triton_utils import pdl_launch_options

# When the shared path pays (one layer inside a CUDA graph, 8B shape, H100, bench
# `benchmarks/shared_prefix_decode.py`): 64 requests over 1,904 prefix keys 84.7 -> 38.4 us,
# 256 over 4,000 598 -> 109 us; but 8 requests over 512 keys 14.3 -> 26.0 us and 16 over 512
# 16.8 -> 24.3 us (two launches and the partials' round trip cost ~20 us). So: 16+ requests,
# and a prefix the plain path would read at least MIN_PREFIX_READS times over in all.
MIN_REQS = 16
MIN_TOKENS = 256
MIN_PREFIX_READS = 24_576  # prefix tokens x requests
MAX_SPLITS = 16


def shared_prefix_len(block_tables: np.ndarray, seq_lens: np.ndarray, block_size: int) -> int:
    """Tokens at the start of every request's keys that all requests hold in the same blocks
    (a multiple of `block_size`, at most the shortest request's length); 0 when that is under
    MIN_TOKENS or the batch has fewer than MIN_REQS requests.

    block_tables: [num_reqs, max_blocks] int32; seq_lens: [num_reqs] keys after this step."""
    if len(seq_lens) < MIN_REQS:
        return 0
    width = min(int(seq_lens.min()) // block_size, block_tables.shape[1])
    if width * block_size < MIN_TOKENS:
        return 0
    first = block_tables[0, :width]  # [width]
    if not (block_tables[:, 0] == first[0]).all():  # most batches stop here
        return 0
    same = (block_tables[:, :width] == first).all(axis=0)  # [width] bool
    blocks = width if same.all() else int(same.argmin())
    tokens = blocks * block_size
    return tokens if tokens >= MIN_TOKENS else 0


def pays_off(prefix_len: int, num_reqs: int) -> bool:
    """Whether the shared-prefix kernels beat the plain ones for this decode batch."""
    return num_reqs >= MIN_REQS and prefix_len * num_reqs >= MIN_PREFIX_READS


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def shared_prefix_kernel(
        partial_out_ptr,  # [NUM_SPLITS, num_tokens * num_heads, BLOCK_D] float32
        partial_lse_ptr,  # [NUM_SPLITS, num_tokens * num_heads] float32, log2 domain
        query_ptr,  # [num_tokens, num_heads, head_dim]; one query token per request
        key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
        value_cache_ptr,
        block_tables_ptr,  # [num_reqs, max_blocks] int32; the prefix is read from row 0
        query_start_loc_ptr,  # [num_reqs + 1] int32
        seq_lens_ptr,  # [num_reqs] int32
        prefix_len_ptr,  # [1] int32: P, a multiple of block_size (0: nothing to do)
        qk_scale,  # softmax scale * log2(e)
        num_reqs,
        num_heads,
        num_rows_total,  # num_tokens * num_heads: one split's stride in the partials
        stride_q_tok,
        stride_q_head,
        stride_cache_block,
        stride_cache_slot,
        stride_cache_head,
        block_size,
        head_dim,
        GROUP_SIZE: tl.constexpr,  # query heads per KV head
        BLOCK_M: tl.constexpr,  # rows (request x group member) per program
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        USE_PDL: tl.constexpr,  # programmatic dependent launch (lmserve.triton_utils)
    ):
        if USE_PDL:  # the previous kernel's writes are visible past this line
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        prefix = tl.load(prefix_len_ptr)
        if prefix == 0:
            return
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        req = rows // GROUP_SIZE
        head = kv_head * GROUP_SIZE + rows % GROUP_SIZE
        in_batch = req < num_reqs
        seq_len = tl.load(seq_lens_ptr + req, mask=in_batch, other=0)
        row_valid = in_batch & (seq_len >= prefix)  # padding requests (no keys) take no part
        token = tl.load(query_start_loc_ptr + req, mask=in_batch, other=0).to(tl.int64)
        dims = tl.arange(0, BLOCK_D)
        dim_valid = dims < head_dim
        q_off = token[:, None] * stride_q_tok + head[:, None] * stride_q_head + dims[None, :]
        q = tl.load(query_ptr + q_off, mask=row_valid[:, None] & dim_valid[None, :], other=0.0)

        # This program's key segment: a multiple of BLOCK_N (empty past the prefix's end).
        seg = tl.cdiv(tl.cdiv(prefix, NUM_SPLITS), BLOCK_N) * BLOCK_N
        kv_lo = split * seg
        kv_hi = tl.minimum(kv_lo + seg, prefix)
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        cols = tl.arange(0, BLOCK_N)
        for kv_start in range(kv_lo, kv_hi, BLOCK_N):
            k_pos = kv_start + cols  # [BLOCK_N]; every query sees every prefix key
            k_valid = k_pos < kv_hi
            block_ids = tl.load(block_tables_ptr + k_pos // block_size, mask=k_valid, other=0)
            kv_off = block_ids.to(tl.int64) * stride_cache_block
            kv_off += (k_pos % block_size) * stride_cache_slot + kv_head * stride_cache_head
            kv_mask = k_valid[:, None] & dim_valid[None, :]
            k = tl.load(key_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            v = tl.load(value_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            scores = tl.where(k_valid[None, :], scores, float("-inf"))  # [BLOCK_M, BLOCK_N]
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        empty = l_i == 0.0  # a segment past the prefix's end
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        idx = split * num_rows_total + token * num_heads + head  # [BLOCK_M]
        tl.store(partial_lse_ptr + idx, lse, mask=row_valid)
        tl.store(partial_out_ptr + idx[:, None] * BLOCK_D + dims[None, :], out,
                 mask=row_valid[:, None])  # fmt: skip

    @triton.jit
    def shared_prefix_suffix_kernel(
        out_ptr,  # [num_tokens, num_heads, head_dim]
        partial_out_ptr,  # as shared_prefix_kernel's
        partial_lse_ptr,
        query_ptr,
        key_cache_ptr,
        value_cache_ptr,
        block_tables_ptr,
        query_start_loc_ptr,
        seq_lens_ptr,
        prefix_len_ptr,
        qk_scale,
        num_heads,
        num_rows_total,
        stride_q_tok,
        stride_q_head,
        stride_o_tok,
        stride_o_head,
        stride_cache_block,
        stride_cache_slot,
        stride_cache_head,
        stride_block_table,
        block_size,
        head_dim,
        GROUP_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr,  # GROUP_SIZE padded to a power of two >= 16
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        if USE_PDL:  # also orders this kernel after shared_prefix_kernel's partials
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        req = tl.program_id(0)
        kv_head = tl.program_id(1)
        token = tl.load(query_start_loc_ptr + req).to(tl.int64)
        seq_len = tl.load(seq_lens_ptr + req)
        prefix = tl.load(prefix_len_ptr)
        has_prefix = (prefix > 0) & (seq_len >= prefix)
        kv_lo = tl.where(has_prefix, prefix, 0)

        rows = tl.arange(0, BLOCK_M)
        head = kv_head * GROUP_SIZE + rows
        row_valid = rows < GROUP_SIZE
        dims = tl.arange(0, BLOCK_D)
        dim_valid = dims < head_dim
        q_off = token * stride_q_tok + head[:, None] * stride_q_head + dims[None, :]
        q = tl.load(query_ptr + q_off, mask=row_valid[:, None] & dim_valid[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        block_table_row = block_tables_ptr + req.to(tl.int64) * stride_block_table
        cols = tl.arange(0, BLOCK_N)
        for kv_start in range(kv_lo, seq_len, BLOCK_N):
            k_pos = kv_start + cols  # one query at the last position: no causal mask inside
            k_valid = k_pos < seq_len
            block_ids = tl.load(block_table_row + k_pos // block_size, mask=k_valid, other=0)
            kv_off = block_ids.to(tl.int64) * stride_cache_block
            kv_off += (k_pos % block_size) * stride_cache_slot + kv_head * stride_cache_head
            kv_mask = k_valid[:, None] & dim_valid[None, :]
            k = tl.load(key_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            v = tl.load(value_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            scores = tl.where(k_valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        if has_prefix:  # merge each prefix segment: its output weighted by 2^(lse - max)
            idx = token * num_heads + head  # [BLOCK_M]
            for s in tl.static_range(NUM_SPLITS):
                lse_s = tl.load(partial_lse_ptr + s * num_rows_total + idx, mask=row_valid,
                                other=float("-inf"))  # fmt: skip
                part = tl.load(
                    partial_out_ptr + (s * num_rows_total + idx)[:, None] * BLOCK_D + dims[None, :],
                    mask=row_valid[:, None], other=0.0,
                )  # fmt: skip
                m_new = tl.maximum(m_i, lse_s)
                alpha = tl.exp2(m_i - m_new)
                w = tl.exp2(lse_s - m_new)  # 0 for an empty segment (lse -inf)
                l_i = l_i * alpha + w
                acc = acc * alpha[:, None] + w[:, None] * part
                m_i = m_new

        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # 0 only for padding requests
        o_off = token * stride_o_tok + head[:, None] * stride_o_head + dims[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty),
                 mask=row_valid[:, None] & dim_valid[None, :])  # fmt: skip

    return shared_prefix_kernel, shared_prefix_suffix_kernel


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _launch_shape(num_reqs: int, group_size: int, num_kv_heads: int, sm_count: int):
    """(BLOCK_M, row tiles, NUM_SPLITS) of the prefix kernel: rows are request x GQA group
    member; enough key segments that the grid covers the SMs once (each segment's partial
    output is written and read back, so more segments than that cost more than they give)."""
    rows = num_reqs * group_size
    block_m = min(64, max(16, _next_power_of_2(rows)))
    tiles = -(-rows // block_m)
    splits = min(MAX_SPLITS, _next_power_of_2(-(-sm_count // (tiles * num_kv_heads))))
    return block_m, tiles, splits


def shared_prefix_decode(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]; one token per request
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,  # decode-only; metadata.shared_prefix set
    scale: float,
    output: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    sm_count: int,
) -> None:
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    group_size = num_heads // num_kv_heads
    block_d = max(16, _next_power_of_2(head_dim))
    block_n = 64 if block_d <= 128 else 32
    block_m, tiles, splits = _launch_shape(metadata.num_reqs, group_size, num_kv_heads, sm_count)
    partial_out = torch.empty(
        (splits, num_tokens * num_heads, block_d), dtype=torch.float32, device=query.device
    )
    partial_lse = torch.empty(
        (splits, num_tokens * num_heads), dtype=torch.float32, device=query.device
    )
    prefix_kernel, suffix_kernel = _kernels()
    qk_scale = scale * 1.4426950408889634  # log2(e): the kernels use exp2
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    cache_strides = (key_cache.stride(0), key_cache.stride(1), key_cache.stride(2))
    prefix_kernel[(tiles, num_kv_heads, splits)](
        partial_out, partial_lse, query, key_cache, value_cache, metadata.block_tables,
        metadata.query_start_loc, metadata.seq_lens, metadata.shared_prefix, qk_scale,
        metadata.num_reqs, num_heads, num_tokens * num_heads, query.stride(0), query.stride(1),
        *cache_strides, key_cache.shape[1], head_dim,
        GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        NUM_SPLITS=splits, DOT_PRECISION=precision, num_warps=4, num_stages=2,
        **pdl_launch_options(query),
    )  # fmt: skip
    suffix_kernel[(metadata.num_reqs, num_kv_heads)](
        output, partial_out, partial_lse, query, key_cache, value_cache, metadata.block_tables,
        metadata.query_start_loc, metadata.seq_lens, metadata.shared_prefix, qk_scale,
        num_heads, num_tokens * num_heads, query.stride(0), query.stride(1), output.stride(0),
        output.stride(1), *cache_strides, metadata.block_tables.stride(0), key_cache.shape[1],
        head_dim,
        GROUP_SIZE=group_size, BLOCK_M=max(16, _next_power_of_2(group_size)), BLOCK_N=block_n,
        BLOCK_D=block_d, NUM_SPLITS=splits, DOT_PRECISION=precision, num_warps=4, num_stages=2,
        **pdl_launch_options(query),
    )  # fmt: skip
