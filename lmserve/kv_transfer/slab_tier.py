"""The CPU tier as slots of host memory (pinned on CUDA) that KV is copied into and out of by
the device's copy engines, with no Python-level copy of the bytes.

    segments (allocated as needed, 256 MiB each):  [slot 0][slot 1]...[slot k-1] [slot k]...
    _entries: key -> slot, LRU order (only slots whose copy finished: `commit`)
    _readers: slot -> loads reading it right now (never evicted while > 0)

Every chunk of an engine has the same size, so the first one sets the slot size. A save
`reserve`s a slot (evicting the least recently used unread one), has the device copy the chunk
into it, and `commit`s it once the copy is done: a lookup never sees half-written KV. A load
`acquire`s the slot (the device copies from it) and `release`s it after. On the CPU the slots
are ordinary memory and the same code runs.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import torch

from lmserve.kv_transfer.store import Tier

_SEGMENT_BYTES = 256 << 20


class SlabCPUTier(Tier):
    name = "cpu"
    blocking = False  # TieredStore writes it in the caller's thread

    def __init__(self, capacity_bytes: int, pin: bool) -> None:
        super().__init__()
        self.capacity_bytes = capacity_bytes
        self.pin = pin
        self._lock = threading.Lock()
        self.slot_bytes: int | None = None  # set by the first chunk
        self._segments: list[torch.Tensor] = []  # each [slots_per_segment, slot_bytes] uint8
        self._slots_per_segment = 0
        self._num_slots = 0  # slots made so far
        self._max_slots = 0
        self._free: list[int] = []
        self._entries: OrderedDict[str, int] = OrderedDict()
        self._readers: dict[int, int] = {}
        # (stored?, key) since the last take_changes(), when someone asked (track_changes)
        self._changes: list[tuple[bool, str]] | None = None

    def track_changes(self) -> None:
        with self._lock:
            if self._changes is None:
                self._changes = []

    def take_changes(self) -> list[tuple[bool, str]]:
        """(True, key) per commit and (False, key) per eviction since the last call, in order."""
        with self._lock:
            if not self._changes:
                return []
            changes, self._changes = self._changes, []
        return changes

    def __len__(self) -> int:
        return len(self._entries)

    # ---- lookups ------------------------------------------------------------------------------
    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        with self._lock:
            return [key in self._entries for key in keys]

    def acquire(self, key: str) -> tuple[int, torch.Tensor] | None:
        """(slot, its bytes) for a load, which must `release(slot)` once its copy is done."""
        with self._lock:
            slot = self._entries.get(key)
            if slot is None:
                return None
            self._entries.move_to_end(key)
            self._readers[slot] = self._readers.get(slot, 0) + 1
        self.stats.record_load(self.name, self.slot_bytes, 0.0)
        return slot, self._view(slot)

    def release(self, slot: int) -> None:
        with self._lock:
            self._readers[slot] -= 1
            if not self._readers[slot]:
                del self._readers[slot]

    def get(self, key: str) -> bytes | None:
        """A copy of the payload (for callers that want bytes; loads use `acquire`)."""
        held = self.acquire(key)
        if held is None:
            return None
        slot, view = held
        try:
            return view.numpy().tobytes()
        finally:
            self.release(slot)

    # ---- stores -------------------------------------------------------------------------------
    def reserve(self, key: str, nbytes: int) -> tuple[int, torch.Tensor] | None:
        """A slot to copy a new chunk into, invisible until `commit`; None when the key is
        already here, the size is not the engine's chunk size, or every slot is being read."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return None
            if self.slot_bytes is None:
                self._size_slots(nbytes)
            if nbytes != self.slot_bytes:
                failure = f"a {nbytes}-byte chunk in {self.slot_bytes}-byte slots"
            else:
                slot = self._take_slot()
                failure = None if slot is not None else "every slot is being read"
        if failure is not None:
            self.report_failure("full" if nbytes == self.slot_bytes else "size", failure)
            return None
        return slot, self._view(slot)

    def commit(self, key: str, slot: int, seconds: float = 0.0) -> None:
        with self._lock:
            if key in self._entries:  # stored by another path meanwhile: keep one copy
                self._free.append(slot)
                return
            self._entries[key] = slot
            if self._changes is not None:
                self._changes.append((True, key))
        self.stats.record_save(self.name, self.slot_bytes, seconds)

    def put(self, key: str, payload: bytes) -> bool:
        """Copy `payload` into a slot (a promotion from a slower tier)."""
        start = time.perf_counter()
        reserved = self.reserve(key, len(payload))
        if reserved is None:
            return self.contains(key)
        slot, view = reserved
        view.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        self.commit(key, slot, time.perf_counter() - start)
        return True

    def preallocate(self, slot_bytes: int) -> None:
        """Allocate every slot now. Pinning host memory holds a driver lock that stalls the
        device's other work (seen on an H100: ~0.2 s per 256 MiB segment, every launch of the
        serving thread waiting), so the engine pays it once at start-up, not while serving."""
        with self._lock:
            if self.slot_bytes is None:
                self._size_slots(slot_bytes)
            while self._num_slots < self._max_slots:
                self._free.append(self._new_slot())

    # ---- slots (under the lock) ---------------------------------------------------------------
    def _size_slots(self, nbytes: int) -> None:
        self.slot_bytes = nbytes
        self._max_slots = self.capacity_bytes // nbytes
        self._slots_per_segment = max(1, min(_SEGMENT_BYTES // nbytes, self._max_slots))

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        if self._num_slots < self._max_slots:
            return self._new_slot()
        for key, slot in self._entries.items():  # least recently used first
            if slot not in self._readers:
                del self._entries[key]
                if self._changes is not None:
                    self._changes.append((False, key))
                return slot
        return None

    def _new_slot(self) -> int:
        if self._num_slots == len(self._segments) * self._slots_per_segment:
            count = min(self._slots_per_segment, self._max_slots - self._num_slots)
            # NOTE never an inference tensor (the worker may call this under inference_mode,
            # e.g. from its profiling run): the saver thread writes the slots outside it.
            with torch.inference_mode(False):
                segment = torch.empty(
                    (count, self.slot_bytes), dtype=torch.uint8, pin_memory=self.pin
                )
            self._segments.append(segment)
        self._num_slots += 1
        return self._num_slots - 1

    def _view(self, slot: int) -> torch.Tensor:
        return self._segments[slot // self._slots_per_segment][slot % self._slots_per_segment]
