"""Attention backend interface.

A backend does two things for one layer in one forward pass:
  1. writes the new keys/values of this step into the paged KV cache at `slot_mapping`;
  2. attends every query token to its request's cached keys/values, causally.

One forward carries a *mixed* batch: some requests are mid-prompt (many query tokens, maybe a
chunk of a long prompt), others decode one token. The backend sees only flat tensors:

    query tokens:  | req0: q0 tokens | req1: q1 tokens | ... |      (num_tokens = sum(q_i))
    query_start_loc = [0, q0, q0+q1, ...]                          (num_reqs + 1)
    seq_lens[i]     = tokens of req i whose KV exists after this step's write
                      (= num_computed_tokens + q_i); the queries are the LAST q_i of them.

KV cache layout per layer: key_cache and value_cache, each [num_blocks, block_size, num_kv_heads,
head_dim]. Token t of request i lives in block block_tables[i, t // block_size] at offset
t % block_size; `slot_mapping[j] = block_id * block_size + offset` for query token j.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Per-forward attention inputs, built by the model runner, shared by every layer."""

    num_reqs: int
    num_tokens: int
    max_query_len: int
    max_seq_len: int
    slot_mapping: torch.Tensor  # [num_tokens] int64, flat slot index into the cache
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, on device
    seq_lens: torch.Tensor  # [num_reqs] int32, on device
    block_tables: torch.Tensor  # [num_reqs, max_num_blocks_per_req] int32, on device
    # Host copies for backends that loop on the CPU (the torch reference backend).
    query_start_loc_cpu: list[int]  # [num_reqs + 1]
    seq_lens_cpu: list[int]  # [num_reqs]
    # What the backend derives once per forward (in its first layer) and reuses in the rest.
    backend_state: Any = None
    # Decode-only batches whose requests all start with the same KV blocks: a [1] int32 device
    # scalar holding that prefix's length in tokens (a multiple of block_size; 0 = none), for
    # backends with `supports_shared_prefix` (lmserve/attention/shared_prefix.py). None: the
    # plain path. A device scalar, so a CUDA graph captured with it serves any prefix length.
    shared_prefix: torch.Tensor | None = None


class AttentionBackend(ABC):
    """Computes paged attention for one layer. Stateless across forwards; any per-forward
    state travels in `AttentionMetadata`."""

    name: str = "abstract"
    # True when a forward reads only the device tensors of the metadata (never its host lists
    # or host ints other than num_reqs/num_tokens/max_query_len), so a whole decode forward,
    # attention included, can be captured in a CUDA graph and replayed with new inputs.
    supports_full_cuda_graph: bool = False
    # True when a decode-only forward reads a prefix that every request holds in the same blocks
    # once for the batch when `metadata.shared_prefix` is set (cascade attention).
    supports_shared_prefix: bool = False

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # 2 x [num_blocks, block_size, kv_heads, hd]
        metadata: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]; None: allocate
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # (cos, sin) [num_tokens, hd]
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Write key/value into `kv_cache` at `metadata.slot_mapping` (mutates the cache), then
        return causal attention of each query over its request's first `seq_lens[i]` tokens,
        written into `out` when given (piecewise CUDA graphs read it from a static address).

        With `rope`, query and key are first rotated (rotary embedding, rotate-half layout):
        the query may be rotated in place; the cache gets the rotated key. A backend can then
        fuse the rotation into its cache write (one kernel where there were two)."""


@dataclass(slots=True)
class ForwardContext:
    """Everything a model needs for one forward besides input ids and positions. Passed
    explicitly down the layers (no module-level global): layer `i` reads `kv_caches[i]`."""

    attn_metadata: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (key_cache, value_cache)
    attn_backend: AttentionBackend
    # The worker's KV connector, for its layer hooks (eager forwards only: a step replayed
    # from CUDA graphs runs no Python between layers, so a layer-wise connector turns graphs
    # off; the tiered connector loads ahead of the step and saves after it).
    kv_connector: Any = None
