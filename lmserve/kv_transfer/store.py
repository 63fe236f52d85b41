"""Storage tiers behind the KV-cache offloading connector: bytes in, bytes out.

A *chunk* is the KV of 256 consecutive tokens of one request, for all layers, as one opaque
`bytes` payload (hundreds of KB to a few MB). Its key is a hex string (a sha256 the caller
makes) that is safe as a file name and as a Redis key suffix. A key's payload is written once
and never changes, so a key present in a tier is never rewritten there.

Tiers, fastest first (`TieredStore` takes any of them, in this order):

- the CPU tier: chunk-sized slots of host memory, pinned on CUDA (`slab_tier.py`).
- `DiskTier`: one file per chunk, `<path>/<key>.kv`, LRU under a size cap. The index is
  rebuilt from the folder at start-up (oldest mtime first), so the chunks survive a restart.
- `RedisTier`: a shared Redis (redis-py), one string value per chunk.

`TieredStore.get` looks in tier order and promotes a hit into every faster tier;
`TieredStore.put` stores into the CPU tier in the caller's thread and hands the slower tiers
to one background writer thread through a bounded queue (full -> the write is dropped).

File framing (disk files and Redis values alike; integers little-endian)::

    0      4        6         8                16                          32
    +------+--------+---------+----------------+---------------------------+---------
    | LMKV | version| reserved| payload length |  xxh3_128(payload) digest | payload
    | magic|  u16   |   u16   |      u64       |         16 bytes          | ...
    +------+--------+---------+----------------+---------------------------+---------

Fault rules: a fault is a miss, and the caller recomputes; nothing raises. A frame whose
magic, version, length or checksum does not match is deleted and counted as a failure
(`corrupt`, or `truncated` when shorter than its header says); a failed write is counted
(`write_error`, `queue_full`, ...) and dropped; a Redis that errs is counted (`unreachable`,
`timeout`, `error`) and, after a connection error or timeout, skipped for `retry_after_s`.
Failures are counted per (tier, reason) in `StoreStats` and logged at most once per
(tier, reason) per 10 s. Disk writes go to a temporary name and are `os.replace`d, so a crash
never leaves a half file under a real name; they are not fsynced (a file the OS lost part of
fails its checksum and reads as a miss).
"""

from __future__ import annotations

import logging
import os
import queue
import re
import struct
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from typing import ClassVar, TypeVar

import redis
import xxhash
from redis.backoff import NoBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

T = TypeVar("T")

_MAGIC = b"LMKV"
_VERSION = 1
_HEADER = struct.Struct("<4sHHQ16s")  # magic, version, reserved, payload length, digest
HEADER_SIZE = _HEADER.size  # 32
_SUFFIX = ".kv"
_TMP_SUFFIX = ".tmp"
_SAFE_KEY = re.compile(r"[0-9A-Za-z_-]{1,200}")

# ----------------------------------------------------------------------------------- framing


class FrameError(Exception):
    """A frame failed verification; `reason` is "corrupt" or "truncated"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def frame_header(payload: bytes) -> bytes:
    """The 32-byte header that precedes `payload` in a file or a Redis value."""
    return _HEADER.pack(_MAGIC, _VERSION, 0, len(payload), xxhash.xxh3_128_digest(payload))


def parse_header(header: bytes) -> tuple[int, bytes]:
    """(payload length, digest) from a header; raises FrameError."""
    if len(header) < HEADER_SIZE:
        raise FrameError("truncated" if _MAGIC.startswith(header[: len(_MAGIC)]) else "corrupt")
    magic, version, _reserved, length, digest = _HEADER.unpack_from(header)
    if magic != _MAGIC or version != _VERSION:
        raise FrameError("corrupt")
    return length, digest


def check_payload(payload: bytes, length: int, digest: bytes) -> None:
    """Raises FrameError unless `payload` has the header's length and checksum."""
    if len(payload) < length:
        raise FrameError("truncated")
    if len(payload) > length or xxhash.xxh3_128_digest(payload) != digest:
        raise FrameError("corrupt")


def frame(payload: bytes) -> bytes:
    return frame_header(payload) + payload


def unframe(data: bytes) -> bytes:
    """The payload of a framed value; raises FrameError."""
    length, digest = parse_header(data[:HEADER_SIZE])
    payload = data[HEADER_SIZE:]
    check_payload(payload, length, digest)
    return payload


# ------------------------------------------------------------------------- stats and warnings

_COUNTERS = ("hits", "bytes_loaded", "seconds_loaded", "bytes_saved", "seconds_saved", "failures")


class StoreStats:
    """Per-tier counters, thread-safe. Each is a Counter (a missing key reads 0): `hits`,
    `bytes_loaded`, `seconds_loaded`, `bytes_saved`, `seconds_saved` by tier name, and
    `failures` by (tier, reason). `take()` hands over the increments since the last take."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.bytes_loaded: Counter[str] = Counter()
        self.seconds_loaded: Counter[str] = Counter()  # float values
        self.bytes_saved: Counter[str] = Counter()
        self.seconds_saved: Counter[str] = Counter()  # float values
        self.failures: Counter[tuple[str, str]] = Counter()

    def record_load(self, tier: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.hits[tier] += 1
            self.bytes_loaded[tier] += nbytes
            self.seconds_loaded[tier] += seconds

    def record_save(self, tier: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.bytes_saved[tier] += nbytes
            self.seconds_saved[tier] += seconds

    def record_failure(self, tier: str, reason: str) -> None:
        with self._lock:
            self.failures[(tier, reason)] += 1

    def take(self) -> StoreStats:
        """The increments since the last take (a new StoreStats); resets this one."""
        taken = StoreStats()
        with self._lock:
            for name in _COUNTERS:
                setattr(taken, name, getattr(self, name))
                setattr(self, name, Counter())
        return taken

    def __repr__(self) -> str:
        with self._lock:
            fields = ", ".join(f"{name}={dict(getattr(self, name))}" for name in _COUNTERS)
        return f"StoreStats({fields})"


class RateLimitedWarner:
    """At most one warning per (tier, reason) per `interval_s`; says how many it held back."""

    def __init__(
        self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: Counter[tuple[str, str]] = Counter()

    def warn(self, tier: str, reason: str, detail: str) -> None:
        key, now = (tier, reason), self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._suppressed[key] += 1
                return
            self._last[key] = now
            held_back = self._suppressed.pop(key, 0)
        more = f" ({held_back} more since the last such warning)" if held_back else ""
        logger.warning("KV store, %s tier: %s: %s%s", tier, reason, detail, more)


# ------------------------------------------------------------------------------------- tiers


class Tier:
    """A store of key -> payload. Faults are misses (None / False), counted in `stats`."""

    name: ClassVar[str]
    # True: TieredStore writes this tier from its background writer, not the caller's thread.
    blocking: ClassVar[bool] = True

    def __init__(self) -> None:
        self.stats = StoreStats()  # TieredStore replaces it with its own
        self._warner = RateLimitedWarner()

    def contains(self, key: str) -> bool:
        raise NotImplementedError

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        return [self.contains(key) for key in keys]

    def get(self, key: str) -> bytes | None:
        raise NotImplementedError

    def put(self, key: str, payload: bytes) -> bool:
        """Store unless present; True when the key is now in the tier."""
        raise NotImplementedError

    def close(self) -> None:
        """Release resources (connections); the default has none."""

    def report_failure(self, reason: str, detail: object) -> None:
        self.stats.record_failure(self.name, reason)
        self._warner.warn(self.name, reason, str(detail))


class DiskTier(Tier):
    """One framed file per chunk under `path`, LRU under `capacity_bytes` (file sizes)."""

    name = "disk"

    def __init__(self, path: str, capacity_bytes: int) -> None:
        super().__init__()
        self.path = path
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> file size, oldest first
        self._used = 0
        os.makedirs(path, exist_ok=True)
        self._load_index()
        with self._lock:
            self._evict_over_capacity()

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._index)

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._index

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        with self._lock:
            return [key in self._index for key in keys]

    def get(self, key: str) -> bytes | None:
        with self._lock:
            if key not in self._index:
                return None
            self._index.move_to_end(key)
        start, path = time.perf_counter(), self._file(key)
        try:
            payload = _read_frame_file(path)
        except FileNotFoundError:  # evicted or removed behind our back: a plain miss
            self._forget(key, path)
            return None
        except FrameError as e:
            self._forget(key, path)
            self.report_failure(e.reason, f"{path} failed verification; deleted")
            return None
        except OSError as e:
            self._forget(key, path)
            self.report_failure("read_error", e)
            return None
        _touch_quietly(path)  # the mtime keeps the LRU order across a restart
        self.stats.record_load(self.name, len(payload), time.perf_counter() - start)
        return payload

    def put(self, key: str, payload: bytes) -> bool:
        size = HEADER_SIZE + len(payload)
        if size > self.capacity_bytes:
            self.report_failure("too_large", f"{size} B > capacity {self.capacity_bytes}")
            return False
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                return True
        start = time.perf_counter()
        if not self._write(key, payload):
            return False
        with self._lock:
            self._used += size - self._index.pop(key, 0)
            self._index[key] = size
            self._evict_over_capacity()
        self.stats.record_save(self.name, len(payload), time.perf_counter() - start)
        return True

    def _file(self, key: str) -> str:
        if not _SAFE_KEY.fullmatch(key):
            raise ValueError(f"unsafe KV chunk key for a file name: {key!r}")
        return os.path.join(self.path, key + _SUFFIX)

    def _write(self, key: str, payload: bytes) -> bool:
        """Write to a temporary file in the folder, then rename it into place."""
        final, tmp = self._file(key), None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=_TMP_SUFFIX, dir=self.path)
            try:
                _write_all(fd, frame_header(payload))
                _write_all(fd, payload)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            return True
        except OSError as e:
            if tmp is not None:
                _unlink_quietly(tmp)
            self.report_failure("write_error", e)
            return False

    def _load_index(self) -> None:
        """Index the `*.kv` files, oldest mtime first; delete temporary leftovers."""
        found = []
        with os.scandir(self.path) as entries:
            for entry in entries:
                if entry.name.endswith(_TMP_SUFFIX):
                    _unlink_quietly(entry.path)
                elif _is_chunk_file(entry):
                    st = entry.stat()
                    found.append((st.st_mtime_ns, entry.name[: -len(_SUFFIX)], st.st_size))
        for _, key, size in sorted(found):
            self._index[key] = size
            self._used += size

    def _evict_over_capacity(self) -> None:
        """Delete the least recently used files until under capacity (caller holds the lock)."""
        while self._used > self.capacity_bytes and self._index:
            key, size = self._index.popitem(last=False)
            self._used -= size
            _unlink_quietly(self._file(key))

    def _forget(self, key: str, path: str) -> None:
        with self._lock:
            self._used -= self._index.pop(key, 0)
        _unlink_quietly(path)


def _is_chunk_file(entry: os.DirEntry) -> bool:
    key = entry.name[: -len(_SUFFIX)]
    return entry.name.endswith(_SUFFIX) and bool(_SAFE_KEY.fullmatch(key)) and entry.is_file()


def _read_frame_file(path: str) -> bytes:
    """The verified payload of a framed file; raises FrameError or OSError."""
    with open(path, "rb") as f:
        length, digest = parse_header(f.read(HEADER_SIZE))
        stored = os.fstat(f.fileno()).st_size - HEADER_SIZE
        if stored != length:  # checked before reading: a corrupt length may be huge
            raise FrameError("truncated" if stored < length else "corrupt")
        payload = f.read()
    check_payload(payload, length, digest)
    return payload


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _touch_quietly(path: str) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class RedisTier(Tier):
    """Chunks in a Redis under `key_prefix + key`, framed like disk files.

    Every call is bounded by `timeout_s` (redis-py's own retries are off). After a connection
    error or timeout the tier is skipped - it has nothing, puts are dropped - for
    `retry_after_s`, then tried again, so a dead Redis does not slow every step and a
    restarted one is used again."""

    name = "redis"

    def __init__(
        self,
        url: str,
        timeout_s: float = 0.5,
        key_prefix: str = "lmserve:kv:",
        ttl_s: float | None = None,
        retry_after_s: float = 5.0,
    ) -> None:
        super().__init__()
        self.key_prefix = key_prefix
        self.ttl_s = ttl_s
        self.retry_after_s = retry_after_s
        self._skip_until = 0.0  # time.monotonic() before which the tier is skipped
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # one try: a call takes at most ~timeout_s
        )

    @property
    def backing_off(self) -> bool:
        return time.monotonic() < self._skip_until

    def contains(self, key: str) -> bool:
        ok, count = self._call(lambda client: client.exists(self._key(key)))
        return bool(ok and count)

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """One pipeline of EXISTS; all False when Redis is skipped or fails."""

        def exists_all(client: redis.Redis) -> list[int]:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self._key(key))
            return pipe.execute()

        ok, counts = self._call(exists_all) if keys else (True, [])
        return [bool(c) for c in counts] if ok and counts is not None else [False] * len(keys)

    def get(self, key: str) -> bytes | None:
        start, name = time.perf_counter(), self._key(key)
        ok, value = self._call(lambda client: client.get(name))
        if not ok or value is None:
            return None
        try:
            payload = unframe(value)
        except FrameError as e:
            self.report_failure(e.reason, f"{name} failed verification; deleted")
            self._call(lambda client: client.delete(name))
            return None
        self.stats.record_load(self.name, len(payload), time.perf_counter() - start)
        return payload

    def put(self, key: str, payload: bytes) -> bool:
        start, name = time.perf_counter(), self._key(key)
        ok, present = self._call(lambda client: client.exists(name))
        if not ok:
            return False
        if present:  # written once, never changed: skip sending megabytes again
            return True
        px = None if self.ttl_s is None else max(1, int(self.ttl_s * 1000))
        ok, _ = self._call(lambda client: client.set(name, frame(payload), px=px, nx=True))
        if ok:
            self.stats.record_save(self.name, len(payload), time.perf_counter() - start)
        return ok

    def close(self) -> None:
        self._client.close()

    def _key(self, key: str) -> str:
        return self.key_prefix + key

    def _call(self, fn: Callable[[redis.Redis], T]) -> tuple[bool, T | None]:
        """(True, fn(client)), or (False, None) when skipped or on any Redis error."""
        if self.backing_off:
            return False, None
        try:
            return True, fn(self._client)
        except redis.exceptions.TimeoutError as e:
            self._back_off("timeout", e)
        except (redis.exceptions.ConnectionError, OSError) as e:
            self._back_off("unreachable", e)
        except redis.exceptions.RedisError as e:
            self.report_failure("error", e)
        return False, None

    def _back_off(self, reason: str, error: Exception) -> None:
        self._skip_until = time.monotonic() + self.retry_after_s
        self.report_failure(reason, f"{error} (skipping Redis for {self.retry_after_s:g} s)")


# ------------------------------------------------------------------------------ tiered store

_Write = tuple[str, bytes, tuple[Tier, ...]]


class TieredStore:
    """Tiers fastest first; a key counts as available when any tier has it.

    The store adopts its tiers: their failures and traffic are counted in `self.stats`.
    Writes to blocking tiers (disk, Redis) go through one background thread fed by a queue of
    at most `max_pending_writes`; when it is full the write is dropped (`queue_full`)."""

    def __init__(self, tiers: Sequence[Tier | None], max_pending_writes: int = 64) -> None:
        self.tiers: tuple[Tier, ...] = tuple(t for t in tiers if t is not None)
        if not self.tiers:
            raise ValueError("TieredStore needs at least one tier")
        self.stats = StoreStats()
        for tier in self.tiers:
            tier.stats = self.stats
        self._queue: queue.Queue[_Write | None] = queue.Queue(maxsize=max_pending_writes)
        self._idle = threading.Condition()  # guards _pending and _closed
        self._pending = 0
        self._closed = False
        self._writer: threading.Thread | None = None
        if any(tier.blocking for tier in self.tiers):
            self._writer = threading.Thread(
                target=self._write_loop, name="kv-store-writer", daemon=True
            )
            self._writer.start()

    def num_prefix_available(self, keys: Sequence[str]) -> int:
        """How many leading keys some tier has. Each tier is asked once, in order, only for
        the keys past the first gap that no faster tier has (Redis: one pipeline)."""
        found = [False] * len(keys)
        for tier in self.tiers:
            gap = _first_false(found)
            if gap == len(keys):
                break
            todo = [i for i in range(gap, len(keys)) if not found[i]]
            for i, hit in zip(todo, tier.contains_many([keys[i] for i in todo])):
                found[i] = hit
        return _first_false(found)

    def get(self, key: str) -> tuple[bytes | None, str | None]:
        """(payload, tier name) from the fastest tier that has a good copy, or (None, None).
        A hit in a slower tier is put into every faster tier."""
        for i, tier in enumerate(self.tiers):
            payload = tier.get(key)
            if payload is not None:
                self._store(key, payload, self.tiers[:i])
                return payload, tier.name
        return None, None

    def put(self, key: str, payload: bytes) -> None:
        """Store in every tier: non-blocking ones now, the others from the writer thread."""
        self._store(key, payload, self.tiers)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until the queued writes are done; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

    def close(self, timeout_s: float | None = None) -> None:
        """Flush, stop the writer thread, and close the tiers. Later puts reach only the
        non-blocking tiers."""
        with self._idle:
            if self._closed:
                return
            self._closed = True
        self.flush(timeout_s)
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout_s)
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _store(self, key: str, payload: bytes, tiers: Sequence[Tier]) -> None:
        later = tuple(tier for tier in tiers if tier.blocking)
        for tier in tiers:
            if not tier.blocking:
                tier.put(key, payload)
        if later:
            self._enqueue((key, payload, later))

    def _enqueue(self, write: _Write) -> None:
        with self._idle:
            if self._closed:
                return
            try:
                self._queue.put_nowait(write)
            except queue.Full:
                for tier in write[2]:
                    tier.report_failure("queue_full", "writer queue full; write dropped")
                return
            self._pending += 1

    def _write_loop(self) -> None:
        while (write := self._queue.get()) is not None:
            key, payload, tiers = write
            for tier in tiers:
                try:
                    tier.put(key, payload)
                except Exception as e:  # a bug in a tier must not kill the writer
                    tier.report_failure("error", repr(e))
            with self._idle:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.notify_all()


def _first_false(flags: list[bool]) -> int:
    return next((i for i, flag in enumerate(flags) if not flag), len(flags))
