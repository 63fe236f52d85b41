"""TieredConnector: KV chunks in host memory, on local disk and in Redis, shared by engines.

A request's tokens are cut into chunks of `chunk_size` tokens (256 by default). Chunk i is
named by a hash chain that any process on any machine computes alike:

    root   = sha256("lmserve-kv-v1" + model fingerprint + dtype + KV layout + TP size + chunk)
    h_0    = sha256(root [+ cache_salt] + token ids of chunk 0)      (int64 little-endian)
    h_i    = sha256(h_{i-1} + token ids of chunk i)
    key    = sha256(h_i + ":rank" + TP rank)                          (what the store holds)

No Python `hash` and no PYTHONHASHSEED anywhere, so a chunk saved by one engine is a hit on
another; the model fingerprint (its config and a digest of its weight files) and the layout
make a key unable to return another model's KV. A chunk's payload is one rank's KV for its
tokens, all layers: [num_layers, 2 (key, value), chunk_size, num_kv_heads, head_dim] in the
model's dtype.

Loads are asynchronous: the scheduler admits a request with its blocks allocated but not
hashed, a worker thread fetches the chunks (CPU → disk → Redis, promoting what it finds) and
copies them into the blocks, and the next step the scheduler learns how many tokens arrived;
the rest are recomputed. Saves happen after the forward of the step that completed a chunk:
the blocks are gathered on the device in stream order, copied to the host off the critical
path, and handed to the store (CPU at once; disk and Redis from its writer thread).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import warnings
from array import array
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from lmserve.core.kv_events import MEDIUM_CPU, BlockRemoved, BlockStored
from lmserve.kv_transfer.base import (
    ChunkTransfer,
    KVConnectorBase,
    KVConnectorMetadata,
    KVConnectorOutput,
    KVConnectorRole,
    KVTransferStats,
)
from lmserve.kv_transfer.slab_tier import SlabCPUTier
from lmserve.kv_transfer.store import DiskTier, RedisTier, TieredStore
from lmserve.model.loader import get_kv_cache_spec, get_num_kv_heads

if TYPE_CHECKING:
    from lmserve.config import EngineConfig
    from lmserve.request import Request

logger = logging.getLogger(__name__)

_GiB = 1 << 30
_LAYOUT = "layers,kv,tokens,heads,head_dim/v1"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


# ---- keys ------------------------------------------------------------------------------------
def model_fingerprint(config: EngineConfig) -> str:
    """The model's identity: its config (without paths and versions) and, per weight file,
    name, size and a digest of its first and last MiB. Same weights at another path give the
    same fingerprint; `model_id` in the options overrides it."""
    options = config.kv_transfer_config.options
    if options.model_id:
        return options.model_id
    mc = config.model_config
    hf = mc.hf_config.to_dict() if hasattr(mc.hf_config, "to_dict") else dict(vars(mc.hf_config))
    for volatile in ("_name_or_path", "transformers_version", "_commit_hash", "name_or_path"):
        hf.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(hf, sort_keys=True, default=str).encode())
    if mc.load_format == "dummy":
        digest.update(f"dummy-weights-seed-{mc.seed}".encode())
    else:
        for path in _weight_files(mc.model_path):
            digest.update(_file_digest(path))
    return digest.hexdigest()


def _weight_files(folder: str | None) -> list[str]:
    if not folder or not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if n.endswith(_WEIGHT_SUFFIXES))
    return [os.path.join(folder, n) for n in names]


def _file_digest(path: str, span: int = 1 << 20) -> bytes:
    size = os.path.getsize(path)
    digest = hashlib.sha256(f"{os.path.basename(path)}:{size}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(span))
        if size > span:
            f.seek(max(size - span, span))
            digest.update(f.read(span))
    return digest.digest()


def chain_root(config: EngineConfig, num_layers: int, num_kv_heads: int, head_dim: int) -> bytes:
    """Root of every chunk hash chain of this engine (all TP ranks share it)."""
    parts = {
        "model": model_fingerprint(config),
        "dtype": str(config.model_config.dtype),
        "layout": _LAYOUT,
        "num_layers": num_layers,
        "num_kv_heads": num_kv_heads,  # all ranks together
        "head_dim": head_dim,
        "tp_size": config.parallel_config.tensor_parallel_size,
        "chunk_size": config.kv_transfer_config.options.chunk_size,
    }
    return hashlib.sha256(b"lmserve-kv-v1" + json.dumps(parts, sort_keys=True).encode()).digest()


def extend_chunk_hashes(
    hashes: list[str], token_ids: list[int], chunk_size: int, root: bytes, salt: str | None
) -> None:
    """Append the chain hashes (hex) of the full chunks of `token_ids` not hashed yet."""
    for i in range(len(hashes), len(token_ids) // chunk_size):
        if i:
            parent = bytes.fromhex(hashes[i - 1])
        else:
            parent = root if not salt else hashlib.sha256(root + salt.encode()).digest()
        chunk = array("q", token_ids[i * chunk_size : (i + 1) * chunk_size]).tobytes()
        hashes.append(hashlib.sha256(parent + chunk).hexdigest())


def rank_key(chunk_hash: str, rank: int) -> str:
    """The store key of one rank's share of a chunk (64 hex characters)."""
    return hashlib.sha256(f"{chunk_hash}:rank{rank}".encode()).hexdigest()


def build_store(config: EngineConfig, with_cpu_tier: bool = True) -> TieredStore | None:
    """The tiers the options turn on, fastest first; None when none is left.
    `with_cpu_tier=False` for a scheduler that does not share a process with its workers (it
    sees only the shared tiers)."""
    options = config.kv_transfer_config.options
    tiers: list[Any] = []
    if with_cpu_tier and options.cpu_size_gib > 0:
        pinned = config.device_config.device == "cuda"  # the copy engines read it directly
        tiers.append(SlabCPUTier(int(options.cpu_size_gib * _GiB), pin=pinned))
    if options.disk_path:
        tiers.append(DiskTier(options.disk_path, int(options.disk_size_gib * _GiB)))
    if options.remote_url:
        tiers.append(RedisTier(options.remote_url, timeout_s=options.remote_timeout_s))
    return TieredStore(tiers) if tiers else None


# ---- the connector -------------------------------------------------------------------------
class TieredConnector(KVConnectorBase):
    """One class, either role (see lmserve/kv_transfer/base.py). With one worker in the
    EngineCore process, both halves share one store (`store=`), so the scheduler's lookups
    see the CPU tier; with several, the scheduler sees disk and Redis only."""

    def __init__(
        self,
        config: EngineConfig,
        role: KVConnectorRole,
        store: TieredStore | None = None,
        rank: int = 0,
    ) -> None:
        super().__init__(role)
        kv_config = config.kv_transfer_config
        self.loads, self.saves = kv_config.loads, kv_config.saves
        self.chunk_size = kv_config.options.chunk_size
        self.block_size = config.cache_config.block_size
        self.blocks_per_chunk = self.chunk_size // self.block_size
        self.tp_size = config.parallel_config.tensor_parallel_size
        self.rank = rank
        hf = config.model_config.hf_config
        num_layers, _, head_dim = get_kv_cache_spec(hf)
        self.root = chain_root(config, num_layers, get_num_kv_heads(hf), head_dim)
        if store is None and role == KVConnectorRole.WORKER:
            store = build_store(config)
        # None: a scheduler whose workers are in other processes and share no tier with it
        # (tensor parallelism with only the CPU tier) — chunks are saved, never looked up.
        self.store = store
        self._stats = KVTransferStats()
        self._stats_lock = threading.Lock()
        if role == KVConnectorRole.SCHEDULER:
            self._hashes: dict[str, list[str]] = {}  # req_id -> chunk chain hashes (hex)
            self._saved_chunks: dict[str, int] = {}  # req_id -> chunks saved or known stored
            self._pending_loads: list[ChunkTransfer] = []
            events = config.kv_events_config
            self._tier_events = _TierEvents(
                self.block_size, _cpu_tier_chunks(config, self.chunk_size)
            ) if events is not None and events.enable_kv_cache_events else None  # fmt: skip
        else:
            self._worker = _WorkerSide(self)

    # ---- scheduler side ---------------------------------------------------------------------
    def _chunk_hashes(self, request: Request) -> list[str]:
        hashes = self._hashes.setdefault(request.request_id, [])
        extend_chunk_hashes(
            hashes, request.all_token_ids, self.chunk_size, self.root, request.cache_salt
        )
        return hashes

    def _max_loadable_chunks(self, request: Request) -> int:
        """Chunks before the last known token (its logits must be computed)."""
        if request.sampling_params.prompt_logprobs is not None:
            return 0  # prompt logprobs need every prompt position computed
        return (request.num_tokens - 1) // self.chunk_size

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        max_chunks = self._max_loadable_chunks(request)
        if (
            self.store is None
            or not self.loads
            or max_chunks * self.chunk_size <= num_computed_tokens
        ):
            return 0, False
        hashes = self._chunk_hashes(request)[:max_chunks]
        first = num_computed_tokens // self.chunk_size  # chunks before it are on the GPU
        available = first + min(
            self.store.num_prefix_available([rank_key(h, r) for h in hashes[first:]])
            for r in self._lookup_ranks()
        )
        num_tokens = available * self.chunk_size - num_computed_tokens
        return (num_tokens, True) if num_tokens > 0 else (0, False)

    def _lookup_ranks(self) -> range:
        """Every rank's share must be there (all ranks load the same tokens)."""
        return range(self.tp_size)

    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        req_id, num_hit = request.request_id, request.num_computed_tokens
        if self.loads:
            max_tokens = self._max_loadable_chunks(request) * self.chunk_size
            self._add_stats(KVTransferStats(query_tokens=max(max_tokens - num_hit, 0)))
        end_chunk = (num_hit + num_external_tokens) // self.chunk_size
        self._saved_chunks[req_id] = max(self._saved_chunks.get(req_id, 0), end_chunk)
        if num_external_tokens <= 0:
            return
        first = num_hit // self.chunk_size
        bpc = self.blocks_per_chunk
        self._pending_loads.append(
            ChunkTransfer(
                req_id=req_id,
                chunk_hashes=self._chunk_hashes(request)[first:end_chunk],
                first_chunk=first,
                block_ids=block_ids[first * bpc : end_chunk * bpc],
                skip_tokens=num_hit - first * self.chunk_size,
            )
        )

    def build_connector_meta(
        self,
        scheduler_output: Any,
        requests: Mapping[str, Request],
        block_ids_of: Callable[[str], list[int]],
    ) -> KVConnectorMetadata:
        loads, self._pending_loads = self._pending_loads, []
        saves = []
        if self.saves:
            for req_id in scheduler_output.num_scheduled_tokens:
                transfer = self._chunks_to_save(requests[req_id], block_ids_of)
                if transfer is not None:
                    saves.append(transfer)
        return KVConnectorMetadata(loads=loads, saves=saves)

    def _chunks_to_save(
        self, request: Request, block_ids_of: Callable[[str], list[int]]
    ) -> ChunkTransfer | None:
        """Chunks whose KV is written by the end of this step (`num_computed_tokens` already
        counts it), of known tokens only (never a draft's), not saved yet."""
        req_id = request.request_id
        done = min(request.num_computed_tokens, request.num_tokens) // self.chunk_size
        saved = self._saved_chunks.get(req_id, 0)
        if done <= saved:
            return None
        self._saved_chunks[req_id] = done
        bpc = self.blocks_per_chunk
        if self._tier_events is not None:
            self._tier_events.will_save(request, self._chunk_hashes(request), saved, done, self)
        return ChunkTransfer(
            req_id=req_id,
            chunk_hashes=self._chunk_hashes(request)[saved:done],
            first_chunk=saved,
            block_ids=block_ids_of(req_id)[saved * bpc : done * bpc],
        )

    def tier_events(self, output: KVConnectorOutput) -> list:
        if self._tier_events is None:
            return []
        return self._tier_events.events(output.tier_changes)

    def request_finished(self, request: Request) -> None:
        self._hashes.pop(request.request_id, None)
        self._saved_chunks.pop(request.request_id, None)

    def take_stats(self) -> KVTransferStats | None:
        with self._stats_lock:
            stats, self._stats = self._stats, KVTransferStats()
        return None if stats.is_empty() else stats

    def _add_stats(self, stats: KVTransferStats) -> None:
        with self._stats_lock:
            self._stats.add(stats)

    # ---- worker side ------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._worker.kv_caches = kv_caches
        self._worker.kv_pool = kv_pool(kv_caches)
        slab = self._worker.slab
        if slab is not None and self.rank == 0:  # the scheduler hears the first rank
            slab.track_changes()
        if slab is not None and slab.slot_bytes is None:
            start = time.perf_counter()
            slab.preallocate(self._worker.chunk_bytes)
            logger.info(
                "KV connector CPU tier: %d chunks of %.1f MiB (%s) allocated in %.2f s",
                slab.capacity_bytes // slab.slot_bytes, slab.slot_bytes / (1 << 20),
                "pinned" if slab.pin else "pageable", time.perf_counter() - start,
            )  # fmt: skip

    def start_load_kv(self, metadata: KVConnectorMetadata) -> None:
        self._worker.start(metadata)

    def wait_for_save(self) -> None:
        self._worker.save_pending()

    def flush(self) -> None:
        """Wait until the saves so far are stored, in every tier (tests, benchmarks)."""
        if self.role == KVConnectorRole.WORKER:
            self._worker.flush()
        if self.store is not None:
            self.store.flush()

    def get_finished(self) -> KVConnectorOutput:
        finished = self._worker.take_finished()
        stats = self._worker_stats()
        slab = self._worker.slab
        changes = slab.take_changes() if slab is not None else []
        return KVConnectorOutput(finished_loading=finished, stats=stats, tier_changes=changes)

    def _worker_stats(self) -> KVTransferStats | None:
        store = self.store.stats.take()
        stats = self.take_stats() or KVTransferStats()
        stats.add(
            KVTransferStats(
                bytes_loaded=dict(store.bytes_loaded),
                seconds_loaded=dict(store.seconds_loaded),
                bytes_saved=dict(store.bytes_saved),
                seconds_saved=dict(store.seconds_saved),
                failures={f"{tier}:{reason}": n for (tier, reason), n in store.failures.items()},
            )
        )
        return None if stats.is_empty() else stats

    def shutdown(self) -> None:
        if self.role == KVConnectorRole.WORKER:
            self._worker.shutdown()
        if self.store is not None:
            self.store.close()


class _TierEvents:
    """KV events for the CPU tier: the blocks of each chunk the scheduler has saved, kept by
    store key, published as `BlockStored(medium="CPU")` when the worker reports the chunk in
    its slots and `BlockRemoved(medium="CPU")` when it reports the chunk evicted. Keeps at most
    `capacity` chunks (about twice the tier's slots: the oldest are forgotten)."""

    def __init__(self, block_size: int, capacity: int) -> None:
        self.block_size = block_size
        self.capacity = capacity
        self.chunks: OrderedDict[str, BlockStored] = OrderedDict()
        self.published: set[str] = set()

    def will_save(
        self, request: Request, chunk_hashes: list[str], first: int, end: int, c: TieredConnector
    ) -> None:
        bpc, hashes = c.blocks_per_chunk, request.block_hashes
        for j in range(first, min(end, len(hashes) // bpc)):
            key = rank_key(chunk_hashes[j], 0)
            self.chunks[key] = BlockStored(
                block_hashes=hashes[j * bpc : (j + 1) * bpc],
                parent_block_hash=hashes[j * bpc - 1] if j else None,
                token_ids=request.all_token_ids[j * c.chunk_size : (j + 1) * c.chunk_size],
                block_size=self.block_size,
                medium=MEDIUM_CPU,
            )
            self.chunks.move_to_end(key)
        while len(self.chunks) > self.capacity:
            key, _ = self.chunks.popitem(last=False)
            self.published.discard(key)

    def events(self, changes: list[tuple[bool, str]]) -> list[BlockStored | BlockRemoved]:
        out: list[BlockStored | BlockRemoved] = []
        for stored, key in changes:
            event = self.chunks.get(key)
            if event is None:
                continue
            if stored and key not in self.published:
                self.published.add(key)
                out.append(event)
            elif not stored and key in self.published:
                self.published.discard(key)
                del self.chunks[key]
                out.append(BlockRemoved(event.block_hashes, medium=MEDIUM_CPU))
        return out


def _cpu_tier_chunks(config: EngineConfig, chunk_size: int) -> int:
    """About twice the chunks the CPU tier holds (at least 1024): how many _TierEvents keeps."""
    num_layers, num_kv_heads, head_dim = get_kv_cache_spec(config.model_config.hf_config)
    element = torch.empty((), dtype=config.model_config.dtype).element_size()
    chunk_bytes = num_layers * 2 * chunk_size * num_kv_heads * head_dim * element
    slots = int(config.kv_transfer_config.options.cpu_size_gib * _GiB) // chunk_bytes
    return max(2 * slots, 1024)


def kv_pool(kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """The one tensor [num_layers, 2, num_blocks, ...] whose [layer, 0] and [layer, 1] views
    are `kv_caches`, or None when the caches are separate tensors."""
    if not kv_caches:
        return None
    base = kv_caches[0][0]._base
    if base is None or base.dim() != kv_caches[0][0].dim() + 2:
        return None
    if tuple(base.shape[:2]) != (len(kv_caches), 2) or not base.is_contiguous():
        return None
    for layer, pair in enumerate(kv_caches):
        for kind, cache in enumerate(pair):
            view = base[layer, kind]
            if cache.data_ptr() != view.data_ptr() or cache.shape != view.shape:
                return None
    return base


def _stored_locally(store: TieredStore, key: str) -> bool:
    """In a tier of this machine (CPU or disk): saving it again would only rewrite it."""
    return any(tier.contains(key) for tier in store.tiers if not isinstance(tier, RedisTier))


class _WorkerSide:
    """The worker half's moving parts: the load threads and the save copies."""

    def __init__(self, connector: TieredConnector) -> None:
        self.connector = connector
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        # [num_layers, 2, num_blocks, block_size, heads, head_dim] when every layer's caches
        # are views of one tensor (the model runner's layout): then one indexed copy moves a
        # chunk of every layer; else two copies per layer.
        self.kv_pool: torch.Tensor | None = None
        # One load thread: it alone uses the load stream and the staging buffers.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-load")
        self.saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-save")
        self.loading: dict[str, Future] = {}
        self.pending_saves: list[ChunkTransfer] = []
        self._save_stream: torch.cuda.Stream | None = None  # the saver thread's
        self._load_stream: torch.cuda.Stream | None = None  # the load thread's
        self._staging: list[torch.Tensor] = []  # the load thread's device buffers

    @property
    def device(self) -> torch.device:
        return self.kv_caches[0][0].device

    def start(self, metadata: KVConnectorMetadata) -> None:
        self.pending_saves = list(metadata.saves)
        if not metadata.loads:
            return
        # NOTE the blocks of a load may have belonged, until this step's schedule, to a request
        # that a step still queued on the device writes: the copies start after it.
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        for transfer in metadata.loads:
            self.loading[transfer.req_id] = self.pool.submit(self._load, transfer, ready)

    def flush(self) -> None:
        """Wait until every save handed to the saver thread is in the store."""
        self.saver.submit(lambda: None).result()

    def take_finished(self) -> dict[str, int]:
        done = {req_id: f for req_id, f in self.loading.items() if f.done()}
        for req_id in done:
            del self.loading[req_id]
        return {req_id: _load_result(req_id, f) for req_id, f in done.items()}

    # ---- loading (a worker thread) ----------------------------------------------------------
    def _load(self, transfer: ChunkTransfer, ready: torch.cuda.Event | None) -> int:
        """Fetch the chunks in order, stop at the first missing or bad one, copy the ones that
        arrived into their blocks. Returns the tokens loaded after `skip_tokens`."""
        c = self.connector
        sources: list[_Source] = []
        try:
            for chunk_hash in transfer.chunk_hashes:
                source = self._fetch(rank_key(chunk_hash, c.rank))
                if source is None:
                    break
                sources.append(source)
            if sources:
                start = time.perf_counter()
                self._write_blocks(transfer, [s.data for s in sources], ready)
                per_chunk = (time.perf_counter() - start) / len(sources)
        finally:
            for source in sources:
                if source.slot is not None:
                    self.slab.release(source.slot)
        hits: dict[str, int] = {}
        seconds: dict[str, float] = {}  # the copies into the blocks, split over the chunks
        for j, source in enumerate(sources):
            skipped = transfer.skip_tokens if j == 0 else 0
            hits[source.tier] = hits.get(source.tier, 0) + c.chunk_size - skipped
            seconds[source.tier] = seconds.get(source.tier, 0.0) + per_chunk
        if hits:
            c._add_stats(KVTransferStats(hit_tokens=hits, seconds_loaded=seconds))
        return max(len(sources) * c.chunk_size - transfer.skip_tokens, 0)

    def _fetch(self, key: str) -> _Source | None:
        """The chunk from the CPU slots (held until released), else from the slower tiers
        (which promote it into the slots)."""
        if self.slab is not None:
            held = self.slab.acquire(key)
            if held is not None:
                return _Source(held[1], "cpu", held[0])
        payload, tier = self.connector.store.get(key)
        if payload is None:
            return None
        if len(payload) != self.chunk_bytes:
            self.connector._add_stats(KVTransferStats(failures={f"{tier}:size": 1}))
            return None
        with warnings.catch_warnings():  # read-only bytes, only read from
            warnings.simplefilter("ignore", UserWarning)
            return _Source(torch.frombuffer(payload, dtype=torch.uint8), tier, None)

    @property
    def slab(self) -> SlabCPUTier | None:
        tiers = self.connector.store.tiers
        return tiers[0] if isinstance(tiers[0], SlabCPUTier) else None

    @property
    def chunk_bytes(self) -> int:
        key_cache = self.kv_caches[0][0]
        num_layers = len(self.kv_caches)
        per_token = key_cache.shape[2] * key_cache.shape[3] * key_cache.element_size()
        return num_layers * 2 * self.connector.chunk_size * per_token

    def _write_blocks(
        self, transfer: ChunkTransfer, chunks: list[torch.Tensor], ready: torch.cuda.Event | None
    ) -> None:
        """Copy the chunks (flat uint8, host) into the request's blocks — on the GPU from the
        load stream, after `ready` — skipping the blocks the GPU prefix cache already held."""
        if ready is None:
            self._copy_chunks_in(transfer, chunks)
        else:
            stream = self._load_stream = self._load_stream or torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                self._copy_chunks_in(transfer, chunks)
            stream.synchronize()

    def _copy_chunks_in(self, transfer: ChunkTransfer, chunks: list[torch.Tensor]) -> None:
        """Chunk by chunk: one host->device copy into a staging buffer (reused: the load thread
        is the only user of its stream and buffers), then one indexed copy into the blocks of
        every layer (or one per layer and kind when the caches are separate tensors)."""
        c = self.connector
        bpc = c.blocks_per_chunk
        first_block = transfer.skip_tokens // c.block_size  # already in the GPU pool
        staging = self._staging_buffers()
        for j, chunk in enumerate(chunks):
            lo = max(first_block - j * bpc, 0)
            if lo >= bpc:
                continue
            if self.device.type == "cuda":
                buffer = staging[j % len(staging)]
                buffer.copy_(chunk, non_blocking=True)
            else:
                buffer = chunk
            blocks = self._chunk_view(buffer)[:, :, lo:]  # [layers, 2, blocks, bs, heads, dim]
            ids = transfer.block_ids[j * bpc + lo : (j + 1) * bpc]
            index = torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)
            if self.kv_pool is not None:
                self.kv_pool[:, :, index] = blocks
                continue
            for layer, (k_cache, v_cache) in enumerate(self.kv_caches):
                k_cache.index_copy_(0, index, blocks[layer, 0])
                v_cache.index_copy_(0, index, blocks[layer, 1])

    def _staging_buffers(self) -> list[torch.Tensor]:
        """Two chunk-sized device buffers, made once on the load stream (GPU only)."""
        if self.device.type == "cuda" and not self._staging:
            self._staging = list(
                torch.empty((2, self.chunk_bytes), dtype=torch.uint8, device=self.device)
            )
        return self._staging

    def _chunk_view(self, flat: torch.Tensor) -> torch.Tensor:
        """A flat uint8 chunk as [num_layers, 2, blocks_per_chunk, block_size, heads, head_dim]."""
        key_cache = self.kv_caches[0][0]
        c = self.connector
        return flat.view(key_cache.dtype).view(
            len(self.kv_caches), 2, c.blocks_per_chunk, c.block_size, *key_cache.shape[2:]
        )

    # ---- saving (after the forward) ---------------------------------------------------------
    def save_pending(self) -> None:
        """Gather every chunk to save this step on the device now, in stream order (no later
        step can overwrite their blocks first), then copy them into CPU slots and on to the
        slower tiers off the critical path (on the GPU: from the saver thread)."""
        transfers, self.pending_saves = self.pending_saves, []
        c = self.connector
        keys, block_ids = [], []
        for transfer in transfers:
            for j, chunk_hash in enumerate(transfer.chunk_hashes):
                key = rank_key(chunk_hash, c.rank)
                if not _stored_locally(c.store, key):
                    keys.append(key)
                    block_ids += transfer.block_ids[
                        j * c.blocks_per_chunk : (j + 1) * c.blocks_per_chunk
                    ]
        if not keys:
            return
        index = torch.tensor(block_ids, dtype=torch.long).to(self.device, non_blocking=True)
        # [num_chunks, num_layers, 2, blocks_per_chunk, block_size, num_kv_heads, head_dim]
        gathered = self._gather(index).unflatten(2, (len(keys), c.blocks_per_chunk))
        gathered = gathered.movedim(2, 0).contiguous()
        if self.device.type != "cuda":
            self._store_chunks(keys, gathered, None)
            return
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self.saver.submit(self._store_chunks_logged, keys, gathered, done)

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        """The blocks `index` of every layer: [num_layers, 2, len(index), block_size, heads,
        head_dim] -- one indexed read from the pool, or two per layer."""
        if self.kv_pool is not None:
            return self.kv_pool[:, :, index]
        return torch.stack(
            [torch.stack((k.index_select(0, index), v.index_select(0, index)))
             for k, v in self.kv_caches]
        )  # fmt: skip

    def _store_chunks_logged(self, *args) -> None:
        """The saver thread's task: a failure is a counted, logged miss, never silent."""
        try:
            self._store_chunks(*args)
        except Exception:  # noqa: BLE001 - the chunks are simply not stored
            logger.exception("KV connector: saving %d chunk(s) failed", len(args[0]))
            self.connector._add_stats(KVTransferStats(failures={"cpu:save_error": len(args[0])}))

    def _store_chunks(
        self, keys: list[str], chunks: torch.Tensor, gathered: torch.cuda.Event | None
    ) -> None:
        """chunks: [num_chunks, ...one chunk...] contiguous, on the CPU or the GPU."""
        start = time.perf_counter()
        flat = chunks.view(len(keys), -1).view(torch.uint8)  # [num_chunks, chunk_bytes]
        reserved: list[tuple[str, int, torch.Tensor]] = []
        if gathered is None:
            self._copy_to_slots(keys, flat, reserved)
        else:
            stream = self._save_stream = self._save_stream or torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream):
                stream.wait_event(gathered)
                self._copy_to_slots(keys, flat, reserved)
            stream.synchronize()
        if self.slab is None or len(self.connector.store.tiers) > 1:
            # Before the commit: until then no other thread can reuse the slots.
            self._put_in_slower_tiers(keys, flat, reserved)
        seconds = time.perf_counter() - start
        for key, slot, _ in reserved:
            self.slab.commit(key, slot, seconds / len(reserved))

    def _copy_to_slots(self, keys: list[str], flat: torch.Tensor, reserved: list) -> None:
        if self.slab is None:
            return
        for key, chunk in zip(keys, flat):
            held = self.slab.reserve(key, chunk.numel())
            if held is not None:
                held[1].copy_(chunk, non_blocking=True)
                reserved.append((key, *held))

    def _put_in_slower_tiers(self, keys: list[str], flat: torch.Tensor, reserved: list) -> None:
        """Disk and Redis take bytes, written by the store's writer thread."""
        in_slots = {key: view for key, _, view in reserved}
        for key, chunk in zip(keys, flat):
            host = in_slots.get(key)
            if host is None:
                host = chunk.cpu()
            self.connector.store.put(key, host.numpy().tobytes())

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
        self.saver.shutdown(wait=True)


class _Source(NamedTuple):
    """One chunk to load: its bytes on the host (flat uint8), the tier it came from, and the
    CPU slot it sits in (held until the copy is done), if any."""

    data: torch.Tensor
    tier: str
    slot: int | None


def _load_result(req_id: str, future: Future) -> int:
    try:
        return future.result()
    except Exception:  # noqa: BLE001 - a failed load is a miss: recompute, keep serving
        logger.exception("KV load for request %s failed; its tokens are recomputed", req_id)
        return 0


def make_kv_connector(
    config: EngineConfig,
    role: KVConnectorRole,
    store: TieredStore | None = None,
    rank: int = 0,
) -> KVConnectorBase | None:
    """The connector `config.kv_transfer_config` names, or None without one."""
    if config.kv_transfer_config is None:
        return None
    start = time.perf_counter()
    connector = TieredConnector(config, role, store=store, rank=rank)
    logger.info(
        "KV connector %s (%s, rank %d): tiers %s, chunk %d tokens, ready in %.2f s",
        config.kv_transfer_config.kv_connector,
        role.value,
        rank,
        [t.name for t in connector.store.tiers] if connector.store is not None else "none here",
        connector.chunk_size,
        time.perf_counter() - start,
    )
    return connector
