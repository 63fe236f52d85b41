"""Triton attention backend (CUDA): one KV-cache write kernel and one paged-attention kernel for
mixed batches. Correct first; the speed work (split-KV decode, unmasked interior tiles, tuned
block shapes, CUDA graphs) comes on top of this.

Write kernel: one program per token copies its [num_kv_heads, head_dim] key and value rows into
the cache at `slot_mapping[token]` (a negative slot is skipped: padding tokens write nothing).
Given the rotary tables (`rope`), the same program first rotates the token's query heads in place
and rotates the key heads on their way into the cache: rotary embedding costs no launch of its own.

Attention kernel, grid = (query tiles, num_kv_heads). A program owns BLOCK_Q consecutive query
tokens of ONE request and ALL the query heads that share one KV head (GQA group of size
G = num_heads // num_kv_heads), stacked into BLOCK_M = BLOCK_Q * G rows (padded up to a power of
two). Row r is query token r // G, query head kv_head * G + r % G:

    rows:   t0h0 t0h1 .. t0h(G-1) | t1h0 .. t1h(G-1) | ... | (padding rows)
    keys:   one [BLOCK_N, head_dim] tile of this request's KV at a time, gathered through the
            block table (token j lives in block block_table[j // block_size], slot j % block_size)

so each K/V tile is loaded once for the whole group. Scores, running max and running sum are
float32 (online softmax, exp2 with log2(e) folded into the scale); the causal mask compares
absolute positions: query token i of a request with q_len queries and seq_len keys sits at
position seq_len - q_len + i, and sees keys 0..that position.

Which request a program serves is found in the kernel, with no host-side plan: request i's
tiles are numbered from `query_start_loc[i] // BLOCK_Q + i` on. That number grows with i and
leaves each request at least ceil(q_len / BLOCK_Q) tiles, so a binary search over it finds the
request, the grid is `num_tokens // BLOCK_Q + num_reqs` and surplus programs exit at once.

Split-KV decode ("flash-decoding"): a decode-only batch with few requests launches only
num_reqs * num_kv_heads programs above, each walking a whole sequence — too few to fill an H100's
132 SMs when the context is long. When that product is below the SM count, decode runs instead
as one program per (request, kv head, segment): each request's keys are cut into NUM_SPLITS
segments (at least MIN_SPLIT_KEYS each, so short sequences use one), each program writes its
partial output and log-sum-exp, then takes a ticket (an atomic counter per request and KV head);
the segment that draws the last ticket merges all of them in segment order (deterministic) and
resets the counter: one launch, not a split kernel and a merge kernel. NUM_SPLITS depends only
on the batch shape, never on sequence lengths, so a CUDA graph captures it once per batch size.

Long prompts: KV tiles wholly below the causal diagonal skip the mask, the programs run from the
last query tile to the first (longest first, so the short ones fill the tail), and batches whose
longest query reaches LONG_QUERY_LEN take larger tiles (LONG_TILE: 128 rows x 128 keys, 8 warps).
"""

from __future__ import annotations

import functools

import torch

from lmserve.attention.backend import AttentionBackend, AttentionMetadata
from lmserve.attention.shared_prefix import shared_prefix_decode
from lmserve.triton_utils import pdl_launch_options, ticket_counters

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


@functools.cache
def _kernels():
    """Compile-on-first-use: triton is imported only when the backend actually runs."""
    import triton
    import triton.language as tl

    @triton.jit
    def write_kv_cache_kernel(
        query_ptr,  # [num_tokens, num_heads, head_dim]; HAS_ROPE: rotated in place
        key_ptr,  # [num_tokens, num_kv_heads, head_dim]
        value_ptr,  # [num_tokens, num_kv_heads, head_dim]
        key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
        value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
        slot_mapping_ptr,  # [num_tokens] int64
        cos_ptr,  # HAS_ROPE: [num_tokens, head_dim] (two equal halves)
        sin_ptr,  # HAS_ROPE: [num_tokens, head_dim]
        stride_q_tok,
        stride_q_head,
        stride_k_tok,
        stride_k_head,
        stride_v_tok,
        stride_v_head,
        stride_cs_tok,
        stride_cache_block,
        stride_cache_slot,
        stride_cache_head,
        block_size,
        num_heads,
        num_kv_heads,
        head_dim,
        HAS_ROPE: tl.constexpr,
        BLOCK_QH: tl.constexpr,  # num_heads padded to a power of two
        BLOCK_H: tl.constexpr,  # num_kv_heads padded to a power of two
        BLOCK_D: tl.constexpr,  # head_dim padded to a power of two
        BLOCK_HALF: tl.constexpr,  # head_dim // 2 padded to a power of two
        USE_PDL: tl.constexpr,  # programmatic dependent launch (lmserve.triton_utils)
    ):
        if USE_PDL:  # the previous kernel's writes are visible past this line
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        token = tl.program_id(0).to(tl.int64)
        half = head_dim // 2
        heads = tl.arange(0, BLOCK_H)[:, None]
        if HAS_ROPE:  # the query: rotated in place, padding tokens included (never read)
            dims = tl.arange(0, BLOCK_HALF)[None, :]
            cos = tl.load(cos_ptr + token * stride_cs_tok + dims, mask=dims < half, other=0.0)
            sin = tl.load(sin_ptr + token * stride_cs_tok + dims, mask=dims < half, other=0.0)
            cos, sin = cos.to(tl.float32), sin.to(tl.float32)  # [1, BLOCK_HALF]
            q_heads = tl.arange(0, BLOCK_QH)[:, None]
            q_mask = (q_heads < num_heads) & (dims < half)
            q_ptrs = query_ptr + token * stride_q_tok + q_heads * stride_q_head + dims
            q1 = tl.load(q_ptrs, mask=q_mask).to(tl.float32)
            q2 = tl.load(q_ptrs + half, mask=q_mask).to(tl.float32)
            dtype = query_ptr.dtype.element_ty  # rotate-half in float32, rounded once
            tl.store(q_ptrs, (q1 * cos - q2 * sin).to(dtype), mask=q_mask)
            tl.store(q_ptrs + half, (q2 * cos + q1 * sin).to(dtype), mask=q_mask)
        slot = tl.load(slot_mapping_ptr + token)
        if slot < 0:  # padding token: nothing to write
            return
        cache_row = (slot // block_size) * stride_cache_block + (
            slot % block_size
        ) * stride_cache_slot
        cache_ptrs = cache_row + heads * stride_cache_head  # [BLOCK_H, 1]
        k_ptrs = key_ptr + token * stride_k_tok + heads * stride_k_head
        if HAS_ROPE:
            mask = (heads < num_kv_heads) & (dims < half)
            k1 = tl.load(k_ptrs + dims, mask=mask).to(tl.float32)
            k2 = tl.load(k_ptrs + half + dims, mask=mask).to(tl.float32)
            dtype = key_cache_ptr.dtype.element_ty
            k1, k2 = (k1 * cos - k2 * sin).to(dtype), (k2 * cos + k1 * sin).to(dtype)
            tl.store(key_cache_ptr + cache_ptrs + dims, k1, mask=mask)
            tl.store(key_cache_ptr + cache_ptrs + half + dims, k2, mask=mask)
        else:
            full = tl.arange(0, BLOCK_D)[None, :]
            mask = (heads < num_kv_heads) & (full < head_dim)
            tl.store(
                key_cache_ptr + cache_ptrs + full, tl.load(k_ptrs + full, mask=mask), mask=mask
            )
        full = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < num_kv_heads) & (full < head_dim)
        v = tl.load(value_ptr + token * stride_v_tok + heads * stride_v_head + full, mask=mask)
        tl.store(value_cache_ptr + cache_ptrs + full, v, mask=mask)

    # The query-length bounds take many values: no specialisation (and recompile) on them.
    @triton.jit(do_not_specialize=["min_q_len", "max_q_len"])
    def paged_attention_kernel(
        out_ptr,  # [num_tokens, num_heads, head_dim]
        query_ptr,  # [num_tokens, num_heads, head_dim]
        key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
        value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
        block_tables_ptr,  # [num_reqs, max_num_blocks_per_req] int32
        query_start_loc_ptr,  # [num_reqs + 1] int32
        seq_lens_ptr,  # [num_reqs] int32
        qk_scale,  # softmax scale * log2(e)
        num_reqs,
        min_q_len,  # requests with fewer query tokens are another launch's
        max_q_len,  # ... and with more, too
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
        GROUP_SIZE: tl.constexpr,  # query heads per KV head
        BLOCK_Q: tl.constexpr,  # query tokens per program
        BLOCK_M: tl.constexpr,  # rows = BLOCK_Q * GROUP_SIZE, padded to a power of two
        BLOCK_N: tl.constexpr,  # keys per inner-loop tile
        BLOCK_D: tl.constexpr,  # head_dim padded to a power of two (>= 16)
        DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs, else the tensor-core default
        USE_PDL: tl.constexpr,  # programmatic dependent launch (lmserve.triton_utils)
    ):
        if USE_PDL:  # the previous kernel's writes are visible past this line
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        # Highest tile first: a request's last tiles see the most keys, so the longest programs
        # start in the first wave and the short ones fill the tail.
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
        kv_head = tl.program_id(1)

        # Which request: the last i with query_start_loc[i] // BLOCK_Q + i <= tile.
        lo = 0
        hi = num_reqs
        while lo < hi:
            mid = (lo + hi) // 2
            if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile:
                lo = mid + 1
            else:
                hi = mid
        req = lo - 1
        q_start = tl.load(query_start_loc_ptr + req)
        q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
        first_q = (tile - (q_start // BLOCK_Q + req)) * BLOCK_Q  # within the request
        if first_q >= q_len:  # a surplus tile of the grid's upper bound
            return
        if q_len < min_q_len or q_len > max_q_len:  # left to the launch with the other tile
            return
        seq_len = tl.load(seq_lens_ptr + req)
        context_len = seq_len - q_len  # keys before this step's first query

        rows = tl.arange(0, BLOCK_M)
        q_idx = first_q + rows // GROUP_SIZE  # query index within the request
        head = kv_head * GROUP_SIZE + rows % GROUP_SIZE
        row_valid = (rows < BLOCK_Q * GROUP_SIZE) & (q_idx < q_len)
        q_pos = context_len + q_idx  # absolute position of each row's query
        dims = tl.arange(0, BLOCK_D)
        dim_valid = dims < head_dim
        q_off = (q_start + q_idx)[:, None] * stride_q_tok + head[:, None] * stride_q_head
        q = tl.load(
            query_ptr + q_off + dims[None, :],
            mask=row_valid[:, None] & dim_valid[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_D]

        # Finite start: masked scores are -inf, and exp2(-inf - m) = 0 with no NaN from
        # (-inf) - (-inf) in rows that see nothing yet (padding rows).
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # Keys this tile can see: up to the position of its last query. Tiles wholly below the
        # causal diagonal (every key at or before the tile's FIRST query) need no mask: the
        # first loop walks them; the second walks the few diagonal tiles with the mask.
        kv_end = context_len + tl.minimum(first_q + BLOCK_Q, q_len)
        # (a padding request has seq_len 0 < q_len: both bounds are <= 0 and no key is read)
        kv_interior = tl.maximum(context_len + first_q + 1, 0) // BLOCK_N * BLOCK_N
        block_table_row = block_tables_ptr + req.to(tl.int64) * stride_block_table
        cols = tl.arange(0, BLOCK_N)
        kv_head_off = kv_head * stride_cache_head
        for kv_start in range(0, kv_interior, BLOCK_N):
            k_pos = kv_start + cols  # [BLOCK_N] absolute key positions, all visible
            block_ids = tl.load(block_table_row + k_pos // block_size)
            kv_off = block_ids.to(tl.int64) * stride_cache_block
            kv_off += (k_pos % block_size) * stride_cache_slot + kv_head_off
            kv_mask = dim_valid[None, :]
            k = tl.load(key_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            v = tl.load(value_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        for kv_start in range(kv_interior, kv_end, BLOCK_N):
            k_pos = kv_start + cols  # [BLOCK_N] absolute key positions
            k_valid = k_pos < kv_end
            block_ids = tl.load(block_table_row + k_pos // block_size, mask=k_valid, other=0)
            kv_off = block_ids.to(tl.int64) * stride_cache_block
            kv_off += (k_pos % block_size) * stride_cache_slot + kv_head_off
            kv_mask = k_valid[:, None] & dim_valid[None, :]
            k = tl.load(
                key_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0
            )  # [BLOCK_N, BLOCK_D]
            v = tl.load(
                value_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0
            )  # [BLOCK_N, BLOCK_D]

            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            visible = (k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :]
            scores = tl.where(visible, scores, float("-inf"))  # [BLOCK_M, BLOCK_N]

            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows only; never stored
        out = acc / l_i[:, None]
        o_off = (q_start + q_idx)[:, None] * stride_o_tok + head[:, None] * stride_o_head
        tl.store(
            out_ptr + o_off + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )

    @triton.jit
    def decode_split_kernel(
        out_ptr,  # [num_tokens, num_heads, head_dim]
        partial_out_ptr,  # [num_tokens, num_heads, NUM_SPLITS, BLOCK_D] float32
        partial_lse_ptr,  # [num_tokens, num_heads, NUM_SPLITS] float32, log2 domain
        tickets_ptr,  # [num_reqs * num_kv_heads] int32, zero at rest
        query_ptr,  # [num_tokens, num_heads, head_dim]; one query token per request
        key_cache_ptr,
        value_cache_ptr,
        block_tables_ptr,
        query_start_loc_ptr,
        seq_lens_ptr,
        qk_scale,
        num_heads,
        num_kv_heads,
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
        MIN_SPLIT_KEYS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        USE_PDL: tl.constexpr,  # programmatic dependent launch (lmserve.triton_utils)
    ):
        if USE_PDL:  # the previous kernel's writes are visible past this line
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        req = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        token = tl.load(query_start_loc_ptr + req)
        seq_len = tl.load(seq_lens_ptr + req)
        # The segment: a multiple of BLOCK_N, at least MIN_SPLIT_KEYS long.
        seg = tl.maximum(tl.cdiv(seq_len, NUM_SPLITS), MIN_SPLIT_KEYS)
        seg = tl.cdiv(seg, BLOCK_N) * BLOCK_N
        kv_lo = split * seg
        kv_hi = tl.minimum(kv_lo + seg, seq_len)

        rows = tl.arange(0, BLOCK_M)
        head = kv_head * GROUP_SIZE + rows
        row_valid = rows < GROUP_SIZE
        dims = tl.arange(0, BLOCK_D)
        dim_valid = dims < head_dim
        q_off = token.to(tl.int64) * stride_q_tok + head[:, None] * stride_q_head + dims[None, :]
        q = tl.load(query_ptr + q_off, mask=row_valid[:, None] & dim_valid[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        block_table_row = block_tables_ptr + req.to(tl.int64) * stride_block_table
        cols = tl.arange(0, BLOCK_N)
        for kv_start in range(kv_lo, kv_hi, BLOCK_N):
            k_pos = kv_start + cols
            k_valid = k_pos < kv_hi  # one query at the last position: no causal mask inside
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

        empty = l_i == 0.0  # a segment past the end of the sequence (or a padding request)
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        head_base = (token.to(tl.int64) * num_heads + head) * NUM_SPLITS  # [BLOCK_M]
        tl.store(partial_lse_ptr + head_base + split, lse, mask=row_valid)
        out_ptrs = partial_out_ptr + (head_base + split)[:, None] * BLOCK_D + dims[None, :]
        tl.store(out_ptrs, out, mask=row_valid[:, None])

        # The segment that finishes last (an atomic ticket per request and KV head) merges all
        # of them, in segment order whichever it is; then it resets the ticket.
        tl.debug_barrier()  # every thread's partials before the ticket (release)
        ticket_ptr = tickets_ptr + req * num_kv_heads + kv_head
        if tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
            m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            for s in tl.static_range(NUM_SPLITS):
                lse_s = tl.load(partial_lse_ptr + head_base + s, mask=row_valid,
                                other=float("-inf"), cache_modifier=".cg")  # fmt: skip
                m = tl.maximum(m, lse_s)
            m = tl.where(m == float("-inf"), 0.0, m)  # no keys at all: every weight is 0
            total = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            for s in tl.static_range(NUM_SPLITS):
                lse_s = tl.load(partial_lse_ptr + head_base + s, mask=row_valid,
                                other=float("-inf"), cache_modifier=".cg")  # fmt: skip
                w = tl.exp2(lse_s - m)  # [BLOCK_M]
                part = tl.load(partial_out_ptr + (head_base + s)[:, None] * BLOCK_D + dims[None, :],
                               mask=row_valid[:, None], other=0.0, cache_modifier=".cg")  # fmt: skip
                total += w
                acc += w[:, None] * part
            merged = acc / tl.where(total == 0.0, 1.0, total)[:, None]
            o_off = token.to(tl.int64) * stride_o_tok + head[:, None] * stride_o_head
            tl.store(
                out_ptr + o_off + dims[None, :],
                merged.to(out_ptr.dtype.element_ty),
                mask=row_valid[:, None] & dim_valid[None, :],
            )
            tl.store(ticket_ptr, 0)

    return write_kv_cache_kernel, paged_attention_kernel, decode_split_kernel


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def triton_write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; < 0 = skip
    query: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]; with rope
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # (cos, sin) [num_tokens, head_dim]
) -> None:
    """Copy each token's key/value into the cache at its slot (mutates both caches). With
    `rope`, the query is rotated in place and the key is rotated on its way to the cache, all
    in the same kernel."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert key.stride(2) == 1 and value.stride(2) == 1, "head_dim must be contiguous"
    assert key_cache.stride() == value_cache.stride() and key_cache.stride(3) == 1
    cos, sin = rope if rope is not None else (key, key)  # not read without HAS_ROPE
    if rope is not None:
        assert query is not None and query.stride(2) == 1 and head_dim % 2 == 0
        assert cos.stride() == sin.stride() and cos.stride(1) == 1
    q = query if query is not None else key
    _kernels()[0][(num_tokens,)](
        q,
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        cos.stride(0),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        key_cache.shape[1],
        q.shape[1],
        num_kv_heads,
        head_dim,
        HAS_ROPE=rope is not None,
        BLOCK_QH=_next_power_of_2(q.shape[1]),
        BLOCK_H=_next_power_of_2(num_kv_heads),
        BLOCK_D=_next_power_of_2(head_dim),
        BLOCK_HALF=_next_power_of_2(head_dim // 2),
        **pdl_launch_options(key),
    )


# (rows per program, keys per inner tile, warps, pipeline stages)
TileConfig = tuple[int, int, int, int]
SHORT_TILE: TileConfig = (64, 64, 4, 2)
LONG_TILE: TileConfig = (128, 128, 8, 2)
LONG_QUERY_LEN = 1024  # a batch whose longest query has this many tokens takes LONG_TILE


def _tile_config(
    group_size: int, max_query_len: int, block_d: int, dtype: torch.dtype
) -> TileConfig:
    """Decode-only batches take the smallest tile a tensor-core dot accepts (16 rows); batches
    with prompts take SHORT_TILE, and 16-bit ones LONG_TILE once a query is long enough to fill
    its rows (float32 tiles that size would not fit in shared memory)."""
    block_n = 64 if block_d <= 128 else 32
    if max_query_len * group_size <= 16:
        return 16, block_n, 4, 2
    if max_query_len >= LONG_QUERY_LEN and block_d <= 128 and dtype != torch.float32:
        return LONG_TILE
    return SHORT_TILE[0], block_n, SHORT_TILE[2], SHORT_TILE[3]


def _block_shape(group_size: int, block_rows: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_Q): rows per program (at least one whole GQA group) and query tokens."""
    block_m = max(block_rows, _next_power_of_2(group_size))
    return block_m, block_m // group_size


def triton_paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    metadata: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]; allocated if None
    num_kv_splits: int | None = None,  # decode-only batches: None = chosen from the batch shape
    tile: TileConfig | None = None,  # None = chosen from the batch shape (benchmarks sweep it)
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each query over its request's cached keys/values (already written)."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    group_size = num_heads // num_kv_heads
    output = (
        torch.empty(query.shape, dtype=query.dtype, device=query.device) if out is None else out
    )
    assert output.shape == query.shape and output.dtype == query.dtype and output.stride(2) == 1
    if num_tokens == 0:
        return output
    assert query.stride(2) == 1 and key_cache.stride(3) == 1
    assert key_cache.stride() == value_cache.stride()
    assert metadata.block_tables.stride(1) == 1
    block_d = max(16, _next_power_of_2(head_dim))
    if metadata.shared_prefix is not None and metadata.max_query_len == 1:
        sm_count = _sm_count(query.device.index or 0) if query.is_cuda else 1
        shared_prefix_decode(query, key_cache, value_cache, metadata, scale, output, sm_count)
        return output
    if num_kv_splits is None:
        num_kv_splits = _num_kv_splits(metadata, num_kv_heads, query.device)
    if metadata.max_query_len == 1 and num_kv_splits > 1:
        _split_kv_decode(query, key_cache, value_cache, metadata, scale, output, num_kv_splits)
        return output
    for launch_tile, min_q, max_q in _launches(metadata, group_size, block_d, query.dtype, tile):
        _paged_attention_launch(
            query, key_cache, value_cache, metadata, scale, output, launch_tile, min_q, max_q
        )
    return output


def _launches(
    metadata: AttentionMetadata,
    group_size: int,
    block_d: int,
    dtype: torch.dtype,
    tile: TileConfig | None,
) -> list[tuple[TileConfig, int, int]]:
    """(tile, min query tokens, max query tokens) per kernel launch. A batch that takes the
    long tile for its long prompts sends its decode rows (and other queries that fit 16 rows)
    to a second launch with the 16-row tile: one decode row in a 128-row tile would waste most
    of its dots. The count of such requests is found once per forward (metadata.backend_state)."""
    chosen = tile or _tile_config(group_size, metadata.max_query_len, block_d, dtype)
    if tile is not None or chosen != LONG_TILE:
        return [(chosen, 0, _NO_LIMIT)]
    short_q = max(1, 16 // group_size)
    if metadata.backend_state is None:
        starts = metadata.query_start_loc_cpu
        metadata.backend_state = sum(b - a <= short_q for a, b in zip(starts, starts[1:]))
    if not metadata.backend_state:
        return [(chosen, 0, _NO_LIMIT)]
    short = _tile_config(group_size, 1, block_d, dtype)
    return [(chosen, short_q + 1, _NO_LIMIT), (short, 0, short_q)]


_NO_LIMIT = 2**31 - 1


def _paged_attention_launch(
    query, key_cache, value_cache, metadata, scale, output, tile: TileConfig, min_q, max_q
) -> None:
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    group_size = num_heads // num_kv_heads
    rows, block_n, num_warps, num_stages = tile
    block_m, block_q = _block_shape(group_size, rows)
    grid = (num_tokens // block_q + metadata.num_reqs, num_kv_heads)
    attention_kernel = _kernels()[1]
    attention_kernel[grid](
        output,
        query,
        key_cache,
        value_cache,
        metadata.block_tables,
        metadata.query_start_loc,
        metadata.seq_lens,
        scale * 1.4426950408889634,  # log2(e): the kernel uses exp2
        metadata.num_reqs,
        min_q,
        max_q,
        query.stride(0),
        query.stride(1),
        output.stride(0),
        output.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        metadata.block_tables.stride(0),
        key_cache.shape[1],
        head_dim,
        GROUP_SIZE=group_size,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, _next_power_of_2(head_dim)),
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_launch_options(query),
    )


MAX_KV_SPLITS = 16
# One KV tile per segment at least: the merge reads all NUM_SPLITS partials whatever their
# length, so shorter segments cost nothing there, and a short serial tile loop (each tile waits
# on its block ids, then its keys) is what limits small-batch decode.
MIN_SPLIT_KEYS = 64


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_kv_splits(metadata: AttentionMetadata, num_kv_heads: int, device: torch.device) -> int:
    """Segments per request for a decode-only batch: enough programs for two waves over the
    SMs. 1 (no split) when the batch alone fills the GPU or it is not decode-only."""
    if metadata.max_query_len != 1 or device.type != "cuda":
        return 1
    programs = metadata.num_reqs * num_kv_heads
    sm_count = _sm_count(device.index if device.index is not None else 0)
    if programs >= sm_count:
        return 1
    return min(MAX_KV_SPLITS, _next_power_of_2(-(-2 * sm_count // programs)))


# Split-KV tickets (lmserve.triton_utils): one per (request, KV head). Split-KV runs only while
# requests x KV heads < SMs, so a few thousand always suffice.
_MAX_TICKETS = 4096


def _split_tickets(device: torch.device) -> torch.Tensor:  # [_MAX_TICKETS] int32
    return ticket_counters(device, "split_kv_decode", _MAX_TICKETS)


def _split_kv_decode(query, key_cache, value_cache, metadata, scale, output, num_splits) -> None:
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    group_size = num_heads // num_kv_heads
    block_d = max(16, _next_power_of_2(head_dim))
    assert metadata.num_reqs * num_kv_heads <= _MAX_TICKETS
    partial_out = torch.empty(
        (num_tokens, num_heads, num_splits, block_d), dtype=torch.float32, device=query.device
    )
    partial_lse = torch.empty(
        (num_tokens, num_heads, num_splits), dtype=torch.float32, device=query.device
    )
    split_kernel = _kernels()[2]
    split_kernel[(metadata.num_reqs, num_kv_heads, num_splits)](
        output,
        partial_out,
        partial_lse,
        _split_tickets(query.device),
        query,
        key_cache,
        value_cache,
        metadata.block_tables,
        metadata.query_start_loc,
        metadata.seq_lens,
        scale * 1.4426950408889634,
        num_heads,
        num_kv_heads,
        query.stride(0),
        query.stride(1),
        output.stride(0),
        output.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        metadata.block_tables.stride(0),
        key_cache.shape[1],
        head_dim,
        GROUP_SIZE=group_size,
        BLOCK_M=max(16, _next_power_of_2(group_size)),
        BLOCK_N=64 if block_d <= 128 else 32,
        BLOCK_D=block_d,
        NUM_SPLITS=num_splits,
        MIN_SPLIT_KEYS=MIN_SPLIT_KEYS,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=4,
        num_stages=2,
        **pdl_launch_options(query),
    )


class TritonAttentionBackend(AttentionBackend):
    """Paged attention in two Triton kernels (cache write with rotary, then attention). CUDA
    only.

    float32 inputs use exact float32 dots (no tf32), so float32 serving keeps its precision;
    bf16/fp16 dots run on the tensor cores with float32 accumulation."""

    name = "triton"
    supports_full_cuda_graph = True
    supports_shared_prefix = True

    def forward(
        self, query, key, value, kv_cache, metadata: AttentionMetadata, scale, out=None, rope=None
    ):
        key_cache, value_cache = kv_cache
        _check_inputs(query, key_cache)
        triton_write_kv_cache(
            key, value, key_cache, value_cache, metadata.slot_mapping, query=query, rope=rope
        )
        return triton_paged_attention(query, key_cache, value_cache, metadata, scale, out=out)


def _check_inputs(query: torch.Tensor, key_cache: torch.Tensor) -> None:
    if query.device.type != "cuda":
        raise ValueError(f"the triton attention backend runs on CUDA, not {query.device.type}")
    if query.dtype not in _SUPPORTED_DTYPES or key_cache.dtype != query.dtype:
        raise ValueError(
            f"triton attention supports float16/bfloat16/float32 with a cache of the same dtype; "
            f"got query {query.dtype}, cache {key_cache.dtype}"
        )
    num_heads, head_dim = query.shape[1], query.shape[2]
    if num_heads % key_cache.shape[2] != 0:
        raise ValueError(f"{num_heads} query heads do not split into {key_cache.shape[2]} groups")
    if head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"triton attention supports head_dim <= {_MAX_HEAD_DIM}, got {head_dim}")
