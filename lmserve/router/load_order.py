"""What routing logics keep per candidate set so that a decision does not visit every backend.

    LoadOrder      the candidates bucketed by a key (least-loaded: `Backend.load`; kv-aware: its
                   queue cost), updated when a backend's load fields change: the lowest key,
                   the backends tied there and how many lie within a bound cost O(distinct keys
                   up to it), not O(backends)
    AnchorRing     a consistent-hash ring of the candidates: from a prompt's anchor, the first
                   backend clockwise that passes a test (kv-aware's tie-break)
    PerCandidates  the cache: one derived object per `Candidates` (the pool's immutable
                   candidate set), dropped when the pool retires that set

    keys (sorted, distinct)    0.0        1.0            3.0
    buckets                    [2, 7]     [0, 1, 5]      [3, 4, 6]      candidate positions,
                                                                        sorted, per key
A backend whose load changes moves from one bucket to another (a bisect in each); the candidate
list itself is never rescanned. Ties are taken in candidate (URL) order, as a scan would.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

import xxhash

from lmserve.router.backends import LOAD_FIELDS, Backend, Candidates

T = TypeVar("T")


class LoadOrder:
    """`candidates` bucketed by `key(backend)`, a function of the backend's LOAD_FIELDS.

    With `watch`, the order registers with each backend and stays current as their loads
    change (call `close` when done with it); without, it is a snapshot for one decision."""

    def __init__(
        self, candidates: Sequence[Backend], key: Callable[[Backend], float], watch: bool
    ) -> None:
        self.candidates = candidates
        self.key = key
        self.position = {b: i for i, b in enumerate(candidates)}
        self.key_of: dict[Backend, float] = {}
        self._buckets: dict[float, list[int]] = {}  # key -> candidate positions, ascending
        self._keys: list[float] = []  # the distinct keys, ascending
        for i, backend in enumerate(candidates):
            self._insert(key(backend), i)
            self.key_of[backend] = key(backend)
        self._watching = watch
        if watch:
            for backend in candidates:
                backend.watchers.append(self)

    def close(self) -> None:
        if self._watching:
            for backend in self.candidates:
                backend.watchers.remove(self)
            self._watching = False

    def backend_changed(self, backend: Backend, field_name: str) -> None:
        if field_name in LOAD_FIELDS:
            self.update(backend)

    def update(self, backend: Backend) -> None:
        """Re-file `backend` under its current key."""
        new, old = self.key(backend), self.key_of[backend]
        if new != old:
            i = self.position[backend]
            self._delete(old, i)
            self._insert(new, i)
            self.key_of[backend] = new

    # ---- queries -------------------------------------------------------------------------------
    def lowest(self) -> float:
        return self._keys[0]

    def tied_lowest(self) -> list[int]:
        """Positions (in `candidates`) of the backends with the lowest key, ascending."""
        return self._buckets[self._keys[0]]

    def count_at_most(self, limit: float) -> int:
        """How many backends have a key <= limit."""
        count = 0
        for k in self._keys:
            if k > limit:
                break
            count += len(self._buckets[k])
        return count

    def at_most(self, limit: float) -> Iterator[Backend]:
        """The backends with a key <= limit, lowest key first."""
        for k in self._keys:
            if k > limit:
                return
            for i in self._buckets[k]:
                yield self.candidates[i]

    # ---- buckets -------------------------------------------------------------------------------
    def _insert(self, key: float, i: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [i]
            bisect.insort(self._keys, key)
        else:
            bisect.insort(bucket, i)

    def _delete(self, key: float, i: int) -> None:
        bucket = self._buckets[key]
        del bucket[bisect.bisect_left(bucket, i)]
        if not bucket:
            del self._buckets[key]
            del self._keys[bisect.bisect_left(self._keys, key)]


class AnchorRing:
    """`vnodes` points per candidate on a 64-bit ring (xxh64 of "url#i": the same in every
    router process). `first(anchor, ok)` is the backend owning the first point at or after the
    anchor's hash whose backend passes `ok`: deterministic, the same backend for one anchor
    while it passes, the next one clockwise when it does not, and unrelated anchors spread over
    all candidates (each owns ~1/N of the ring, +-1/sqrt(vnodes)).

    Two ways to the same answer (`first_of` and `walk`): walk the ring from the anchor (about
    N / passing points visited), or take, for each backend of a known small passing set, its
    first point after the anchor (a bisect in its own points) and keep the nearest."""

    MOD = 1 << 64

    def __init__(self, candidates: Sequence[Backend], vnodes: int = 64, build: bool = True) -> None:
        self.candidates = candidates
        self.vnodes = vnodes
        self._hashes: list[int] = []  # every point, ascending (else built on the first walk)
        self._owners: list[int] = []  # the candidate position owning each point
        self._own_points: dict[int, list[int]] = {}  # position -> its sorted points (lazily)
        if build:
            self._build()

    def points_of(self, url: str) -> list[int]:
        return sorted(_hash64(f"{url}#{i}".encode()) for i in range(self.vnodes))

    def walk(self, anchor: int, ok: Callable[[Backend], bool]) -> Backend | None:
        """The first backend clockwise from `anchor` that passes `ok` (None if none does)."""
        if not self._hashes:
            self._build()
        hashes, owners, candidates = self._hashes, self._owners, self.candidates
        start, n = bisect.bisect_left(hashes, anchor), len(hashes)
        for j in range(start, start + n):
            backend = candidates[owners[j % n]]
            if ok(backend):
                return backend
        return None

    def first(self, anchor: int, members: Sequence[int]) -> Backend:
        """`first_of` or `walk` (the same answer), whichever visits fewer points."""
        if len(members) ** 2 <= len(self.candidates):
            return self.first_of(anchor, members)
        passing = {self.candidates[i] for i in members}
        return self.walk(anchor, passing.__contains__)  # type: ignore[return-value]

    def _build(self) -> None:
        points = sorted(
            (h, i) for i, b in enumerate(self.candidates) for h in self.points_of(b.url)
        )
        self._hashes = [h for h, _ in points]
        self._owners = [i for _, i in points]

    def first_of(self, anchor: int, members: Sequence[int]) -> Backend:
        """`walk`'s answer when exactly the backends at positions `members` (non-empty) pass:
        O(len(members) x log vnodes)."""
        best = None
        for i in members:
            own = self._own_points.get(i)
            if own is None:
                own = self._own_points[i] = self.points_of(self.candidates[i].url)
            k = bisect.bisect_left(own, anchor)
            distance = own[k] - anchor if k < len(own) else own[0] + self.MOD - anchor
            if best is None or (distance, i) < best:
                best = (distance, i)
        return self.candidates[best[1]]


def anchor_hash(anchor: bytes) -> int:
    return _hash64(anchor)


def _hash64(data: bytes) -> int:
    return xxhash.xxh64_intdigest(data)


class PerCandidates(Generic[T]):
    """One `build(candidates, cached)` per candidate set: kept while a pool's `Candidates` is
    current (at most `limit` sets; the oldest goes first), built afresh for any other sequence
    (a proxy's retry list, a test's list), whose contents may change between calls."""

    def __init__(
        self,
        build: Callable[[Sequence[Backend], bool], T],
        close: Callable[[T], None] = lambda _: None,
        limit: int = 4,
    ) -> None:
        self.build = build
        self.close = close
        self.limit = limit
        self._entries: dict[int, tuple[Candidates, T]] = {}  # id(candidates) -> (it, derived)

    def get(self, candidates: Sequence[Backend]) -> T:
        if not isinstance(candidates, Candidates):
            return self.build(candidates, False)
        entry = self._entries.get(id(candidates))
        if entry is not None and entry[0] is candidates:
            return entry[1]
        self._drop(lambda c: c.retired)
        if len(self._entries) >= self.limit:
            oldest = next(iter(self._entries.values()))[0]
            self._drop(lambda c: c is oldest)
        derived = self.build(candidates, True)
        self._entries[id(candidates)] = (candidates, derived)
        return derived

    def _drop(self, which: Callable[[Candidates], bool]) -> None:
        for key, (candidates, derived) in list(self._entries.items()):
            if which(candidates):
                del self._entries[key]
                self.close(derived)
