"""The founding document's shared-memory ring buffer (§1.2), with ZMQ for payloads too big for it.

One writer broadcasts a stream of messages to `n_reader` readers in other processes (the EngineCore
sends each step's SchedulerOutput to every worker). One shared-memory segment holds the ring:

    +-------------------------------+----------------------------------------+
    | chunk0 | chunk1 | ... | chunk | metadata0 | metadata1 | ... | metadata |
    +-------------------------------+----------------------------------------+
    | max_chunks x max_chunk_bytes  | max_chunks x (1 + n_reader) bytes      |

Metadata record i holds chunk i's flags, one byte each: the written flag, then one read flag per
reader. States (written flag first):

    flags       meaning                        readable                 writable
    0 ?? .. ?   not written                    no                       yes
    1 00 .. 0   just written                   yes                      no
    1 ?? .. ?   written, read by some readers  by those who have not    no
    1 11 .. 1   written and read by everyone   no                       yes

The writer and every reader walk the chunks in order (index mod max_chunks), so delivery is strict
FIFO and a full ring blocks the writer until the slowest reader frees the next chunk.

A chunk holds an 8-byte header (payload length, kind flags) and the payload. A payload that does not
fit beside the header (`len > max_chunk_bytes - 8`) travels as the next message on a ZMQ PUB socket
while its chunk carries only a header with the OVERFLOW flag ("read the next message from the
socket"), so large and small messages stay in one order.

Memory ordering. Writer and readers are separate processes (each with its own GIL) running plain
Python over one mmap; no lock is shared. What makes the handoff safe:
  - Every flag is one byte, so a store to it is never torn.
  - CPython performs each `memoryview` read or write when its bytecode runs (a memcpy or a byte
    store through a pointer, inside calls the C compiler cannot see through), so the compiler
    keeps our loads and stores in program order and never caches a flag in a register.
  - The CPU: x86-64 (TSO) keeps stores in order and loads in order, and never moves a store before
    an earlier load: every ordering this protocol needs (data before the written flag, written
    flag before data, data read before the read flag). Weakly ordered CPUs (ARM, POWER) may
    reorder all of these, so `memory_fence()` sits at each point where an order matters.
  - Python has no fence primitive; memory_fence() acquires and releases a `threading.Lock`.
    CPython builds it on POSIX semaphores (or a mutex), which POSIX (XBD 4.12, "Memory
    Synchronization") lists among the functions that synchronize memory. On x86 each is a
    `lock`-prefixed instruction, a full barrier. On ARM, glibc uses acquire/release atomics; an
    acquire+release pair is not formally a full fence in the C11 model, but it is the strongest
    ordering pure Python reaches and the idiom vLLM's shm_broadcast relies on. A C-level
    atomic_thread_fence would be the upgrade if we ever target ARM hosts.

Waiting. Readers (and a writer facing a full ring) poll their flag: for SPIN_S they poll and
sched_yield() (a busy peer usually answers within microseconds, and yielding lets it run when
processes outnumber cores), then sleep in intervals that double from FIRST_SLEEP_S up to
MAX_SLEEP_S. An idle reader so wakes ~1,000 times a second (about 2% of a core here) and sees a
message at most ~MAX_SLEEP_S late.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import msgspec
import zmq

from lmserve import envs

DEFAULT_MAX_CHUNK_BYTES = 1 << 20  # SchedulerOutputs are kilobytes; 1 MiB leaves room for big steps
DEFAULT_MAX_CHUNKS = 16  # how far the writer may run ahead of the slowest reader

# Back-off while waiting for a flag (see the module docstring).
SPIN_S = 50e-6  # poll (yielding the core between polls) this long before sleeping
FIRST_SLEEP_S = 10e-6  # Linux's default timer slack (50 µs) makes the first sleeps ~60 µs
MAX_SLEEP_S = 1e-3  # the cap bounds wake-up latency after idleness to ~1 ms

# Chunk header: payload length (0 for OVERFLOW), kind flags, 3 pad bytes. Little-endian.
CHUNK_HEADER = struct.Struct("<IB3x")
KIND_OVERFLOW = 0x01  # the payload is the next message on the ZMQ socket
KIND_RAW_BYTES = 0x02  # the payload is the enqueued bytes as-is (else: msgpack of an object)

_READY = b"lmserve-ring-ready"  # first message on the PUB socket, after every reader subscribed
_ZMQ_ZERO_COPY_MIN_BYTES = 64 * 1024  # below this, zero-copy send costs more than it saves
_WRITER_LINGER_MS = 1000  # close() waits this long for queued overflow messages to go out

_fence_lock = threading.Lock()  # never held across a call: used only for its barrier
_attach_lock = threading.Lock()  # serializes the resource_tracker patch in _attach_untracked


def memory_fence() -> None:
    """A full memory barrier (see the module docstring for what it relies on)."""
    _fence_lock.acquire()
    _fence_lock.release()


def _attach_untracked(name: str) -> SharedMemory:
    """Attach to an existing segment without registering it with this process's resource tracker.

    Before Python 3.13 attaching registers the segment too, so the tracker of a reader process
    would unlink the writer's segment (and warn of a "leak") when the reader exits. The writer
    alone owns the segment: it registered it on creation and unlinks it in close().
    """
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)
    with _attach_lock:
        register = resource_tracker.register
        resource_tracker.register = lambda *args, **kwargs: None
        try:
            return SharedMemory(name=name)
        finally:
            resource_tracker.register = register


class _Backoff:
    """Poll with sched_yield for SPIN_S, then sleep for doubling intervals up to MAX_SLEEP_S.

    wait() raises TimeoutError once `timeout` seconds have passed since construction.
    """

    __slots__ = ("deadline", "spin_until", "sleep_s")

    def __init__(self, timeout: float | None) -> None:
        now = time.monotonic()
        self.deadline = None if timeout is None else now + timeout
        self.spin_until = now + SPIN_S
        self.sleep_s = FIRST_SLEEP_S

    def wait(self) -> None:
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            raise TimeoutError
        if now < self.spin_until:
            os.sched_yield()
            return
        sleep_s = self.sleep_s
        if self.deadline is not None:
            sleep_s = min(sleep_s, self.deadline - now)
        time.sleep(sleep_s)
        self.sleep_s = min(self.sleep_s * 2, MAX_SLEEP_S)

    def remaining_ms(self) -> int | None:
        """Milliseconds until the deadline (for zmq poll), None without one."""
        if self.deadline is None:
            return None
        return max(0, int((self.deadline - time.monotonic()) * 1000))


class ShmRingBuffer:
    """The segment and the flag protocol; `MessageQueue` frames messages on top of it.

    Contract: exactly one writer (the process that created the segment) and `n_reader` readers,
    each with a distinct rank. The writer calls acquire_chunk(i) then publish_chunk(i) for
    i = 0, 1, 2, ... mod max_chunks and touches chunk i's bytes only between the two; reader r
    calls wait_readable(i, r) then mark_read(i, r) in the same order and only reads chunk i's bytes
    between the two.
    """

    def __init__(
        self, n_reader: int, max_chunk_bytes: int, max_chunks: int, name: str | None = None
    ) -> None:
        """name=None creates (and owns) a new segment; a name attaches to the writer's."""
        if n_reader < 1 or max_chunks < 1 or max_chunk_bytes <= CHUNK_HEADER.size:
            raise ValueError(
                f"need n_reader >= 1, max_chunks >= 1 and max_chunk_bytes > "
                f"{CHUNK_HEADER.size}; got {n_reader}, {max_chunks}, {max_chunk_bytes}"
            )
        self.n_reader = n_reader
        self.max_chunk_bytes = max_chunk_bytes
        self.max_chunks = max_chunks
        self.record_bytes = 1 + n_reader  # one metadata record: written flag + read flags
        data_bytes = max_chunks * max_chunk_bytes
        size = data_bytes + max_chunks * self.record_bytes
        self.is_owner = name is None
        if self.is_owner:
            name = f"lmserve_ring_{uuid.uuid4().hex[:16]}"
            self.shared_memory = SharedMemory(name=name, create=True, size=size)
        else:
            self.shared_memory = _attach_untracked(name)
        if self.shared_memory.size < size:
            raise ValueError(f"segment {name} has {self.shared_memory.size} bytes, need {size}")
        buf = self.shared_memory.buf
        self.data = buf[:data_bytes]  # (max_chunks * max_chunk_bytes,) chunk bytes
        self.metadata = buf[data_bytes:size]  # (max_chunks * (1 + n_reader),) flags
        if self.is_owner:
            self.metadata[:] = bytes(len(self.metadata))  # every chunk "not written"
        self._all_read = b"\x01" * n_reader
        self._none_read = bytes(n_reader)

    @property
    def name(self) -> str:
        return self.shared_memory.name

    def chunk_offset(self, idx: int) -> int:
        """Where chunk idx starts in `data`."""
        return idx * self.max_chunk_bytes

    # -- writer side --------------------------------------------------------------------------

    def is_writable(self, idx: int) -> bool:
        off, meta = idx * self.record_bytes, self.metadata
        return meta[off] == 0 or meta[off + 1 : off + self.record_bytes] == self._all_read

    def acquire_chunk(self, idx: int, timeout: float | None = None) -> None:
        """Wait until chunk idx is writable, then mark it not written; raises TimeoutError."""
        if not self.is_writable(idx):
            backoff = _Backoff(timeout)
            while not self.is_writable(idx):
                backoff.wait()
        memory_fence()  # we saw every read flag set before we overwrite the data (load -> store)
        self.metadata[idx * self.record_bytes] = 0  # state 0 11..1: no reader looks at it now
        memory_fence()  # "not written" is visible before any read flag is cleared

    def publish_chunk(self, idx: int) -> None:
        """Make chunk idx (its data written since acquire_chunk) readable by every reader.

        NOTE: the read flags are cleared BEFORE the written flag is set. The other order passes
        through state 1 11..1, "written and read by everyone", for a message nobody has read: a
        reader seeing written=1 with its stale read=1 from the previous round would take the new
        message as already consumed and skip it, and anything looking for a free chunk (the
        writer, after wrapping around) would see it as fully read and overwrite it. Clearing
        first goes 0 11..1 -> 0 00..0 -> 1 00..0, and every state on the way means what it says.
        """
        off = idx * self.record_bytes
        self.metadata[off + 1 : off + self.record_bytes] = self._none_read
        memory_fence()  # the data and cleared read flags are visible before the written flag
        self.metadata[off] = 1

    # -- reader side --------------------------------------------------------------------------

    def is_readable(self, idx: int, rank: int) -> bool:
        off = idx * self.record_bytes
        return self.metadata[off] == 1 and self.metadata[off + 1 + rank] == 0

    def wait_readable(self, idx: int, rank: int, timeout: float | None = None) -> None:
        """Wait until chunk idx holds a message reader `rank` has not read; raises TimeoutError."""
        if not self.is_readable(idx, rank):
            backoff = _Backoff(timeout)
            while not self.is_readable(idx, rank):
                backoff.wait()
        memory_fence()  # we saw the written flag before we read the data (load -> load)

    def mark_read(self, idx: int, rank: int) -> None:
        """Give chunk idx back: reader `rank` is done with its bytes."""
        memory_fence()  # our reads of the data are done before the writer may reuse it
        self.metadata[idx * self.record_bytes + 1 + rank] = 1

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Detach this process (the views must go before the mapping can close)."""
        self.data.release()
        self.metadata.release()
        self.shared_memory.close()

    def unlink(self) -> None:
        """Remove the segment's name (the owner, once); attached processes keep their mapping."""
        with contextlib.suppress(FileNotFoundError):
            self.shared_memory.unlink()


class Handle(msgspec.Struct, frozen=True):
    """What a reader process needs to attach; picklable and msgpack-able (plain fields)."""

    shm_name: str
    n_reader: int
    max_chunk_bytes: int
    max_chunks: int
    zmq_address: str  # the writer's PUB socket (ipc://...)


class MessageQueue:
    """One writer broadcasting to `n_reader` reader processes: the ring, plus ZMQ for overflow.

    Usage: the writer builds MessageQueue(n_reader), sends export_handle() to each reader process,
    which calls MessageQueue.create_from_handle(handle, rank); then every side calls
    wait_until_ready() (the writer's returns once all readers subscribed), and the writer
    enqueue()s while readers dequeue(). bytes-like objects are delivered as bytes; anything else
    goes as msgpack (msgspec: Structs, dicts, lists, str, int, ...; never pickle).

    Not thread-safe: one thread per process uses a given side. Readers are not watched for
    liveness: a dead reader leaves the ring full and the writer's enqueue blocks (pass a timeout,
    or watch the processes, as the executor does).
    """

    def __init__(
        self,
        n_reader: int,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        max_chunks: int = DEFAULT_MAX_CHUNKS,
    ) -> None:
        """The writer side: creates the segment and binds the overflow PUB socket."""
        self.buffer = ShmRingBuffer(n_reader, max_chunk_bytes, max_chunks)
        self.n_reader = n_reader
        self.reader_rank: int | None = None  # None: this is the writer
        self._ipc_dir = tempfile.mkdtemp(prefix="lmserve-mq-", dir=envs.LMSERVE_RPC_BASE_PATH)
        self._address = f"ipc://{self._ipc_dir}/overflow"
        self._ctx = zmq.Context()
        # XPUB, verbose: the socket hands us every subscription, which is how wait_until_ready
        # knows each reader's SUB is connected (PUB/SUB drops what is sent before that).
        self._socket = self._ctx.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.XPUB_VERBOSE, 1)
        # No high-water mark: PUB would drop, not block, past it. What is in flight is bounded
        # anyway: each overflow message holds a ring chunk until every reader has taken it.
        self._socket.setsockopt(zmq.SNDHWM, 0)
        self._socket.bind(self._address)
        self._init_common()

    @staticmethod
    def create_from_handle(handle: Handle | Mapping[str, Any], reader_rank: int) -> MessageQueue:
        """The reader side, in another process; `handle` may also be its decoded msgpack dict."""
        if not isinstance(handle, Handle):
            handle = msgspec.convert(handle, Handle)
        if not 0 <= reader_rank < handle.n_reader:
            raise ValueError(f"reader_rank {reader_rank} not in [0, {handle.n_reader})")
        self = MessageQueue.__new__(MessageQueue)
        self.buffer = ShmRingBuffer(
            handle.n_reader, handle.max_chunk_bytes, handle.max_chunks, name=handle.shm_name
        )
        self.n_reader = handle.n_reader
        self.reader_rank = reader_rank
        self._ipc_dir = None
        self._address = handle.zmq_address
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.connect(self._address)
        self._init_common()
        return self

    def _init_common(self) -> None:
        self._current_idx = 0  # the next chunk this side writes or reads
        self._max_inline_bytes = self.buffer.max_chunk_bytes - CHUNK_HEADER.size
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder()
        self._ready = False
        self._closed = False

    @property
    def is_writer(self) -> bool:
        return self.reader_rank is None

    def export_handle(self) -> Handle:
        return Handle(
            shm_name=self.buffer.name,
            n_reader=self.n_reader,
            max_chunk_bytes=self.buffer.max_chunk_bytes,
            max_chunks=self.buffer.max_chunks,
            zmq_address=self._address,
        )

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Writer: block until every reader's SUB socket is subscribed, then publish READY.
        Reader: block until READY arrives. Both raise TimeoutError after `timeout` seconds.

        Readers attach to the ring when created, so the ring loses nothing; this handshake exists
        for the overflow socket (PUB/SUB's "slow joiner": messages published before a subscriber
        is connected are silently dropped). Must precede the first enqueue / dequeue.
        """
        if self._ready:
            return
        backoff = _Backoff(timeout)
        if self.is_writer:
            subscribed = 0
            while subscribed < self.n_reader:
                if not self._socket.poll(backoff.remaining_ms()):
                    raise TimeoutError(f"{subscribed} of {self.n_reader} readers subscribed")
                if self._socket.recv()[:1] == b"\x01":  # \x01 + topic: a subscription
                    subscribed += 1
            self._socket.send(_READY)
        else:
            if not self._socket.poll(backoff.remaining_ms()):
                raise TimeoutError("the writer did not report ready")
            message = self._socket.recv()
            if message != _READY:
                raise RuntimeError(f"expected the writer's READY, got {message[:32]!r}")
        self._ready = True

    def enqueue(self, obj: Any, timeout: float | None = None) -> None:
        """Writer only. Blocks while the ring is full; raises TimeoutError after `timeout` s
        (nothing is sent then)."""
        if not self.is_writer:
            raise RuntimeError("enqueue() is for the writer; readers dequeue()")
        self._check_ready()
        if isinstance(obj, (bytes, bytearray, memoryview)):
            payload, kind = memoryview(obj).cast("B"), KIND_RAW_BYTES
            immutable = isinstance(obj, bytes)  # the caller may change a bytearray after we return
        else:
            payload, kind, immutable = memoryview(self._encoder.encode(obj)), 0, True
        idx = self._current_idx
        chunk = self.buffer.chunk_offset(idx)
        try:
            self.buffer.acquire_chunk(idx, timeout)
        except TimeoutError:
            raise TimeoutError(f"the ring stayed full for {timeout} s") from None
        if payload.nbytes > self._max_inline_bytes:
            # Published before the chunk, so a reader that sees the marker finds it on the socket.
            zero_copy = immutable and payload.nbytes >= _ZMQ_ZERO_COPY_MIN_BYTES
            self._socket.send(payload, copy=not zero_copy)
            CHUNK_HEADER.pack_into(self.buffer.data, chunk, 0, kind | KIND_OVERFLOW)
        else:
            CHUNK_HEADER.pack_into(self.buffer.data, chunk, payload.nbytes, kind)
            start = chunk + CHUNK_HEADER.size
            self.buffer.data[start : start + payload.nbytes] = payload
        self.buffer.publish_chunk(idx)
        self._current_idx = (idx + 1) % self.buffer.max_chunks

    def dequeue(self, timeout: float | None = None) -> Any:
        """Reader only: the next message, in the writer's order. Raises TimeoutError if none
        arrives within `timeout` s (the message is then still there for the next call)."""
        if self.is_writer:
            raise RuntimeError("dequeue() is for readers; the writer enqueue()s")
        self._check_ready()
        idx, rank = self._current_idx, self.reader_rank
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self.buffer.wait_readable(idx, rank, timeout)
        except TimeoutError:
            raise TimeoutError(f"no message within {timeout} s") from None
        chunk = self.buffer.chunk_offset(idx)
        length, kind = CHUNK_HEADER.unpack_from(self.buffer.data, chunk)
        if kind & KIND_OVERFLOW:
            obj = self._recv_overflow(kind, deadline)
        else:
            start = chunk + CHUNK_HEADER.size
            with self.buffer.data[start : start + length] as payload:
                obj = bytes(payload) if kind & KIND_RAW_BYTES else self._decoder.decode(payload)
        self.buffer.mark_read(idx, rank)
        self._current_idx = (idx + 1) % self.buffer.max_chunks
        return obj

    def _recv_overflow(self, kind: int, deadline: float | None) -> Any:
        # The writer published before setting the written flag, so the message is on its way.
        wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        if not self._socket.poll(wait_ms):
            raise TimeoutError("an overflow message did not arrive in time")
        frame = self._socket.recv(copy=False)
        return frame.bytes if kind & KIND_RAW_BYTES else self._decoder.decode(frame.buffer)

    def _check_ready(self) -> None:
        if self._closed:
            raise RuntimeError("the MessageQueue is closed")
        if not self._ready:
            raise RuntimeError("call wait_until_ready() on every side before the first message")

    def close(self) -> None:
        """Readers detach; the writer also unlinks the segment. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._socket.close(linger=_WRITER_LINGER_MS if self.is_writer else 0)
        self._ctx.term()
        self.buffer.close()
        if self.is_writer:
            self.buffer.unlink()
            shutil.rmtree(self._ipc_dir, ignore_errors=True)

    def __enter__(self) -> MessageQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        side = "writer" if self.is_writer else f"reader {self.reader_rank}"
        return (
            f"MessageQueue({side}, n_reader={self.n_reader}, shm={self.buffer.name}, "
            f"{self.buffer.max_chunks}x{self.buffer.max_chunk_bytes} B)"
        )


__all__ = ["Handle", "MessageQueue", "ShmRingBuffer", "memory_fence"]
