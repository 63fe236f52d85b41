"""One writer broadcasting to N reader processes: the shm ring vs plain ZMQ PUB/SUB vs mp.Queue.

For each transport and reader count (1, 3, 7) it starts the readers once, then for each message
size (100 B .. 1 MB) runs two phases:
  - throughput: the writer sends as fast as it can for --duration s (at most --max-messages, and
    at most --max-mb per reader), then an END marker; msgs/s = messages / (time until the last
    reader got END). MB/s is one reader's stream (every reader gets every byte).
  - latency: --latency-messages messages paced apart (>= 1 ms, and >= 3x the message time the
    throughput phase measured, so queues drain between them); each carries the writer's
    time.monotonic() (system-wide on Linux), each reader takes receive time minus that stamp.
    After >= 1 ms of quiet the ring's readers are in back-off sleep, so this is the wake-up latency
    of a lightly loaded queue, not a round trip.

Transports:
  shm_ring   lmserve.distributed.shm_ring.MessageQueue with its defaults (chunks of 1 MiB, so every
             size here goes through shared memory, none through the ZMQ overflow socket)
  zmq_pubsub one XPUB socket (ipc://), SUB readers, no high-water mark (so nothing is dropped)
  mp_queue   one multiprocessing.Queue per reader (a Queue has one consumer per item): the writer
             puts every message into each; pickling happens in each Queue's feeder thread

Each message is built as 8-byte stamp + body (one allocation and copy per message, the same for
every transport). Readers are spawned processes; shm_ring readers import lmserve (and so torch),
which only slows their start, not the timed phases. Never asserts on time. From the repo root:

    python benchmarks/shm_ring_bench.py
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import zmq
from machine import cpu_machine_info

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "shm_ring_bench_cpu.json"
SIZES = [100, 1_000, 10_000, 100_000, 1_000_000]
READER_COUNTS = [1, 3, 7]
TRANSPORTS = ["shm_ring", "zmq_pubsub", "mp_queue"]
END, QUIT = b"E", b"Q"  # control messages; data messages are >= 100 B
STAMP = struct.Struct("<d")
SPAWN = multiprocessing.get_context("spawn")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--transports", nargs="+", default=TRANSPORTS, choices=TRANSPORTS)
    p.add_argument("--readers", nargs="+", type=int, default=READER_COUNTS)
    p.add_argument("--sizes", nargs="+", type=int, default=SIZES)
    p.add_argument("--duration", type=float, default=0.4, help="seconds of sending per phase")
    p.add_argument("--max-messages", type=int, default=20_000)
    p.add_argument("--max-mb", type=float, default=100, help="cap on MB sent per phase")
    p.add_argument("--latency-messages", type=int, default=50)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


# -- the three transports: writer and reader halves ---------------------------------------------


class ShmRingWriter:
    def __init__(self, n_readers: int) -> None:
        from lmserve.distributed.shm_ring import MessageQueue

        self.mq = MessageQueue(n_readers)
        self.reader_setups = [self.mq.export_handle()] * n_readers

    def ready(self) -> None:
        self.mq.wait_until_ready(timeout=120)

    def send(self, message: bytes) -> None:
        self.mq.enqueue(message)

    def close(self) -> None:
        self.mq.close()


def shm_ring_reader(handle, rank: int):
    from lmserve.distributed.shm_ring import MessageQueue

    mq = MessageQueue.create_from_handle(handle, rank)
    mq.wait_until_ready(timeout=120)
    return mq.dequeue, mq.close


class ZmqWriter:
    def __init__(self, n_readers: int) -> None:
        self.n_readers = n_readers
        self.dir = tempfile.mkdtemp(prefix="shm-ring-bench-")
        address = f"ipc://{self.dir}/pub"
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.bind(address)
        self.reader_setups = [address] * n_readers

    def ready(self) -> None:  # every SUB has subscribed (else PUB drops what comes first)
        for _ in range(self.n_readers):
            self.socket.recv()

    def send(self, message: bytes) -> None:
        self.socket.send(message, copy=len(message) < 65536)

    def close(self) -> None:
        self.socket.close(linger=1000)
        self.ctx.term()
        shutil.rmtree(self.dir, ignore_errors=True)


def zmq_reader(address: str, rank: int):
    ctx = zmq.Context()
    socket = ctx.socket(zmq.SUB)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(address)

    def close() -> None:
        socket.close(linger=0)
        ctx.term()

    return socket.recv, close


class MpQueueWriter:
    def __init__(self, n_readers: int) -> None:
        self.queues = [SPAWN.Queue() for _ in range(n_readers)]
        self.reader_setups = self.queues

    def ready(self) -> None:
        pass

    def send(self, message: bytes) -> None:
        for queue in self.queues:
            queue.put(message)

    def close(self) -> None:
        for queue in self.queues:
            queue.close()
            queue.join_thread()


def mp_queue_reader(queue, rank: int):
    return queue.get, lambda: None


WRITERS = {"shm_ring": ShmRingWriter, "zmq_pubsub": ZmqWriter, "mp_queue": MpQueueWriter}
READERS = {"shm_ring": shm_ring_reader, "zmq_pubsub": zmq_reader, "mp_queue": mp_queue_reader}


def reader_main(transport: str, setup, rank: int, reports) -> None:
    """Receive phases until QUIT; after each END report (count, END time, median latency)."""
    recv, close = READERS[transport](setup, rank)
    reports.put(("ready", rank))
    latencies: list[float] = []
    while True:
        message = recv()
        now = time.monotonic()
        if len(message) > 1:
            latencies.append(now - STAMP.unpack_from(message)[0])
        elif message == END:
            median = statistics.median(latencies) if latencies else float("nan")
            reports.put((len(latencies), now, median))
            latencies = []
        else:
            break
    close()


# -- the writer's side --------------------------------------------------------------------------


def run_phase(writer, reports, n_readers, body, max_messages, duration, interval_s=0.0):
    """Send up to max_messages (for at most `duration` s unless paced), then END; wait for every
    reader's report. Returns (messages sent, seconds to the last END, median latency in s)."""
    sent = 0
    start = time.monotonic()
    while sent < max_messages:
        if interval_s:
            time.sleep(interval_s)
        elif time.monotonic() - start >= duration:
            break
        writer.send(STAMP.pack(time.monotonic()) + body)
        sent += 1
    writer.send(END)
    got = [reports.get(timeout=300) for _ in range(n_readers)]
    assert all(count == sent for count, _, _ in got), (sent, got)
    seconds = max(end for _, end, _ in got) - start
    return sent, seconds, statistics.median(median for _, _, median in got)


def bench_transport(transport: str, n_readers: int, args: argparse.Namespace) -> list[dict]:
    writer = WRITERS[transport](n_readers)
    reports = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=reader_main, args=(transport, setup, rank, reports), daemon=True)
        for rank, setup in enumerate(writer.reader_setups)
    ]
    for proc in procs:
        proc.start()
    writer.ready()
    for _ in procs:
        assert reports.get(timeout=120)[0] == "ready"
    rows = []
    for size in args.sizes:
        body = os.urandom(size - STAMP.size)
        cap = min(args.max_messages, max(10, int(args.max_mb * 1e6 / size)))
        sent, seconds, _ = run_phase(writer, reports, n_readers, body, cap, args.duration)
        msgs_per_s = sent / seconds
        interval = max(1e-3, 3 / msgs_per_s)
        _, _, latency = run_phase(
            writer, reports, n_readers, body, args.latency_messages, 0, interval_s=interval
        )
        rows.append(
            {
                "transport": transport,
                "n_readers": n_readers,
                "size_bytes": size,
                "messages": sent,
                "seconds": round(seconds, 4),
                "msgs_per_s": round(msgs_per_s, 1),
                "mb_per_s_per_reader": round(msgs_per_s * size / 1e6, 2),
                "latency_p50_us": round(latency * 1e6, 1),
                "latency_interval_ms": round(interval * 1e3, 2),
            }
        )
        print_row(rows[-1])
    writer.send(QUIT)
    for proc in procs:
        proc.join(timeout=30)
    writer.close()
    return rows


def print_row(row: dict) -> None:
    print(
        f"{row['transport']:<11} {row['n_readers']:>3} {row['size_bytes']:>9} "
        f"{row['msgs_per_s']:>11,.0f} {row['mb_per_s_per_reader']:>10,.1f} "
        f"{row['latency_p50_us']:>11,.1f}",
        flush=True,
    )


def machine_info() -> dict[str, object]:
    return cpu_machine_info(
        "cpu (shared memory and sockets between processes on one host)",
        pyzmq=zmq.__version__,
        libzmq=zmq.zmq_version(),
    )


def main() -> None:
    args = parse_args()
    began = time.monotonic()
    print(
        f"{'transport':<11} {'rd':>3} {'size B':>9} {'msgs/s':>11} {'MB/s':>10} {'p50 lat us':>11}"
    )
    rows = []
    for transport in args.transports:
        for n_readers in args.readers:
            rows.extend(bench_transport(transport, n_readers, args))
    cpus = os.cpu_count() or 1
    notes = [
        "MB/s is one reader's stream: every reader receives every message",
        "latency: paced messages (>= 1 ms apart), receive time minus the writer's stamp, "
        "median over messages then over readers; for shm_ring it includes the readers' back-off "
        "sleep (capped at 1 ms)",
        "mp_queue broadcasts by putting each message into one Queue per reader",
    ]
    if max(args.readers) + 1 > cpus:
        notes.append(
            f"{cpus}-core machine: with {max(args.readers)} readers plus the writer, processes "
            "oversubscribe the cores, so those rows measure scheduling as much as the transport"
        )
    result = {
        "benchmark": "shm_ring_bench",
        "machine": machine_info(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "notes": notes,
        "results": rows,
        "wall_s": round(time.monotonic() - began, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
