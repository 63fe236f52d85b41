"""KV cache events in vLLM's wire format, so existing indexers (llm-d, Dynamo, our router) read
what each engine's prefix cache really holds.

    --kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
                         "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558",
                         "topic": "kv"}'

PUB socket, one message per engine step that changed the cache:
    frames (topic, 8-byte big-endian sequence number, msgpack payload)
    payload = [timestamp, [event, ...], data_parallel_rank]
    event   = ["BlockStored", [block_hash, ...], parent_block_hash, [token_ids], block_size,
               lora_id, medium]
            | ["BlockRemoved", [block_hash, ...], medium]
            | ["AllBlocksCleared"]
With `"event_format": "map"` each event is instead a map in vLLM 0.26's layout:
    {"type": "BlockStored", "block_hashes": [...], "parent_block_hash": ..., "token_ids": [...],
     "block_size": ..., "lora_id": nil, "medium": ..., "lora_name": nil}
    {"type": "BlockRemoved", "block_hashes": [...], "medium": ...}   {"type": "AllBlocksCleared"}
A BlockStored covers a run of consecutive blocks of one request (its tokens, the parent of its
first block), as vLLM's block pool sends them; a BlockRemoved the blocks evicted together.
Block hashes are the prefix cache's (sha256 chains from a fixed root: the same on every
process and machine). ROUTER replay socket: a client sends the 8-byte big-endian sequence
number to start from; every buffered batch from there comes back as (empty, topic, seq,
payload), then (empty, empty, seq -1, empty) ends the replay: vLLM 0.26's frames.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from lmserve.config import KVEventsConfig

logger = logging.getLogger(__name__)

MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"  # a KV connector's host-memory tier (lmserve/kv_transfer/slab_tier.py)
_END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)


class BlockStored(msgspec.Struct, tag=True, array_like=True):
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU


class BlockRemoved(msgspec.Struct, tag=True, array_like=True):
    block_hashes: list[bytes]
    medium: str | None = MEDIUM_GPU


class AllBlocksCleared(msgspec.Struct, tag=True, array_like=True):
    pass


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


def stored_runs(
    hashes: list[bytes], token_ids: list[int], block_size: int, stored: list[int]
) -> list[BlockStored]:
    """One BlockStored per run of consecutive block indices in `stored` (ascending) of a
    request with block `hashes` and `token_ids`: vLLM's wire shape, one event per newly
    cached run rather than per block."""
    events: list[BlockStored] = []
    start = 0
    for k in range(1, len(stored) + 1):
        if k < len(stored) and stored[k] == stored[k - 1] + 1:
            continue
        a, b = stored[start], stored[k - 1] + 1
        events.append(
            BlockStored(
                hashes[a:b],
                hashes[a - 1] if a else None,
                token_ids[a * block_size : b * block_size],
                block_size,
            )
        )
        start = k
    return events


class _StoredMap(msgspec.Struct, tag="BlockStored", omit_defaults=True):
    """vLLM 0.26's BlockStored (a map; its later optional fields omitted when unset)."""

    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class _RemovedMap(msgspec.Struct, tag="BlockRemoved", omit_defaults=True):
    block_hashes: list[bytes]
    medium: str | None


class _ClearedMap(msgspec.Struct, tag="AllBlocksCleared", omit_defaults=True):
    pass


def as_map_event(event: KVCacheEvent) -> _StoredMap | _RemovedMap | _ClearedMap:
    """The same event in vLLM 0.26's map layout."""
    if isinstance(event, BlockStored):
        return _StoredMap(
            event.block_hashes, event.parent_block_hash, event.token_ids, event.block_size,
            event.lora_id, event.medium, None,
        )  # fmt: skip
    if isinstance(event, BlockRemoved):
        return _RemovedMap(event.block_hashes, event.medium)
    return _ClearedMap()


class KVEventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[KVCacheEvent]
    data_parallel_rank: int | None = None


class ZmqEventPublisher:
    """Publishes batches from a thread of its own (the engine's step never waits on a
    socket); keeps the last `buffer_steps` batches for the replay socket."""

    def __init__(self, config: KVEventsConfig) -> None:
        import zmq

        self.config = config
        self._context = zmq.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._pub.bind(config.endpoint)
        self._replay = None
        if config.replay_endpoint:
            self._replay = self._context.socket(zmq.ROUTER)
            self._replay.bind(config.replay_endpoint)
        self._topic = config.topic.encode()
        self._encoder = msgspec.msgpack.Encoder()
        self._queue: queue.Queue[KVEventBatch | None] = queue.Queue()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    def publish(self, batch: KVEventBatch) -> None:
        self._queue.put(batch)

    def shutdown(self, timeout_s: float = 2.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)
        self._context.destroy(linger=0)

    def _run(self) -> None:
        while True:
            self._serve_replays()
            try:
                batch = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if batch is None:
                return
            if self.config.event_format == "map":
                batch = KVEventBatch(batch.ts, [as_map_event(e) for e in batch.events])
            payload = self._encoder.encode(batch)
            seq = self._seq.to_bytes(8, "big")
            self._pub.send_multipart((self._topic, seq, payload))
            self._buffer.append((self._seq, payload))
            self._seq += 1

    def _serve_replays(self) -> None:
        if self._replay is None:
            return
        import zmq

        while self._replay.poll(0):
            frames = self._replay.recv_multipart()
            identity, start = frames[0], int.from_bytes(frames[-1], "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    frames = (identity, b"", self._topic, seq.to_bytes(8, "big"), payload)
                    self._replay.send_multipart(frames)
            self._replay.send_multipart((identity, b"", b"", _END_OF_REPLAY, b""), zmq.NOBLOCK)


def make_publisher(config: KVEventsConfig | None) -> ZmqEventPublisher | None:
    if config is None or not config.enable_kv_cache_events or config.publisher == "null":
        return None
    start = time.perf_counter()
    publisher = ZmqEventPublisher(config)
    logger.info(
        "KV events on %s (replay %s) in %.2f s",
        config.endpoint,
        config.replay_endpoint,
        time.perf_counter() - start,
    )
    return publisher
