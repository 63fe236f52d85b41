"""Subscribing to every engine's KV events and keeping the KVIndex exact.

One `EventSubscriber` per backend, on the router's event loop (zmq.asyncio):

    SUB  tcp://engine:5557   frames (topic, 8-byte big-endian seq, msgpack batch)
    DEALER tcp://engine:5558 replay: send the first seq wanted; get (empty, [topic,] seq,
                             batch)..., then seq -1 (seq and batch are the last two frames)

Sequence numbers make the index exact:
  - the first contact replays from 0 (the router may start after the engines filled their
    caches; a PUB socket drops what was sent before it connected);
  - a jump (seq > last + 1: the PUB socket dropped messages) replays the missed range; what the
    engine's buffer no longer holds is counted as dropped;
  - a seq at or below the last one means the engine restarted (its counter starts at 0 again):
    its entries are cleared, as they are when the backend leaves the pool;
  - a backend that fails its health checks is cleared (a dead engine lost its cache); when it
    passes again the index is rebuilt from its replay buffer (the same engine's, or a
    restarted one's).
An engine that publishes nothing (no endpoint, or none heard yet) is not `live`: the kv-aware
logic then falls back to prefix-aware routing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import zmq
import zmq.asyncio

from lmserve.router.backends import Backend, BackendPool
from lmserve.router.kv_index import KVIndex
from lmserve.router.metrics import RouterMetrics

logger = logging.getLogger(__name__)

_END_OF_REPLAY = -1


@dataclass(frozen=True, slots=True)
class EventEndpoints:
    pub: str  # tcp://host:port of the engine's PUB socket
    replay: str | None = None  # its ROUTER replay socket


class EventSubscriber:
    def __init__(
        self,
        url: str,
        endpoints: EventEndpoints,
        index: KVIndex,
        metrics: RouterMetrics,
        context: zmq.asyncio.Context,
        topic: str = "",
        replay_timeout_s: float = 2.0,
    ) -> None:
        self.url = url
        self.endpoints = endpoints
        self.index = index
        self.metrics = metrics
        self.context = context
        self.topic = topic.encode()
        self.replay_timeout_s = replay_timeout_s
        self.last_seq: int | None = None  # of the last batch applied
        self.live = False  # heard from the engine (an event, or a replay answer)
        self._lock = asyncio.Lock()  # one of on_batch / resync at a time

    async def run(self) -> None:
        sub = self.context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(self.endpoints.pub)
        try:
            await self.resync(replay=True)
            while True:
                frames = await sub.recv_multipart()
                if len(frames) != 3:
                    logger.warning("KV events from %s: %d frames, not 3", self.url, len(frames))
                    continue
                await self.on_batch(int.from_bytes(frames[1], "big", signed=True), frames[2])
        finally:
            sub.close()

    async def resync(self, replay: bool) -> None:
        """Forget what the index says of this engine; with `replay`, rebuild it from the
        engine's replay buffer."""
        async with self._lock:
            self.index.clear(self.url)
            self.last_seq = None
            if replay:
                await self._replay_from(0)

    async def on_batch(self, seq: int, payload: bytes) -> None:
        async with self._lock:
            await self._on_batch(seq, payload)

    async def _on_batch(self, seq: int, payload: bytes) -> None:
        self.live = True
        if self.last_seq is not None and seq <= self.last_seq:
            logger.info(
                "KV events from %s restarted at seq %d: clearing its entries", self.url, seq
            )
            self.index.clear(self.url)
            self.metrics.kv_events_restarts.labels(self.url).inc()
            self.last_seq = None
        expected = 0 if self.last_seq is None else self.last_seq + 1
        if seq > expected:
            await self._replay_from(expected)
            if self.last_seq is not None and seq <= self.last_seq:
                return  # the replay brought it already
        self.apply(seq, payload)

    def apply(self, seq: int, payload: bytes, live: bool = True) -> None:
        """Apply batch `seq`; batches skipped before it are lost (counted as dropped). The
        lag is observed for `live` batches only: a replayed one is old by design."""
        expected = 0 if self.last_seq is None else self.last_seq + 1
        if seq > expected:
            self.metrics.kv_events_dropped.labels(self.url).inc(seq - expected)
        try:
            stats = self.index.apply(self.url, payload)
            if live and stats.timestamp:
                self.metrics.kv_event_lag.observe(max(0.0, time.time() - stats.timestamp))
        except ValueError as e:
            logger.warning("KV events from %s, seq %d: %s", self.url, seq, e)
        self.last_seq = seq
        self.metrics.kv_events.labels(self.url).inc()

    async def _replay_from(self, start: int) -> None:
        """Ask the engine's replay socket for every buffered batch from `start` and apply the
        ones newer than what the index has."""
        if self.endpoints.replay is None:
            return
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoints.replay)
        replayed = 0
        try:
            await sock.send_multipart((b"", start.to_bytes(8, "big", signed=True)))
            while True:
                frames = await asyncio.wait_for(sock.recv_multipart(), self.replay_timeout_s)
                seq = int.from_bytes(frames[-2], "big", signed=True)
                if seq == _END_OF_REPLAY:
                    self.live = True
                    break
                if self.last_seq is None or seq > self.last_seq:
                    self.apply(seq, frames[-1], live=False)
                    replayed += 1
        except asyncio.TimeoutError:
            logger.warning("KV event replay from %s timed out", self.endpoints.replay)
        finally:
            sock.close()
        if replayed:
            self.metrics.kv_events_replayed.labels(self.url).inc(replayed)


class KVEventSubscriptions:
    """Starts a subscriber for each backend that joins the pool (when `endpoints_for` names its
    sockets) and stops it, clearing the backend's entries, when it leaves."""

    def __init__(
        self,
        index: KVIndex,
        metrics: RouterMetrics,
        endpoints_for: Callable[[str], EventEndpoints | None],
        spawn: Callable[[object], asyncio.Task],
        topic: str = "",
    ) -> None:
        self.index = index
        self.metrics = metrics
        self.endpoints_for = endpoints_for
        self.spawn = spawn
        self.topic = topic
        self.context = zmq.asyncio.Context()
        self.subscribers: dict[str, EventSubscriber] = {}
        self._tasks: dict[str, asyncio.Task] = {}

    def attach(self, pool: BackendPool) -> None:
        pool.on_added.append(self.added)
        pool.on_removed.append(self.removed)
        for backend in pool:
            self.added(backend)

    def live(self, url: str) -> bool:
        subscriber = self.subscribers.get(url)
        return subscriber is not None and subscriber.live

    def added(self, backend: Backend) -> None:
        endpoints = self.endpoints_for(backend.url)
        if endpoints is None or backend.url in self.subscribers:
            return
        subscriber = EventSubscriber(
            backend.url, endpoints, self.index, self.metrics, self.context, self.topic
        )
        self.subscribers[backend.url] = subscriber
        self._tasks[backend.url] = self.spawn(subscriber.run())

    def health_changed(self, backend: Backend, healthy: bool) -> None:
        subscriber = self.subscribers.get(backend.url)
        if subscriber is not None:
            self.spawn(subscriber.resync(replay=healthy))

    def removed(self, backend: Backend) -> None:
        self.subscribers.pop(backend.url, None)
        task = self._tasks.pop(backend.url, None)
        if task is not None:
            task.cancel()
        self.index.clear(backend.url)

    def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self.context.destroy(linger=0)


def static_endpoints(
    backends: tuple[str, ...], pubs: tuple[str, ...], replays: tuple[str, ...]
) -> dict[str, EventEndpoints]:
    """--backends matched with --kv-events-endpoints (and --kv-events-replay-endpoints), in
    order; `host` in an endpoint may be `*`, meaning the backend's own host."""
    from lmserve.router.backends import normalize_url

    if len(pubs) != len(backends):
        raise ValueError(
            f"--kv-events-endpoints names {len(pubs)} endpoint(s) for {len(backends)} backend(s):"
            " give one per backend, in the same order"
        )
    if replays and len(replays) != len(backends):
        raise ValueError(
            f"--kv-events-replay-endpoints names {len(replays)} endpoint(s) for "
            f"{len(backends)} backend(s): give one per backend, in the same order"
        )
    found = {}
    for i, url in enumerate(backends):
        url = normalize_url(url)
        host = urlparse(url).hostname or "127.0.0.1"
        pub = _endpoint(pubs[i], host, "--kv-events-endpoints")
        replay = _endpoint(replays[i], host, "--kv-events-replay-endpoints") if replays else None
        found[url] = EventEndpoints(pub, replay)
    return found


def pod_endpoints(url: str, port: int, replay_port: int | None) -> EventEndpoints:
    """The sockets of a discovered pod: its address with the configured ports."""
    host = urlparse(url).hostname
    replay = f"tcp://{host}:{replay_port}" if replay_port else None
    return EventEndpoints(f"tcp://{host}:{port}", replay)


def _endpoint(value: str, host: str, flag: str) -> str:
    value = value.strip()
    parsed = urlparse(value if "://" in value else f"tcp://{value}")
    if parsed.scheme != "tcp" or parsed.port is None:
        raise ValueError(f"{flag}: {value!r} is not tcp://HOST:PORT")
    return f"tcp://{host if parsed.hostname in (None, '*') else parsed.hostname}:{parsed.port}"
