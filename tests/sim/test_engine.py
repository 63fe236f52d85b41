"""The simulated engine keeps the real scheduler's budget and the real prefix cache's blocks,
hashes and events."""

from __future__ import annotations

import msgspec
import pytest

from lmserve.core.kv_events import KVEventBatch
from lmserve.prefix_hash import block_hashes
from lmserve.router.kv_index import KVIndex
from lmserve.sim.engine import SimEngine, SimRequest
from lmserve.sim.workload import WorkloadSpec
from tests.sim.conftest import run_cluster


class Recorder:
    """An engine with its hooks recorded, driven step by step as the cluster drives it."""

    def __init__(self, profile, **limits) -> None:
        self.first: dict[int, float] = {}
        self.done: dict[int, float] = {}
        self.index = KVIndex()
        self.batches: list[bytes] = []
        self.engine = SimEngine(
            "http://e0", profile.with_overrides(**limits),
            lambda r, t: self.first.__setitem__(r.request_id, t),
            lambda r, t: self.done.__setitem__(r.request_id, t),
            self._events,
        )  # fmt: skip
        self.now = 0.0

    def _events(self, engine, payload: bytes, now: float) -> None:
        self.batches.append(payload)
        self.index.apply(engine.url, payload)

    def submit(self, request: SimRequest) -> None:
        if self.engine.add(request, self.now):
            self.engine.start_step(self.now)

    def step(self) -> None:
        self.now = self.engine.step_end_s
        self.engine.on_step_end(self.now)
        self.engine.start_step(self.now)

    def run(self) -> None:
        while self.engine.busy:
            self.step()


def request(i: int, ids: list[int], prompt_len: int, max_tokens: int) -> SimRequest:
    return SimRequest(i, ids, block_hashes(ids, 16), prompt_len, max_tokens)


def test_a_shared_prefix_hits_in_whole_blocks_short_of_the_last_token(profile):
    r = Recorder(profile)
    prefix = list(range(100, 164))  # 4 blocks
    r.submit(request(1, prefix + [7] * 8 + [9] * 4, 72, 4))
    r.run()
    r.submit(request(2, prefix + [8] * 8 + [9] * 4, 72, 4))
    r.run()
    r.submit(request(3, prefix + [7] * 8 + [9] * 4, 72, 4))  # the same prompt again
    r.run()
    stats = r.engine.stats
    # 2 hits 4 blocks (the 5th differs); 3 hits 4 blocks (its last token stays uncomputed:
    # 72 tokens = 4.5 blocks, the 5th block was never full)
    assert stats.prefix_queries == 3 * 72 and stats.prefix_hits == 64 + 64


def test_chunked_prefill_takes_the_token_budget_per_step(profile):
    r = Recorder(profile, max_num_batched_tokens=256)
    r.submit(request(1, list(range(8, 8 + 1000 + 2)), 1000, 2))
    r.run()
    steps = [0.010 + 1e-5 * n for n in (256, 256, 256, 232)]  # the last chunk samples
    assert r.first[1] == pytest.approx(sum(steps))
    assert r.done[1] == pytest.approx(sum(steps) + 0.010 + 1e-4)


def test_a_prompt_chunk_pays_for_attending_to_its_cached_prefix(profile):
    """A 32-token question after a 64-token cached prefix costs 32 * (64 + 33/2) pairs."""
    p = profile.with_overrides(per_attention_pair_s=1e-6)
    r = Recorder(p)
    prefix = list(range(100, 164))  # 4 blocks
    r.submit(request(1, prefix + [7], 65, 1))
    r.run()
    start = r.now
    r.submit(request(2, prefix + list(range(300, 332)), 96, 1))
    r.run()
    pairs = 32 * (64 + 33 / 2)
    assert r.first[2] - start == pytest.approx(0.010 + 1e-5 * 32 + 1e-6 * pairs)
    assert r.first[1] == pytest.approx(0.010 + 1e-5 * 65 + 1e-6 * 65 * 66 / 2)


def test_a_decode_run_is_timed_as_its_steps_one_by_one(profile):
    p = profile.with_overrides(per_context_token_s=1e-6)
    r = Recorder(p)
    r.submit(request(1, list(range(8, 8 + 40 + 30)), 40, 30))
    r.run()
    expected = 0.010 + 1e-5 * 40 + 1e-6 * 40  # the prefill, then 29 decode steps
    expected += sum(0.010 + 1e-4 + 1e-6 * (41 + i) for i in range(29))
    assert r.done[1] == pytest.approx(expected)
    assert r.engine.stats.steps == 30


def test_an_arrival_cuts_a_decode_run_at_the_step_in_flight(profile):
    r = Recorder(profile)
    r.submit(request(1, list(range(8, 8 + 16 + 100)), 16, 100))
    r.step()  # the prefill (10.16 ms); then one run of 99 decode steps of 10.1 ms
    assert r.engine.step_end_s == pytest.approx(0.01016 + 99 * 0.0101)
    r.now = 0.0502  # inside the 4th decode step
    assert not r.engine.add(request(2, list(range(500, 500 + 16 + 2)), 16, 2), r.now)
    assert r.engine.step_end_s == pytest.approx(0.01016 + 4 * 0.0101)
    r.run()
    assert r.first[2] == pytest.approx(0.01016 + 4 * 0.0101 + 0.010 + 1e-5 * 16 + 1e-4)


def test_the_index_fed_the_engines_events_holds_what_its_cache_holds(profile):
    """Under KV pressure (evictions), the router's own KVIndex, fed the msgpack batches, ends
    with exactly the engine's cached hashes; the layout it learns is the engine's."""
    r = Recorder(profile, num_gpu_blocks=24)
    for i in range(12):
        ids = [1000 + i] * 16 + list(range(8 + 50 * i, 8 + 50 * i + 80))
        r.submit(request(i, ids, 64, 32))
        r.run()
    assert r.engine.stats.evicted_blocks > 0
    assert r.index.held["http://e0"] == set(r.engine.refs)
    layout = r.index.layouts["http://e0"]
    assert (layout.block_size, layout.hash_algo) == (16, "sha256")
    batch = msgspec.msgpack.decode(r.batches[0], type=KVEventBatch)  # the engine's own schema
    assert type(batch.events[0]).__name__ == "BlockStored"


def test_running_out_of_blocks_preempts_the_latest_request_which_finishes_later(profile):
    r = Recorder(profile, num_gpu_blocks=12, max_num_seqs=4)
    for i in range(3):
        r.submit(request(i, list(range(8 + 200 * i, 8 + 200 * i + 48 + 64)), 48, 64))
    r.run()
    assert r.engine.stats.preemptions > 0
    assert sorted(r.done) == [0, 1, 2]
    assert r.engine.num_free_blocks == 12  # everything given back


def test_every_request_of_a_workload_finishes_and_blocks_are_returned(profile):
    cluster = run_cluster(profile, WorkloadSpec("random", request_rate=50.0, num_prompts=200,
                                                input_len=200, output_len=40, vocab_size=2048))  # fmt: skip
    assert len(cluster.records) == 200
    for pod in cluster.pods:
        assert pod.engine.num_free_blocks == profile.num_gpu_blocks
        assert not pod.engine.running and not pod.engine.waiting


def test_a_run_leaves_objects_the_caller_froze_frozen(profile):
    """The run freezes its own block maps only when nothing else is frozen: thawing at the end
    must not thaw what the caller froze."""
    import gc

    from tests.sim.conftest import multi_round

    gc.freeze()
    try:
        before = gc.get_freeze_count()
        run_cluster(profile, multi_round(num_users=4, num_rounds=1))
        assert gc.get_freeze_count() > before // 2  # not thawed (objects freed meanwhile leave)
    finally:
        gc.unfreeze()
    run_cluster(profile, multi_round(num_users=4, num_rounds=1))
    assert gc.get_freeze_count() == 0  # its own freeze is undone


def test_a_run_collects_each_simulated_minute_while_collections_find_garbage(profile, monkeypatch):
    """The loop collects and freezes once a simulated minute with automatic collection off,
    for as long as the collections find cyclic garbage; afterwards the collector is as the
    caller had it and nothing stays frozen."""
    import gc

    import lmserve.sim.cluster as cluster_module
    from tests.sim.conftest import multi_round

    rounds: list[int] = []
    real_freeze, real_collect = gc.freeze, gc.collect
    monkeypatch.setattr(cluster_module.gc, "freeze", lambda: (rounds.append(1), real_freeze()))
    monkeypatch.setattr(cluster_module.gc, "collect", lambda: real_collect() + 1)  # "garbage"
    monkeypatch.setattr(cluster_module, "FREEZE_EVERY_S", 1.0)
    assert gc.isenabled()
    cluster = run_cluster(profile, multi_round())
    assert cluster.end_s > 4
    assert len(rounds) >= int(cluster.end_s)  # the start's, then one a simulated second
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_run_stops_collecting_after_collections_that_find_no_garbage(profile, monkeypatch):
    """The simulation makes no reference cycles: after CLEAN_COLLECTIONS_TO_STOP collections
    in a row that free nothing, no more collections (each walks every new index entry)."""
    import gc

    import lmserve.sim.cluster as cluster_module
    from tests.sim.conftest import multi_round

    found: list[int] = []
    real_collect = gc.collect
    monkeypatch.setattr(cluster_module.gc, "collect", lambda: found.append(real_collect()) or 0)
    monkeypatch.setattr(cluster_module, "FREEZE_EVERY_S", 1.0)
    cluster = run_cluster(profile, multi_round())
    assert cluster.end_s > 4  # room for more collections than were made
    assert len(found) == cluster_module.CLEAN_COLLECTIONS_TO_STOP
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_keyed_blocks_give_the_same_run_as_the_engines_sha256_chain(profile, monkeypatch):
    """Logics that do not read block keys run on the cheaper Python-hash chain: the caches
    match the same blocks, so every request's record is the one SHA-256 keys give."""
    import lmserve.sim.cluster as cluster_module
    from lmserve.sim.workload import KEYS_ONLY
    from tests.sim.conftest import multi_round

    spec = multi_round(num_users=40, num_rounds=4)
    fast = run_cluster(profile, spec, "prefix-aware")
    assert fast.logic.needs_tokens is False  # so it ran on KEYS_ONLY
    monkeypatch.setattr(cluster_module, "KEYS_ONLY", "sha256")
    exact = run_cluster(profile, spec, "prefix-aware")
    assert KEYS_ONLY != "sha256"
    assert fast.records.as_array().tolist() == exact.records.as_array().tolist()
    hits = [sum(p.engine.stats.prefix_hits for p in c.pods) for c in (fast, exact)]
    assert hits[0] == hits[1] > 0
