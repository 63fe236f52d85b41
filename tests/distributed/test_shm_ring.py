"""The shared-memory ring buffer: its layout and flag states byte by byte, FIFO delivery to reader
processes (ring and ZMQ overflow), back-pressure, idle CPU, wake-up latency, and cleanup."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import random
import statistics
import subprocess
import sys
import threading
import time
from multiprocessing.shared_memory import SharedMemory

import msgspec
import pytest

from lmserve.distributed import shm_ring
from lmserve.distributed.shm_ring import CHUNK_HEADER, KIND_OVERFLOW, KIND_RAW_BYTES, MessageQueue

SPAWN = multiprocessing.get_context("spawn")


def _flags(mq: MessageQueue, idx: int) -> tuple[int, ...]:
    """Chunk idx's metadata bytes, read straight from the segment: (written, read_0, read_1, ..)."""
    ring = mq.buffer
    base = ring.max_chunks * ring.max_chunk_bytes + idx * (1 + ring.n_reader)
    return tuple(ring.shared_memory.buf[base : base + 1 + ring.n_reader])


def _header(mq: MessageQueue, idx: int) -> tuple[int, int]:
    """Chunk idx's header: (payload length, kind flags)."""
    return CHUNK_HEADER.unpack_from(mq.buffer.shared_memory.buf, idx * mq.buffer.max_chunk_bytes)


def _shm_exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


@pytest.fixture
def make_queue():
    """make_queue(n_reader, **kw) -> (writer, [readers]), all in this process, handshake done."""
    opened: list[MessageQueue] = []

    def make(n_reader: int, **kwargs) -> tuple[MessageQueue, list[MessageQueue]]:
        writer = MessageQueue(n_reader, **kwargs)
        readers = [
            MessageQueue.create_from_handle(writer.export_handle(), r) for r in range(n_reader)
        ]
        opened.extend([*readers, writer])
        writer.wait_until_ready(timeout=10)
        for reader in readers:
            reader.wait_until_ready(timeout=10)
        return writer, readers

    yield make
    for mq in opened:
        mq.close()


def test_layout_and_flag_states_byte_by_byte(make_queue, monkeypatch):
    writer, (r0, r1) = make_queue(2, max_chunk_bytes=64, max_chunks=4)
    ring = writer.buffer
    assert (ring.max_chunks, ring.max_chunk_bytes, ring.n_reader) == (4, 64, 2)
    assert ring.shared_memory.size == 4 * 64 + 4 * (1 + 2)
    assert [_flags(writer, i) for i in range(4)] == [(0, 0, 0)] * 4  # nothing written

    writer.enqueue(b"abc")
    assert _flags(writer, 0) == (1, 0, 0)  # just written
    assert _flags(writer, 1) == (0, 0, 0)
    assert _header(writer, 0) == (3, KIND_RAW_BYTES)
    assert bytes(ring.shared_memory.buf[CHUNK_HEADER.size : CHUNK_HEADER.size + 3]) == b"abc"
    assert r0.dequeue(timeout=1) == b"abc"
    assert _flags(writer, 0) == (1, 1, 0)  # read by reader 0 only: reader 1 may still read it
    assert r1.dequeue(timeout=1) == b"abc"
    assert _flags(writer, 0) == (1, 1, 1)  # read by all: writable again

    for i in range(1, 4):  # fill chunks 1..3 and read them, so the writer wraps to chunk 0
        writer.enqueue(i)
        assert r0.dequeue(timeout=1) == i and r1.dequeue(timeout=1) == i
    assert [_flags(writer, i) for i in range(4)] == [(1, 1, 1)] * 4

    # Record chunk 0's flags at every fence of the next write: the reader flags are cleared while
    # the written flag is still 0, and only then is the written flag set.
    seen: list[tuple[int, ...]] = []
    monkeypatch.setattr(shm_ring, "memory_fence", lambda: seen.append(_flags(writer, 0)))
    writer.enqueue(b"next round")
    assert seen == [(1, 1, 1), (0, 1, 1), (0, 0, 0)]
    assert _flags(writer, 0) == (1, 0, 0)
    assert r0.dequeue(timeout=1) == b"next round" == r1.dequeue(timeout=1)


def test_overflow_chunk_carries_a_marker_and_order_holds(make_queue):
    writer, (reader,) = make_queue(1, max_chunk_bytes=64, max_chunks=4)
    big = bytes(range(256)) * 3
    for message in (b"small", big, {"k": "v" * 200}, b"tail"):
        writer.enqueue(message)
    assert _header(writer, 0) == (5, KIND_RAW_BYTES)
    assert _header(writer, 1) == (0, KIND_RAW_BYTES | KIND_OVERFLOW)
    assert _header(writer, 2) == (0, KIND_OVERFLOW)  # msgpack, on the socket
    assert [reader.dequeue(timeout=1) for _ in range(4)] == [
        b"small",
        big,
        {"k": "v" * 200},
        b"tail",
    ]


def test_enqueue_bytes_delivers_equal_bytes(make_queue):
    mcb = 128
    writer, (reader,) = make_queue(1, max_chunk_bytes=mcb, max_chunks=4)
    inline_max = mcb - CHUNK_HEADER.size
    for size in (0, 1, inline_max, inline_max + 1, mcb, 3 * mcb, 100_000):
        payload = os.urandom(size)
        for sent in (payload, bytearray(payload), memoryview(payload)):
            writer.enqueue(sent)
            got = reader.dequeue(timeout=1)
            assert type(got) is bytes and got == payload, size


def test_objects_round_trip_via_msgpack(make_queue):
    writer, (reader,) = make_queue(1, max_chunk_bytes=256, max_chunks=4)
    objects = [
        None,
        True,
        7,
        -1.5,
        "héllo",
        [1, [2, 3], {"a": None}],
        {"req_ids": ["r1", "r2"], "num_tokens": {"r1": 3}, "blob": b"\x00\xff"},
        {"big": list(range(5000))},  # overflows to the socket
    ]
    for obj in objects:
        writer.enqueue(obj)
        assert reader.dequeue(timeout=1) == obj
    with pytest.raises(TypeError):  # not msgpack-able: nothing is written
        writer.enqueue(object())
    writer.enqueue("after")
    assert reader.dequeue(timeout=1) == "after"


def test_dequeue_timeout_raises_timeout_error(make_queue):
    writer, (reader,) = make_queue(1, max_chunk_bytes=64, max_chunks=2)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        reader.dequeue(timeout=0.1)
    assert 0.1 <= time.monotonic() - start < 1.0
    with pytest.raises(TimeoutError):
        reader.dequeue(timeout=0)
    writer.enqueue(b"late")  # the queue still works after a timeout
    assert reader.dequeue(timeout=1) == b"late"


def test_full_ring_blocks_writer_until_stalled_reader_reads(make_queue):
    writer, (fast, stalled) = make_queue(2, max_chunk_bytes=64, max_chunks=4)
    for i in range(4):
        writer.enqueue(i)
        assert fast.dequeue(timeout=1) == i  # one reader keeps up; the other stalls
    assert [_flags(writer, i) for i in range(4)] == [(1, 1, 0)] * 4
    with pytest.raises(TimeoutError):  # full: a timed enqueue gives up and sends nothing
        writer.enqueue(b"x" * 1000, timeout=0.1)

    returned = threading.Event()

    def enqueue_one() -> None:
        writer.enqueue("fifth")
        returned.set()

    thread = threading.Thread(target=enqueue_one)
    thread.start()
    assert not returned.wait(0.3)  # blocked on chunk 0, which the stalled reader holds
    assert stalled.dequeue(timeout=1) == 0
    assert returned.wait(2)  # freed by that one read
    thread.join()
    assert [stalled.dequeue(timeout=1) for _ in range(4)] == [1, 2, 3, "fifth"]
    assert fast.dequeue(timeout=1) == "fifth"


def test_wrong_side_and_handshake_errors():
    writer = MessageQueue(1, max_chunk_bytes=64, max_chunks=2)
    try:
        with pytest.raises(TimeoutError):  # no reader ever subscribes
            writer.wait_until_ready(timeout=0.2)
        with pytest.raises(RuntimeError, match="wait_until_ready"):
            writer.enqueue(b"too early")
        reader = MessageQueue.create_from_handle(writer.export_handle(), 0)
        with pytest.raises(ValueError):
            MessageQueue.create_from_handle(writer.export_handle(), 1)
        writer.wait_until_ready(timeout=10)
        reader.wait_until_ready(timeout=10)
        with pytest.raises(RuntimeError):
            reader.enqueue(b"readers do not write")
        with pytest.raises(RuntimeError):
            writer.dequeue(timeout=0)
        reader.close()
    finally:
        writer.close()


def test_handle_is_picklable_and_msgpackable(make_queue):
    writer, _ = make_queue(2, max_chunk_bytes=64, max_chunks=2)
    handle = writer.export_handle()
    assert pickle.loads(pickle.dumps(handle)) == handle
    as_dict = msgspec.msgpack.decode(msgspec.msgpack.encode(handle))
    assert as_dict["shm_name"] == writer.buffer.shared_memory.name
    assert as_dict["zmq_address"].startswith(("ipc://", "tcp://127.0.0.1"))
    reader = MessageQueue.create_from_handle(as_dict, 1)  # a plain dict works too
    try:
        assert reader.buffer.n_reader == 2 and reader.buffer.max_chunk_bytes == 64
    finally:
        reader.close()


def test_close_unlinks_segment():
    writer = MessageQueue(1, max_chunk_bytes=64, max_chunks=2)
    reader = MessageQueue.create_from_handle(writer.export_handle(), 0)
    name = writer.buffer.shared_memory.name
    ipc_path = writer.export_handle().zmq_address.removeprefix("ipc://")
    assert _shm_exists(name) and os.path.exists(ipc_path)
    reader.close()
    assert _shm_exists(name)  # a reader only detaches
    writer.close()
    writer.close()  # idempotent
    assert not _shm_exists(name) and not os.path.exists(ipc_path)
    with pytest.raises(FileNotFoundError):
        SharedMemory(name=name)


@pytest.mark.slow
def test_reader_process_exit_leaves_segment_to_writer():
    """A reader process with its own resource tracker must not unlink the writer's segment."""
    with MessageQueue(1, max_chunk_bytes=64, max_chunks=2) as writer:
        name = writer.buffer.shared_memory.name
        handle = msgspec.json.encode(writer.export_handle()).decode()
        code = (
            "import msgspec, sys\n"
            "from lmserve.distributed.shm_ring import MessageQueue\n"
            "mq = MessageQueue.create_from_handle(msgspec.json.decode(sys.argv[1]), 0)\n"
            "mq.close()\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, handle], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert "leaked" not in result.stderr
        assert _shm_exists(name)
    assert not _shm_exists(name)


# -- many messages to reader processes --------------------------------------------------------


def _mixed_messages(seed: int, count: int, max_chunk_bytes: int):
    """A deterministic stream of bytes (0 B .. 3x max_chunk_bytes) and msgpack objects."""
    rng = random.Random(seed)
    for seq in range(count):
        roll = rng.random()
        if roll < 0.1:
            yield {"seq": seq, "tokens": [rng.randrange(50_000) for _ in range(rng.randrange(600))]}
            continue
        if roll < 0.5:
            size = rng.randrange(256)
        elif roll < 0.6:  # around the inline / overflow boundary
            size = max_chunk_bytes + rng.randrange(-16, 16)
        else:
            size = rng.randrange(3 * max_chunk_bytes + 1)
        yield rng.randbytes(size)


def _digest_update(digest, obj) -> None:
    digest.update(obj if isinstance(obj, bytes) else msgspec.msgpack.encode(obj))


def _mixed_reader_main(handle, rank, seed, count, results) -> None:
    mq = MessageQueue.create_from_handle(handle, rank)
    try:
        mq.wait_until_ready(timeout=60)
        digest = hashlib.blake2b()
        for seq, expected in enumerate(_mixed_messages(seed, count, handle.max_chunk_bytes)):
            got = mq.dequeue(timeout=30)
            if got != expected:
                results.put((rank, f"message {seq} differs", None))
                return
            _digest_update(digest, got)
        results.put((rank, "ok", digest.hexdigest()))
    finally:
        mq.close()


@pytest.mark.slow
def test_thousands_of_mixed_messages_reach_three_reader_processes_in_order():
    count, seed, mcb = 5000, 1234, 1024
    writer = MessageQueue(3, max_chunk_bytes=mcb, max_chunks=8)
    name = writer.buffer.shared_memory.name
    results = SPAWN.Queue()
    procs = [
        SPAWN.Process(
            target=_mixed_reader_main, args=(writer.export_handle(), rank, seed, count, results)
        )
        for rank in range(3)
    ]
    try:
        for proc in procs:
            proc.start()
        writer.wait_until_ready(timeout=60)
        digest = hashlib.blake2b()
        num_overflow = 0
        for message in _mixed_messages(seed, count, mcb):
            writer.enqueue(message, timeout=30)
            _digest_update(digest, message)
            size = (
                len(message) if isinstance(message, bytes) else len(msgspec.msgpack.encode(message))
            )
            num_overflow += size > mcb - CHUNK_HEADER.size
        reports = sorted(results.get(timeout=60) for _ in procs)
        assert reports == [(rank, "ok", digest.hexdigest()) for rank in range(3)]
        assert 1000 < num_overflow < 4000  # both paths were exercised
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        writer.close()
    assert not _shm_exists(name)


# -- idle readers -----------------------------------------------------------------------------


def _idle_reader_main(handle, num_trials, results) -> None:
    mq = MessageQueue.create_from_handle(handle, 0)
    try:
        mq.wait_until_ready(timeout=60)
        for _ in range(num_trials):
            wall0, cpu0 = time.monotonic(), time.process_time()
            sent_at = mq.dequeue(timeout=30)
            received_at, cpu1 = time.monotonic(), time.process_time()
            # CLOCK_MONOTONIC is system-wide on Linux: the writer's stamp compares with ours.
            results.put((received_at - sent_at, (cpu1 - cpu0) / (received_at - wall0)))
    finally:
        mq.close()


@pytest.mark.slow
def test_idle_reader_sleeps_yet_wakes_within_2ms():
    idle_s = [1.0, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]
    writer = MessageQueue(1, max_chunk_bytes=256, max_chunks=4)
    results = SPAWN.Queue()
    proc = SPAWN.Process(
        target=_idle_reader_main, args=(writer.export_handle(), len(idle_s), results)
    )
    try:
        proc.start()
        writer.wait_until_ready(timeout=60)
        trials = []
        for idle in idle_s:
            time.sleep(idle)
            writer.enqueue(time.monotonic())
            trials.append(results.get(timeout=30))  # the reader is idle again before the next
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
        writer.close()
    latencies = [latency for latency, _ in trials]
    cpu_share_after_1s_idle = trials[0][1]
    assert cpu_share_after_1s_idle < 0.10, trials
    assert statistics.median(latencies) < 2e-3, trials
