"""The KV connector interface: KV cache that lives outside the GPU pool, in two halves.

Shaped on vLLM's KV connector v1. One connector class, two instances: the scheduler's (in the
EngineCore) decides what to load and save; each worker's moves the bytes.

    scheduler side (role SCHEDULER)                   worker side (role WORKER, one per rank)
    ───────────────────────────────                   ───────────────────────────────────────
    get_num_new_matched_tokens(request, n_hit)        register_kv_caches(kv_caches)
      -> (tokens beyond the GPU hit it can provide,   start_load_kv(metadata)   before the forward
          whether they load asynchronously)           wait_for_layer_load(i)    before layer i's
    update_state_after_alloc(request, blocks, n)                                attention
    build_connector_meta(scheduler_output)            save_kv_layer(i)          after layer i
      -> KVConnectorMetadata, carried in              wait_for_save()           after the forward
         SchedulerOutput.kv_connector_metadata        get_finished() -> KVConnectorOutput,
    request_finished(request)                           carried in ModelRunnerOutput
    take_stats() -> KVTransferStats | None

The scheduler keeps one rule: a connector hit only advances `num_computed_tokens`. An
asynchronous load holds the request aside (its blocks allocated, not hashed into the prefix
cache) until the workers report it in `KVConnectorOutput.finished_loading` with the number of
tokens that really arrived; a short count (a missing or corrupt chunk, a store that went
away) means those tokens are recomputed, never that wrong KV is read.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from lmserve.request import Request


class KVConnectorRole(enum.Enum):
    SCHEDULER = "scheduler"
    WORKER = "worker"


# ---- what travels in SchedulerOutput / ModelRunnerOutput ----------------------------------
class ChunkTransfer(msgspec.Struct, array_like=True):
    """Chunks of one request to load into (or save from) its blocks.

    Chunk `first_chunk + j` covers tokens [(first_chunk + j) * chunk_size, ... + chunk_size);
    `block_ids` are the request's blocks for those tokens, in token order. A load skips the
    first `skip_tokens` tokens (already in the GPU prefix cache)."""

    req_id: str
    chunk_hashes: list[str]  # rank-independent chain hashes (hex), one per chunk
    first_chunk: int
    block_ids: list[int]
    skip_tokens: int = 0


class KVConnectorMetadata(msgspec.Struct, array_like=True, omit_defaults=True):
    """The scheduler side's orders for one step."""

    loads: list[ChunkTransfer] = []  # start loading these (asynchronously)
    saves: list[ChunkTransfer] = []  # save these after this step's forward


class KVTransferStats(msgspec.Struct, array_like=True, omit_defaults=True):
    """Counter increments since the last report (metrics `lmserve:kv_offload_*`)."""

    query_tokens: int = 0  # tokens asked of the connector beyond the GPU prefix-cache hit
    hit_tokens: dict[str, int] = {}  # tier -> tokens loaded from it
    bytes_loaded: dict[str, int] = {}  # tier -> bytes
    seconds_loaded: dict[str, float] = {}  # tier -> seconds
    bytes_saved: dict[str, int] = {}  # tier -> bytes
    seconds_saved: dict[str, float] = {}  # tier -> seconds
    failures: dict[str, int] = {}  # "tier:reason" -> count

    def add(self, other: KVTransferStats) -> None:
        self.query_tokens += other.query_tokens
        for name in ("hit_tokens", "bytes_loaded", "seconds_loaded", "bytes_saved",
                     "seconds_saved", "failures"):  # fmt: skip
            mine = getattr(self, name)
            for key, value in getattr(other, name).items():
                mine[key] = mine.get(key, 0) + value

    def is_empty(self) -> bool:
        return not self.query_tokens and not any(
            (self.hit_tokens, self.bytes_loaded, self.bytes_saved, self.failures)
        )


class KVConnectorOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """The worker side's report after a step."""

    finished_loading: dict[str, int] = {}  # req_id -> tokens loaded (from the load's start)
    stats: KVTransferStats | None = None
    # what the worker's own tier (host memory) gained (True) and lost (False), by store key,
    # in order: the scheduler turns them into KV events with that tier's medium
    tier_changes: list[tuple[bool, str]] = []


# ---- the interface -------------------------------------------------------------------------
class KVConnectorBase(ABC):
    """See the module docstring. A method of the other role's half is never called."""

    def __init__(self, role: KVConnectorRole) -> None:
        self.role = role

    # ---- scheduler side ---------------------------------------------------------------------
    @abstractmethod
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        """Tokens after the first `num_computed_tokens` (the GPU prefix-cache hit) that the
        connector can provide, and whether they load asynchronously. Does not change state:
        the scheduler may not admit the request this step."""

    @abstractmethod
    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        """The request was admitted with `num_external_tokens` to load; `block_ids` are all of
        its blocks. The load goes into the next `build_connector_meta`."""

    @abstractmethod
    def build_connector_meta(
        self,
        scheduler_output: Any,
        requests: Mapping[str, Request],
        block_ids_of: Callable[[str], list[int]],
    ) -> KVConnectorMetadata:
        """This step's loads and saves (called at the end of `Scheduler.schedule`, after every
        scheduled request's `num_computed_tokens` was advanced by this step). `requests`: the
        scheduler's, by id; `block_ids_of(req_id)`: a request's blocks, in token order."""

    @abstractmethod
    def request_finished(self, request: Request) -> None:
        """The request finished or was aborted: forget it."""

    def take_stats(self) -> KVTransferStats | None:
        """Scheduler-side counter increments since the last call."""
        return None

    def tier_events(self, output: KVConnectorOutput) -> list[Any]:
        """KV events (lmserve/core/kv_events.py) for the blocks the workers' tiers stored or
        evicted, as `output` reports them; published with the prefix cache's own."""
        return []

    # ---- worker side ------------------------------------------------------------------------
    @abstractmethod
    def register_kv_caches(self, kv_caches: list[tuple[Any, Any]]) -> None:
        """The worker's KV cache: per layer (key, value), each
        [num_blocks, block_size, num_kv_heads, head_dim]."""

    @abstractmethod
    def start_load_kv(self, metadata: KVConnectorMetadata) -> None:
        """Before the forward: begin this step's loads (and queue its saves)."""

    def wait_for_layer_load(self, layer_index: int) -> None:
        """Before layer `layer_index`'s attention: its KV from this step's loads is in place.
        A connector that loads ahead of the step (asynchronously) has nothing to wait for."""
        return None

    def save_kv_layer(self, layer_index: int) -> None:
        """After layer `layer_index` wrote this step's KV: a layer-wise connector may start
        saving it. A connector that saves after the forward does nothing here."""
        return None

    @abstractmethod
    def wait_for_save(self) -> None:
        """After the forward: this step's saves are under way (their device reads are queued
        before any later step can overwrite the blocks)."""

    @abstractmethod
    def get_finished(self) -> KVConnectorOutput:
        """Loads finished since the last call, and worker-side counter increments."""

    def shutdown(self) -> None:
        """Finish background work (pending saves) and release resources."""
        return None
