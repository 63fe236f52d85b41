"""PyTorch reference attention backend: correct everywhere (CPU included), reasonably fast.

Requests decoding one token are attended together in one batched SDPA call over their
gathered, padded KV (a mask hides the padding); requests with several query tokens (a prompt
or a chunk of one) are attended one by one. The GPU backends do the same math in one kernel.
Numerics follow HF transformers' SDPA path so float32 greedy output matches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmserve.attention.backend import AttentionBackend, AttentionMetadata
from lmserve.model.layers.rotary import apply_rope_tables, rope_tables


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


@dataclass(slots=True)
class _Single:
    """A request attended on its own (a prompt, a chunk of one, or a lone decode)."""

    q_start: int
    q_end: int
    seq_len: int
    blocks: torch.Tensor  # [num_blocks] int64: the blocks holding its seq_len tokens


@dataclass(slots=True)
class _Plan:
    """Per-forward split of the batch, shared by all layers (made in the first layer)."""

    decode_tokens: torch.Tensor | None  # [num_decode] flat query index of each decode request
    decode_blocks: torch.Tensor | None  # [num_decode * max_blocks] int64 block ids, flattened
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_blocks * block_size] bool
    num_decode_blocks: int  # max_blocks
    singles: list[_Single]  # requests with > 1 query token (or a lone decode), one by one
    whole: bool  # one request holds every query token: its attention is the layer's output
    rope: tuple[torch.Tensor, torch.Tensor] | None  # rope_tables(cos, sin) for every layer


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def prepare(self, metadata: AttentionMetadata, block_size: int, rope) -> None:
        starts, seq_lens = metadata.query_start_loc_cpu, metadata.seq_lens_cpu
        decode = [i for i in range(metadata.num_reqs) if starts[i + 1] - starts[i] == 1]
        multi = [i for i in range(metadata.num_reqs) if starts[i + 1] - starts[i] > 1]
        plan = _Plan(None, None, None, 0, [], False, None if rope is None else rope_tables(*rope))
        if len(decode) > 1:  # batching pays from two requests on
            device = metadata.block_tables.device
            idx = torch.tensor(decode, device=device)
            lens = metadata.seq_lens.index_select(0, idx).long()  # [num_decode]
            max_len = max(seq_lens[i] for i in decode)
            num_blocks = -(-max_len // block_size)
            plan.decode_tokens = metadata.query_start_loc.index_select(0, idx).long()
            plan.decode_blocks = metadata.block_tables.index_select(0, idx)[:, :num_blocks]
            plan.decode_blocks = plan.decode_blocks.long().reshape(-1)
            positions = torch.arange(num_blocks * block_size, device=device)
            plan.decode_mask = (positions[None, :] < lens[:, None])[:, None, None, :]
            plan.num_decode_blocks = num_blocks
        elif decode:
            multi = sorted(multi + decode)
        for i in multi:
            num_blocks = -(-seq_lens[i] // block_size)
            blocks = metadata.block_tables[i, :num_blocks].long()
            plan.singles.append(_Single(starts[i], starts[i + 1], seq_lens[i], blocks))
        plan.whole = len(plan.singles) == 1 and plan.decode_tokens is None
        metadata.backend_state = plan

    def forward(
        self, query, key, value, kv_cache, metadata: AttentionMetadata, scale, out=None, rope=None
    ):
        key_cache, value_cache = kv_cache
        if metadata.backend_state is None:  # the first layer plans for all of them
            self.prepare(metadata, key_cache.shape[1], rope)
        plan: _Plan = metadata.backend_state
        if rope is not None:
            query = apply_rope_tables(query, *plan.rope)
            key = apply_rope_tables(key, *plan.rope)
        # Tokens past the last request's (a verify graph's spare slots) are written nowhere.
        n = metadata.query_start_loc_cpu[-1]
        write_kv_cache(key[:n], value[:n], key_cache, value_cache, metadata.slot_mapping[:n])
        if plan.whole and out is None:  # one request: no output buffer to scatter into
            return _attend_single(query, key_cache, value_cache, plan.singles[0], scale)
        output = torch.empty_like(query) if out is None else out  # [num_tokens, heads, hd]
        if plan.decode_tokens is not None:
            output[plan.decode_tokens] = self._batched_decode(
                query, key_cache, value_cache, plan, scale
            )
        for single in plan.singles:
            output[single.q_start : single.q_end] = _attend_single(
                query, key_cache, value_cache, single, scale
            )
        return output

    @staticmethod
    def _batched_decode(query, key_cache, value_cache, plan: _Plan, scale: float):
        num_decode = plan.decode_tokens.shape[0]
        q = query.index_select(0, plan.decode_tokens)[:, :, None, :]  # [B, heads, 1, hd]
        # [B, max_blocks * block_size, kv_heads, hd] -> [B, kv_heads, L, hd]
        k = (
            key_cache.index_select(0, plan.decode_blocks)
            .view(num_decode, -1, key_cache.shape[2], key_cache.shape[3])
            .transpose(1, 2)
        )
        v = (
            value_cache.index_select(0, plan.decode_blocks)
            .view(num_decode, -1, value_cache.shape[2], value_cache.shape[3])
            .transpose(1, 2)
        )
        # Padding slots were never written (the CPU pool is uninitialised memory, maybe NaN):
        # zero them, since a masked score still multiplies its value (0 * NaN = NaN).
        padding = ~plan.decode_mask.transpose(-1, -2)  # [B, 1, L, 1]
        k, v = k.masked_fill(padding, 0.0), v.masked_fill(padding, 0.0)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=plan.decode_mask,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )  # [B, heads, 1, hd]
        return out[:, :, 0, :]


def _attend_single(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]: the whole batch's queries
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    single: _Single,
    scale: float,
) -> torch.Tensor:  # [q_end - q_start, num_heads, head_dim]
    k = key_cache.index_select(0, single.blocks).flatten(0, 1)[: single.seq_len]
    v = value_cache.index_select(0, single.blocks).flatten(0, 1)[: single.seq_len]
    return _causal_attention(query[single.q_start : single.q_end], k, v, scale)


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
