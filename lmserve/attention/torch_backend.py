"""PyTorch reference attention backend: correct everywhere (CPU included), not fast.

It loops over the requests of a batch on the host; the GPU backends (later) do the same math in
one kernel launch. Numerics follow HF transformers' SDPA path so float32 greedy output matches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmserve.attention.backend import AttentionBackend, AttentionMetadata


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def gather_kv(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [max_num_blocks_per_req] int32
    seq_len: int,
) -> torch.Tensor:  # [seq_len, num_kv_heads, head_dim]
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.flatten(0, 1)[:seq_len]


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(self, query, key, value, kv_cache, metadata: AttentionMetadata, scale: float):
        key_cache, value_cache = kv_cache
        write_kv_cache(key, value, key_cache, value_cache, metadata.slot_mapping)
        output = torch.empty_like(query)  # [num_tokens, num_heads, head_dim]
        starts = metadata.query_start_loc_cpu
        for i, seq_len in enumerate(metadata.seq_lens_cpu):
            q_start, q_end = starts[i], starts[i + 1]
            block_table = metadata.block_tables[i]
            k = gather_kv(key_cache, block_table, seq_len)  # [seq_len, kv_heads, hd]
            v = gather_kv(value_cache, block_table, seq_len)
            q = query[q_start:q_end]  # [q_len, num_heads, hd]
            output[q_start:q_end] = _causal_attention(q, k, v, scale)
        return output


def _causal_attention(
    q: torch.Tensor,  # [q_len, num_heads, head_dim]: the LAST q_len positions of the sequence
    k: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    v: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    scale: float,
) -> torch.Tensor:  # [q_len, num_heads, head_dim]
    q_len, seq_len = q.shape[0], k.shape[0]
    if q_len == 1:
        mask, is_causal = None, False  # one query sees the whole sequence
    elif q_len == seq_len:
        mask, is_causal = None, True
    else:  # a chunk continuing a cached prefix: query i sits at position seq_len - q_len + i
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        mask, is_causal = torch.arange(seq_len, device=q.device)[None, :] <= q_pos, False
    # 4-D inputs, as HF passes them: SDPA picks its kernel by rank, and the same kernel gives
    # bit-identical logits to HF for a single request.
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],  # [1, num_heads, q_len, hd]
        k.transpose(0, 1)[None],  # [1, kv_heads, seq_len, hd]
        v.transpose(0, 1)[None],
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)
