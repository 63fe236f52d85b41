"""The structures that keep a routing decision from visiting every backend: the pool's candidate
sets, the incrementally kept load order, the anchor ring; and that a decision's cost does not
grow with the number of backends (counted in executed lines of router code, never timed)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import msgspec
import pytest

from lmserve.core.kv_events import BlockStored, KVEventBatch
from lmserve.prefix_hash import block_hashes
from lmserve.router import routing
from lmserve.router.backends import Backend, BackendPool, Candidates
from lmserve.router.kv_aware import KvAware
from lmserve.router.kv_index import KVIndex
from lmserve.router.load_order import AnchorRing, LoadOrder, PerCandidates
from lmserve.router.prefix_trie import PrefixTrie
from lmserve.router.routing import LeastLoaded, PrefixAware, RouteRequest, SessionAffinity

ROUTER_DIR = str(Path(routing.__file__).parent)


def pool_of(n: int, model: str = "m") -> BackendPool:
    pool = BackendPool()
    for i in range(n):
        backend = pool.add(f"http://e{i:05d}:8000")
        backend.model_cards = [{"id": model}]
        backend.healthy = True
    return pool


def random_load_change(backend: Backend, rng: random.Random) -> None:
    field = rng.choice(
        ["in_flight", "scraped_running", "scraped_waiting", "in_flight_at_scrape",
         "pending_prefill_tokens"]
    )  # fmt: skip
    setattr(backend, field, rng.randint(0, 900 if field == "pending_prefill_tokens" else 6))


# ---- the pool's candidate sets -------------------------------------------------------------------
def test_the_pool_hands_out_one_candidate_set_until_membership_health_or_models_change():
    pool = pool_of(4)
    first = pool.candidates("m")
    assert isinstance(first, Candidates) and pool.candidates("m") is first
    pool.get("http://e00001:8000").in_flight += 3  # load is not membership
    assert pool.candidates("m") is first and not first.retired
    pool.get("http://e00001:8000").healthy = False
    second = pool.candidates("m")
    assert first.retired and second is not first and len(second) == 3
    pool.get("http://e00002:8000").model_cards = [{"id": "other"}]
    assert second.retired and [b.url[-6:-5] for b in pool.candidates("m")] == ["0", "3"]
    pool.add("http://new:8000")
    assert pool.candidates("m").retired is False and pool.candidates(None) is not None
    pool.remove("http://e00000:8000")
    assert [b.url for b in pool.candidates("m")] == ["http://e00003:8000"]


def test_a_backend_tells_its_watchers_only_of_changed_values():
    heard = []

    class Watcher:
        def backend_changed(self, backend, field_name):
            heard.append(field_name)

    backend = Backend("http://a:8000")
    backend.watchers.append(Watcher())
    backend.in_flight = 0  # unchanged
    backend.in_flight += 1
    backend.pending_prefill_tokens = 40
    backend.scraped_running = 0.0  # unchanged
    backend.healthy = True
    assert heard == ["in_flight", "pending_prefill_tokens", "healthy"]


# ---- the load order ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_load_order_agrees_with_a_brute_force_scan_over_random_load_updates(seed):
    rng = random.Random(seed)
    candidates = pool_of(40).candidates("m")
    order = LoadOrder(candidates, lambda b: b.load, watch=True)
    for _ in range(2000):
        random_load_change(rng.choice(candidates), rng)
        loads = [b.load for b in candidates]
        lowest = min(loads)
        assert order.lowest() == lowest
        assert order.tied_lowest() == [i for i, load in enumerate(loads) if load == lowest]
        limit = lowest + rng.choice([0, 0.5, 1, 2, 5])
        assert order.count_at_most(limit) == sum(load <= limit for load in loads)
        assert {b.url for b in order.at_most(limit)} == {
            b.url for b, load in zip(candidates, loads) if load <= limit
        }


def test_a_closed_load_order_stops_watching_and_a_retired_set_is_dropped():
    pool = pool_of(3)
    built = []
    cache = PerCandidates(
        lambda c, watch: built.append(LoadOrder(c, lambda b: b.load, watch)) or built[-1],
        LoadOrder.close,
    )
    first = cache.get(pool.candidates("m"))
    assert cache.get(pool.candidates("m")) is first and len(built) == 1
    a = pool.get("http://e00000:8000")
    assert first in a.watchers
    a.healthy = False  # the pool retires the set; the next decision drops its order
    second = cache.get(pool.candidates("m"))
    assert second is not first and first not in a.watchers
    plain = list(pool.candidates("m"))
    assert cache.get(plain) is not cache.get(plain)  # a list may change: never kept


def test_least_loaded_on_a_pool_set_decides_as_on_a_plain_list_of_it():
    rng = random.Random(5)
    candidates = pool_of(30).candidates("m")
    kept, fresh = LeastLoaded(), LeastLoaded()
    for _ in range(500):
        random_load_change(rng.choice(candidates), rng)
        a = kept.choose(RouteRequest("m"), candidates).backend
        b = fresh.choose(RouteRequest("m"), list(candidates)).backend
        assert a is b
        a.in_flight += 1


# ---- the anchor ring -----------------------------------------------------------------------------
def test_the_ring_walk_and_the_nearest_point_of_each_member_agree():
    rng = random.Random(7)
    candidates = pool_of(50).candidates("m")
    ring = AnchorRing(candidates)
    for _ in range(300):
        members = sorted(rng.sample(range(50), rng.randint(1, 50)))
        passing = {candidates[i] for i in members}
        anchor = rng.getrandbits(64)
        assert ring.first_of(anchor, members) is ring.walk(anchor, passing.__contains__)
        assert ring.first(anchor, members) is ring.walk(anchor, passing.__contains__)


def test_the_ring_spreads_unrelated_anchors_over_every_backend():
    candidates = pool_of(20).candidates("m")
    ring = AnchorRing(candidates)
    rng = random.Random(3)
    counts = {b.url: 0 for b in candidates}
    for _ in range(20_000):
        counts[ring.walk(rng.getrandbits(64), lambda b: True).url] += 1
    assert min(counts.values()) > 500 and max(counts.values()) < 1700  # mean 1,000


def test_the_ring_moves_an_anchor_only_when_its_backend_stops_passing():
    candidates = pool_of(20).candidates("m")
    ring = AnchorRing(candidates)
    anchors = [random.Random(i).getrandbits(64) for i in range(500)]
    before = [ring.walk(a, lambda b: True) for a in anchors]
    gone = before[0]
    after = [ring.walk(a, lambda b: b is not gone) for a in anchors]
    assert all(x is y for x, y in zip(before, after) if x is not gone)
    assert all(y is not gone for y in after)


# ---- kv-aware: cached and fresh state decide alike --------------------------------------------
BS = 16


def events(tokens: list[int]) -> bytes:
    hashes = block_hashes(tokens, BS, "sha256")
    stored = BlockStored(hashes, None, tokens[: len(hashes) * BS], BS)
    return msgspec.msgpack.encode(KVEventBatch(ts=1.0, events=[stored]))


def kv_logic(candidates, rng: random.Random, **kwargs) -> KvAware:
    """Every engine's layout is known; 12 engines hold one of 4 shared prefixes (as many at any
    pool size: a decision walks the prompt's holders, whose number is the workload's)."""
    index = KVIndex()
    holders = rng.sample(range(len(candidates)), 12)
    for i, b in enumerate(candidates):
        prefix = [holders.index(i) % 4] * 40 if i in holders else [9000 + rng.randint(0, 99)]
        index.apply(b.url, events(prefix + [1] * 17))
    fallback = PrefixAware(PrefixTrie(16, 1 << 20), balance_margin=4)
    return KvAware(index, lambda url: True, fallback, clock=lambda: 0.0, **kwargs)


def random_prompt(rng: random.Random) -> list[int]:
    start = [rng.randint(0, 3)] * 40 if rng.random() < 0.5 else [rng.randint(100, 10**6)] * 16
    return start + [rng.randint(0, 50_000) for _ in range(rng.randint(1, 60))]


def test_kv_aware_on_a_pool_set_decides_as_on_a_fresh_list_of_it():
    rng = random.Random(11)
    candidates = pool_of(60).candidates("m")
    kept = kv_logic(candidates, random.Random(1), pending_ttl_s=0.0)
    fresh = kv_logic(candidates, random.Random(1), pending_ttl_s=0.0)
    for _ in range(400):
        random_load_change(rng.choice(candidates), rng)
        prompt = random_prompt(rng)
        a = kept.choose(RouteRequest("m", token_ids=prompt), candidates)
        b = fresh.choose(RouteRequest("m", token_ids=prompt), list(candidates))
        assert (a.backend, a.reason, a.predicted_cached) == (
            b.backend,
            b.reason,
            b.predicted_cached,
        )
        a.backend.in_flight += 1


# ---- cost per decision does not grow with the pool ----------------------------------------------
def router_lines(fn) -> int:
    """Lines of lmserve/router code executed by fn() (a deterministic operation count)."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if not frame.f_code.co_filename.startswith(ROUTER_DIR):
            return None
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def lines_per_decision(make_logic, n: int, prompts, session: bool = False) -> float:
    rng = random.Random(n)
    candidates = pool_of(n).candidates("m")
    for b in candidates:
        b.in_flight = rng.randint(0, 3)  # a busy-ish cluster: loads spread over a few values
    logic = make_logic(candidates)
    requests = [
        RouteRequest("m", session_id=None, prompt=p, token_ids=p) for p in prompts
    ]  # fmt: skip

    def decide_all():
        for request in requests:
            decision = logic.choose(request, candidates)
            decision.backend.in_flight += 1  # as the proxy's bookkeeping does
            decision.backend.in_flight -= 1

    decide_all()  # builds the per-set state (once per change of the pool), warms the tries
    return router_lines(decide_all) / len(requests)


LOGICS = {
    "least-loaded": lambda c: LeastLoaded(),
    "session-fallback": lambda c: SessionAffinity(),
    "prefix-aware": lambda c: PrefixAware(PrefixTrie(16, 1 << 20), balance_margin=4),
    "kv-aware": lambda c: kv_logic(c, random.Random(2), pending_ttl_s=0.0),
}


@pytest.mark.parametrize("name", list(LOGICS))
def test_a_decision_costs_the_same_with_4000_backends_as_with_40(name):
    rng = random.Random(4)
    prompts = [random_prompt(rng) for _ in range(60)]
    small = lines_per_decision(LOGICS[name], 40, prompts)
    large = lines_per_decision(LOGICS[name], 4000, prompts)
    # a scan of every backend would cost ~100x more lines at 4,000 backends
    assert large < 2 * small + 20, (small, large)
