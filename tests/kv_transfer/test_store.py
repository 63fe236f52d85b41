"""The KV chunk store's tiers (disk, a real Redis; the CPU slots are in test_slab_tier.py) and
the TieredStore in front of them.

A fault anywhere is a miss that is counted, never an exception."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
import time

import pytest

from lmserve.kv_transfer import store as store_mod
from lmserve.kv_transfer.slab_tier import SlabCPUTier
from lmserve.kv_transfer.store import (
    HEADER_SIZE,
    DiskTier,
    FrameError,
    RateLimitedWarner,
    RedisTier,
    StoreStats,
    TieredStore,
    frame,
    unframe,
)

FAST_BACKOFF_S = 0.3


def key(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def payload(n: int, size: int = 1000) -> bytes:
    return (hashlib.sha256(f"payload {n}".encode()).digest() * (size // 32 + 1))[:size]


def chunk_file(tier: DiskTier, k: str) -> str:
    return os.path.join(tier.path, k + ".kv")


# -------------------------------------------------------------------------------- framing


def test_frame_round_trips_and_rejects_damage():
    data = payload(1)
    framed = frame(data)
    assert len(framed) == HEADER_SIZE + len(data) and framed[:4] == b"LMKV"
    assert unframe(framed) == data
    flipped = bytearray(framed)
    flipped[HEADER_SIZE + 10] ^= 0xFF
    cases = {
        "corrupt": [bytes(flipped), b"XXXX" + framed[4:], framed + b"x", b"garbage"],
        "truncated": [framed[:-1], framed[:HEADER_SIZE], framed[:10], b""],
    }
    for reason, damaged in cases.items():
        for value in damaged:
            with pytest.raises(FrameError) as info:
                unframe(value)
            assert info.value.reason == reason, value[:8]


# ------------------------------------------------------------------------------------ CPU


def test_disk_tier_round_trips_and_counts_traffic(tmp_path):
    tier = DiskTier(str(tmp_path), capacity_bytes=1 << 20)
    assert tier.get(key(0)) is None and not tier.contains(key(0))
    assert tier.put(key(0), payload(0))
    assert tier.contains(key(0)) and tier.get(key(0)) == payload(0)
    assert os.path.getsize(chunk_file(tier, key(0))) == HEADER_SIZE + 1000
    assert tier.stats.hits["disk"] == 1
    assert tier.stats.bytes_loaded["disk"] == tier.stats.bytes_saved["disk"] == 1000
    assert tier.stats.seconds_loaded["disk"] > 0 and not tier.stats.failures


def test_disk_tier_finds_its_chunks_after_a_restart_in_lru_order(tmp_path):
    first = DiskTier(str(tmp_path), capacity_bytes=1 << 20)
    for n in range(3):
        first.put(key(n), payload(n))
        os.utime(chunk_file(first, key(n)), ns=(n * 10**9, n * 10**9))  # distinct mtimes
    # get touches the file, so after the restart 0 is the most recently used
    assert first.get(key(0)) == payload(0)

    size = HEADER_SIZE + 1000
    restarted = DiskTier(str(tmp_path), capacity_bytes=3 * size)
    assert len(restarted) == 3 and restarted.used_bytes == 3 * size
    assert restarted.get(key(2)) == payload(2)
    restarted.put(key(3), payload(3))  # evicts the oldest: 1 (0 was touched, 2 just read)
    assert [restarted.contains(key(n)) for n in range(4)] == [True, False, True, True]
    assert not os.path.exists(chunk_file(restarted, key(1)))


def test_disk_tier_evicts_oldest_files_over_its_size_cap(tmp_path):
    size = HEADER_SIZE + 1000
    tier = DiskTier(str(tmp_path), capacity_bytes=3 * size)
    for n in range(3):
        tier.put(key(n), payload(n))
    tier.get(key(0))
    tier.put(key(3), payload(3))
    tier.put(key(4), payload(4))
    assert sorted(os.listdir(tmp_path)) == sorted(key(n) + ".kv" for n in (0, 3, 4))
    assert tier.used_bytes == 3 * size


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda data: data[: HEADER_SIZE + 10] + b"\0" + data[HEADER_SIZE + 11 :], "corrupt"),
        (lambda data: b"NOPE" + data[4:], "corrupt"),
        (lambda data: data + b"trailing", "corrupt"),
        (lambda data: data[:-100], "truncated"),
        (lambda data: data[:20], "truncated"),
        (lambda data: b"", "truncated"),
    ],
    ids=["bit-flip", "bad-magic", "too-long", "short-payload", "short-header", "empty"],
)
def test_disk_tier_deletes_a_damaged_file_and_counts_a_failure(tmp_path, damage, reason):
    tier = DiskTier(str(tmp_path), capacity_bytes=1 << 20)
    tier.put(key(0), payload(0))
    path = chunk_file(tier, key(0))
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))

    assert tier.get(key(0)) is None
    assert tier.stats.failures == {("disk", reason): 1}
    assert not os.path.exists(path) and not tier.contains(key(0)) and tier.used_bytes == 0
    assert tier.put(key(0), payload(0)) and tier.get(key(0)) == payload(0)  # rewritable


def test_disk_tier_removes_temporary_leftovers_at_startup(tmp_path):
    tier = DiskTier(str(tmp_path), capacity_bytes=1 << 20)
    tier.put(key(0), payload(0))
    leftover = tmp_path / f".{key(1)}.abc123.tmp"
    leftover.write_bytes(frame(payload(1))[:500])  # a crash mid-write
    (tmp_path / "notes.txt").write_text("not ours")

    restarted = DiskTier(str(tmp_path), capacity_bytes=1 << 20)
    assert not leftover.exists()
    assert sorted(os.listdir(tmp_path)) == sorted([key(0) + ".kv", "notes.txt"])
    assert len(restarted) == 1 and restarted.get(key(0)) == payload(0)


def test_disk_tier_counts_a_full_disk_as_a_write_error_without_raising(tmp_path, monkeypatch):
    tier = DiskTier(str(tmp_path), capacity_bytes=1 << 20)
    real_write, calls = os.write, []

    def write_until_full(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(os, "write", write_until_full)
    assert tier.put(key(0), payload(0)) is False
    monkeypatch.undo()

    assert tier.stats.failures == {("disk", "write_error"): 1}
    assert os.listdir(tmp_path) == []  # neither a half file nor the temporary one
    assert not tier.contains(key(0)) and tier.get(key(0)) is None
    assert tier.put(key(0), payload(0)) and tier.get(key(0)) == payload(0)


# ---------------------------------------------------------------------------------- Redis


def test_redis_tier_round_trips(redis_server):
    tier = RedisTier(redis_server.url, timeout_s=0.5, key_prefix="t:")
    assert tier.get(key(0)) is None and not tier.contains(key(0))
    assert tier.put(key(0), payload(0)) and tier.put(key(1), payload(1))
    assert tier.get(key(0)) == payload(0)
    assert tier.contains_many([key(0), key(9), key(1)]) == [True, False, True]
    with redis_server.client() as raw:
        assert raw.get("t:" + key(0)) == frame(payload(0))
        assert raw.ttl("t:" + key(0)) == -1  # no TTL by default
    assert tier.stats.hits["redis"] == 1 and tier.stats.bytes_saved["redis"] == 2000
    assert not tier.stats.failures


def test_redis_tier_sets_a_ttl_when_asked(redis_server):
    tier = RedisTier(redis_server.url, ttl_s=60)
    tier.put(key(0), payload(0))
    with redis_server.client() as raw:
        assert 0 < raw.pttl("lmserve:kv:" + key(0)) <= 60_000


def test_redis_tier_deletes_a_corrupt_value(redis_server):
    tier = RedisTier(redis_server.url)
    with redis_server.client() as raw:
        raw.set("lmserve:kv:" + key(0), frame(payload(0))[:-1] + b"?")
        assert tier.get(key(0)) is None
        assert raw.exists("lmserve:kv:" + key(0)) == 0
    assert tier.stats.failures == {("redis", "corrupt"): 1}


def test_unreachable_redis_is_a_fast_counted_miss_then_skipped(dead_redis_url):
    tier = RedisTier(dead_redis_url, timeout_s=0.2, retry_after_s=FAST_BACKOFF_S)
    start = time.monotonic()
    assert tier.get(key(0)) is None
    assert time.monotonic() - start < 0.5
    assert tier.stats.failures == {("redis", "unreachable"): 1}
    assert tier.backing_off

    # During the back-off Redis is not tried: no new failures, no delay.
    start = time.monotonic()
    assert tier.put(key(0), payload(0)) is False
    assert tier.contains_many([key(0), key(1)]) == [False, False]
    assert not tier.contains(key(0)) and tier.get(key(0)) is None
    assert time.monotonic() - start < 0.05
    assert tier.stats.failures == {("redis", "unreachable"): 1}

    time.sleep(FAST_BACKOFF_S)  # then it is tried (and fails) again
    assert tier.get(key(0)) is None
    assert tier.stats.failures == {("redis", "unreachable"): 2}


def test_restarted_redis_is_used_again_after_the_backoff(redis_server):
    tier = RedisTier(redis_server.url, timeout_s=0.2, retry_after_s=FAST_BACKOFF_S)
    assert tier.put(key(0), payload(0))
    redis_server.stop()
    assert tier.get(key(0)) is None
    assert tier.stats.failures[("redis", "unreachable")] == 1

    redis_server.start()  # empty
    assert not tier.put(key(1), payload(1))  # still backing off: dropped
    time.sleep(FAST_BACKOFF_S)
    assert tier.get(key(0)) is None  # a plain miss: the new server is empty
    assert tier.put(key(1), payload(1)) and tier.get(key(1)) == payload(1)
    assert tier.stats.failures == {("redis", "unreachable"): 1}


def test_slow_redis_times_out_without_raising(redis_server):
    tier = RedisTier(redis_server.url, timeout_s=0.2, retry_after_s=FAST_BACKOFF_S)
    assert tier.put(key(0), payload(0))  # connection is up before the server stalls
    with redis_server.client() as other:
        sleeper = threading.Thread(target=other.execute_command, args=("DEBUG", "SLEEP", "1"))
        sleeper.start()
        time.sleep(0.1)  # let the server start sleeping
        start = time.monotonic()
        assert tier.get(key(0)) is None
        elapsed = time.monotonic() - start
        sleeper.join()
    assert 0.15 < elapsed < 0.6
    assert tier.stats.failures == {("redis", "timeout"): 1}
    time.sleep(FAST_BACKOFF_S)
    assert tier.get(key(0)) == payload(0)  # the server is awake again


# ----------------------------------------------------------------------------- TieredStore


@pytest.fixture
def three_tiers(tmp_path, redis_server):
    cpu = SlabCPUTier(capacity_bytes=1 << 20, pin=False)
    disk = DiskTier(str(tmp_path / "disk"), capacity_bytes=1 << 20)
    rtier = RedisTier(redis_server.url, timeout_s=0.5)
    store = TieredStore([cpu, disk, rtier])
    yield store, cpu, disk, rtier
    store.close()


def redis_exists_calls(redis_server) -> int:
    with redis_server.client() as raw:
        return raw.info("commandstats").get("cmdstat_exists", {}).get("calls", 0)


def test_num_prefix_available_stops_at_the_first_gap(three_tiers, redis_server):
    store, cpu, disk, rtier = three_tiers
    keys = [key(n) for n in range(6)]
    cpu.put(keys[0], payload(0))
    disk.put(keys[1], payload(1))
    rtier.put(keys[2], payload(2))
    cpu.put(keys[4], payload(4))  # after the gap at 3: does not count
    before = redis_exists_calls(redis_server)
    assert store.num_prefix_available(keys) == 3
    # Redis was asked only about the keys no local tier has, from the first local gap on
    assert redis_exists_calls(redis_server) - before == len([keys[2], keys[3], keys[5]])
    assert store.num_prefix_available(keys[:2]) == 2
    assert redis_exists_calls(redis_server) - before == 3  # all local: Redis not asked
    assert store.num_prefix_available([keys[3], keys[0]]) == 0
    assert store.num_prefix_available([]) == 0


def test_put_stores_in_cpu_at_once_and_in_disk_and_redis_after_flush(three_tiers):
    store, cpu, disk, rtier = three_tiers
    store.put(key(0), payload(0))
    assert cpu.contains(key(0))
    assert store.flush(timeout_s=5)
    assert disk.get(key(0)) == payload(0) and rtier.get(key(0)) == payload(0)
    saved = store.stats.take().bytes_saved
    assert saved == {"cpu": 1000, "disk": 1000, "redis": 1000}

    store.put(key(0), payload(0))  # present everywhere: not rewritten anywhere
    assert store.flush(timeout_s=5)
    assert not store.stats.take().bytes_saved


def test_get_promotes_a_slower_hit_into_every_faster_tier(three_tiers):
    store, cpu, disk, rtier = three_tiers
    disk.put(key(0), payload(0))
    rtier.put(key(1), payload(1))

    assert store.get(key(0)) == (payload(0), "disk")
    assert cpu.contains(key(0))
    assert store.get(key(0)) == (payload(0), "cpu")

    assert store.get(key(1)) == (payload(1), "redis")
    assert cpu.contains(key(1))
    assert store.flush(timeout_s=5)
    assert disk.contains(key(1))
    assert store.get(key(9)) == (None, None)


def test_get_falls_through_a_corrupt_copy_to_the_next_tier(three_tiers):
    store, _cpu, disk, rtier = three_tiers
    disk.put(key(0), payload(0))
    rtier.put(key(0), payload(0))
    with open(chunk_file(disk, key(0)), "r+b") as f:
        f.seek(HEADER_SIZE)
        f.write(b"\xff\xff")
    assert store.get(key(0)) == (payload(0), "redis")
    assert store.stats.failures == {("disk", "corrupt"): 1}
    assert store.flush(timeout_s=5)
    assert disk.get(key(0)) == payload(0)  # the promotion rewrote a good copy


def test_a_full_writer_queue_drops_writes_instead_of_blocking(tmp_path):
    entered, release = threading.Event(), threading.Event()

    class StuckDisk(DiskTier):
        def put(self, key: str, payload: bytes) -> bool:
            entered.set()
            release.wait(5)
            return super().put(key, payload)

    cpu, disk = SlabCPUTier(1 << 20, pin=False), StuckDisk(str(tmp_path), 1 << 20)
    store = TieredStore([cpu, disk], max_pending_writes=2)
    try:
        store.put(key(0), payload(0))
        assert entered.wait(5)  # the writer holds chunk 0; the queue is empty
        start = time.monotonic()
        for n in range(1, 5):
            store.put(key(n), payload(n))
        assert time.monotonic() - start < 0.1
        assert store.stats.failures == {("disk", "queue_full"): 2}
        assert all(cpu.contains(key(n)) for n in range(5))
        assert not store.flush(timeout_s=0.05)
    finally:
        release.set()
        store.close()
    assert [disk.contains(key(n)) for n in range(5)] == [True, True, True, False, False]


def test_stats_take_returns_the_increments_and_resets(three_tiers):
    store, cpu, disk, _ = three_tiers
    cpu.put(key(0), payload(0))
    store.get(key(0))
    store.get(key(0))
    taken = store.stats.take()
    assert isinstance(taken, StoreStats)
    assert taken.hits == {"cpu": 2} and taken.bytes_loaded == {"cpu": 2000}
    assert taken.bytes_saved == {"cpu": 1000}

    fresh = store.stats.take()
    assert not fresh.hits and not fresh.bytes_saved and not fresh.failures
    store.get(key(0))
    assert store.stats.take().hits == {"cpu": 1}


def test_store_needs_a_tier_and_skips_absent_ones(tmp_path):
    with pytest.raises(ValueError):
        TieredStore([None])
    with TieredStore([None, DiskTier(str(tmp_path), 1 << 20)]) as store:
        store.put(key(0), payload(0))  # no CPU tier: the disk write is still queued
        assert store.flush(timeout_s=5)
        assert store.get(key(0)) == (payload(0), "disk")


def test_store_with_a_dead_redis_keeps_serving_local_tiers(tmp_path, dead_redis_url):
    rtier = RedisTier(dead_redis_url, timeout_s=0.2, retry_after_s=60)
    with TieredStore([SlabCPUTier(1 << 20, pin=False), rtier]) as store:
        store.put(key(0), payload(0))
        assert store.flush(timeout_s=5)
        assert store.num_prefix_available([key(0), key(1)]) == 1
        assert store.get(key(0)) == (payload(0), "cpu")
        assert store.get(key(1)) == (None, None)
        assert store.stats.failures == {("redis", "unreachable"): 1}


# -------------------------------------------------------------------------------- warnings


def test_warnings_are_rate_limited_per_tier_and_reason(caplog):
    now = [0.0]
    warner = RateLimitedWarner(interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger=store_mod.__name__):
        for _ in range(5):
            warner.warn("disk", "corrupt", "bad file")
        warner.warn("disk", "write_error", "disk full")
        warner.warn("redis", "corrupt", "bad value")
        now[0] = 10.0
        warner.warn("disk", "corrupt", "bad file again")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4
    assert "more since" not in messages[0]
    assert "bad file again" in messages[3] and "4 more since the last" in messages[3]
