"""The engine's block pool (refs + a lazily invalidated eviction queue) against the plain LRU it
replaced: same cached blocks, same references, same eviction order; and the compact records."""

from __future__ import annotations

import random
from collections import OrderedDict

import numpy as np
import pytest

from lmserve.sim.cluster import Records
from lmserve.sim.engine import SimEngine, SimRequest


class ReferencePool:
    """The prefix cache as the engine kept it before: refs + an OrderedDict LRU of free hashes
    (least recently freed first; a request frees its last blocks first)."""

    def __init__(self, blocks: int) -> None:
        self.refs: dict[bytes, int] = {}
        self.lru: OrderedDict[bytes, None] = OrderedDict()
        self.empty = blocks

    def free_blocks(self) -> int:
        return self.empty + len(self.lru)

    def hit(self, hashes: list[bytes]) -> int:
        n = 0
        while n < len(hashes) and hashes[n] in self.refs:
            n += 1
        return n

    def admit(self, hashes: list[bytes]) -> None:
        for h in hashes:
            if self.refs[h] == 0:
                del self.lru[h]
            self.refs[h] += 1

    def take(self, n: int) -> None:
        from_empty = min(n, self.empty)
        self.empty -= from_empty
        for _ in range(n - from_empty):
            h, _ = self.lru.popitem(last=False)
            del self.refs[h]

    def register(self, hashes: list[bytes]) -> list[bytes]:
        new = [h for h in hashes if h not in self.refs]
        for h in new:
            self.refs[h] = 1
        return new

    def free(self, shared: list[bytes], private: int) -> None:
        for h in reversed(shared):
            self.refs[h] -= 1
            if self.refs[h] == 0:
                self.lru[h] = None
        self.empty += private


def chains(rng: random.Random, n: int, length: int) -> list[list[bytes]]:
    """Hash chains sharing prefixes (a few roots, branches of them), as conversations do."""
    roots = [[f"root{r}-{i}".encode() for i in range(length // 2)] for r in range(3)]
    out = []
    for c in range(n):
        root = rng.choice(roots)[: rng.randrange(0, length // 2)]
        out.append(root + [f"c{c}-{i}".encode() for i in range(length - len(root))])
    return out


@pytest.mark.parametrize("kv_events", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_pool_matches_the_plain_lru(profile, kv_events, seed):
    rng = random.Random(seed)
    bs, blocks = profile.block_size, 64
    engine = SimEngine("http://e0", profile.with_overrides(num_gpu_blocks=blocks),
                       lambda r, t: None, lambda r, t: None,
                       (lambda e, p, t: None) if kv_events else None)  # fmt: skip
    engine.freed_slack = 0  # compact and trim the queue as often as it may
    ref = ReferencePool(blocks)
    paths = chains(rng, 12, 24)
    running: list[tuple[SimRequest, list[bytes], int]] = []
    for i in range(3000):
        if running and (rng.random() < 0.5 or len(running) > 6):
            request, shared, private = running.pop(rng.randrange(len(running)))
            engine._free(request)
            ref.free(shared, private)
        else:
            path = rng.choice(paths)
            length = rng.randrange(1, len(path) + 1)
            hashes = path[:length]
            request = SimRequest(i, [0] * (length * bs + 1), hashes, length * bs + 1, 1)
            counts = engine._lookup(request)
            hit = ref.hit(hashes)
            assert len(counts) == hit
            hit_free = sum(1 for c in counts if c <= 0)
            assert hit_free == sum(1 for h in hashes[:hit] if ref.refs[h] == 0)
            need = length - hit
            if need > engine.num_free_blocks - hit_free:
                continue
            engine._admit(request, counts, hit_free)
            engine._take_blocks(need)
            request.blocks_held += need
            request.num_computed = length * bs
            engine._register_blocks(request)
            ref.admit(hashes[:hit])
            ref.take(need)
            new = ref.register(hashes[hit:])
            running.append((request, hashes[:hit] + new, need - len(new)))
            assert request.shared == hashes[:hit] + new
        assert set(engine.refs) == set(ref.refs)
        assert {h: c for h, c in engine.refs.items() if c > 0} == {
            h: c for h, c in ref.refs.items() if c > 0
        }
        assert engine.num_cached_free == len(ref.lru)
        assert engine.num_free_blocks == ref.free_blocks()
    assert engine.stats.evicted_blocks > 100  # the eviction order was exercised


def test_records_keep_rows_compactly():
    records = Records()
    rows = [(0.5, 0.6, 1.5, 100, 10, 32, 3), (1.0, 1.25, 2.0, 7, 1, 0, 0)]
    for row in rows:
        records.append(row)
    assert len(records) == 2
    assert list(records) == [tuple(float(x) for x in row) for row in rows]
    assert np.array_equal(records.as_array(), np.array(rows, dtype=float))
    assert Records().as_array().shape == (0, 7)
