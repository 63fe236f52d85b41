"""The simulator routes with the router's own classes: change them and the simulated cluster
changes; kv-aware reads the engines' simulated events through the real index."""

from __future__ import annotations

from collections import Counter

from lmserve.router import routing
from lmserve.router.kv_aware import KvAware
from lmserve.router.routing import Decision, RoutingLogic
from tests.sim.conftest import multi_round, run_cluster


def per_replica(cluster) -> Counter:
    return Counter(int(r[6]) for r in cluster.records)


def test_patching_the_real_round_robin_class_changes_the_simulated_outcome(profile, monkeypatch):
    spec = multi_round()
    even = per_replica(run_cluster(profile, spec, "roundrobin"))
    assert len(even) == 4 and max(even.values()) - min(even.values()) <= 1

    def always_first(self, request, candidates):
        return Decision(candidates[0], "patched")

    monkeypatch.setattr(routing.RoundRobin, "choose", always_first)
    patched = run_cluster(profile, spec, "roundrobin")
    assert per_replica(patched) == Counter({0: len(patched.records)})
    assert patched.reasons == {"patched": len(patched.records)}


def test_a_logic_double_given_to_the_cluster_decides_every_request(profile):
    class LastOne(RoutingLogic):
        name = "last"

        def choose(self, request, candidates):
            return Decision(candidates[-1], "last")

    from lmserve.sim.cluster import Cluster, SimConfig

    cluster = Cluster(SimConfig("roundrobin", replicas=3), profile, multi_round(),
                      logic_factory=lambda c: LastOne()).run()  # fmt: skip
    assert per_replica(cluster) == Counter({2: len(cluster.records)})


def test_kv_aware_is_the_real_class_and_scores_from_the_engines_events(profile):
    cluster = run_cluster(profile.with_overrides(num_gpu_blocks=40), multi_round(), "kv-aware")
    assert type(cluster.logic) is KvAware
    assert cluster.logic.clock() == cluster.now  # the simulated clock, not time.monotonic
    assert cluster.reasons.get("kv_hit", 0) > len(cluster.records) / 2
    assert not any(r.startswith("kv_fallback") for r in cluster.reasons)
    # the index holds exactly what each simulated engine's cache holds
    for pod in cluster.pods:
        assert cluster.index.held.get(pod.engine.url, set()) == set(pod.engine.refs)


def test_cache_aware_logics_keep_a_users_rounds_together_under_kv_pressure(profile):
    from lmserve.sim.report import summarize

    small = profile.with_overrides(num_gpu_blocks=40)
    rates = {
        logic: summarize(run_cluster(small, multi_round(), logic))["prefix_cache_hit_rate"]
        for logic in ("roundrobin", "prefix-aware", "kv-aware")
    }
    assert rates["prefix-aware"] > rates["roundrobin"] + 0.1
    assert rates["kv-aware"] > rates["roundrobin"] + 0.1


def test_the_proxy_bookkeeping_returns_to_zero_when_everything_finished(profile):
    cluster = run_cluster(profile, multi_round(), "kv-aware")
    for backend in cluster.pool:
        assert backend.in_flight == 0 and backend.pending_prefill_tokens == 0


def test_session_affinity_keeps_every_round_of_a_user_on_one_replica(profile):
    from lmserve.sim.cluster import Cluster, SimConfig

    cluster = Cluster(SimConfig("session", replicas=4), profile, multi_round())
    placed: dict[int, set[str]] = {}
    route = cluster.route

    def recording(request):
        decision = route(request)
        placed.setdefault(request.session.user_id, set()).add(decision.backend.url)
        return decision

    cluster.route = recording
    cluster.run()
    assert cluster.reasons == {"session": len(cluster.records)}
    assert all(len(urls) == 1 for urls in placed.values()) and len(placed) == 24


def test_least_loaded_in_the_simulator_decides_as_a_scan_of_every_engine(profile):
    """The router keeps loads in an incremental order, fed by the proxy's bookkeeping and the
    simulated scrapes; a logic that scans every engine's load per request sees the same."""
    from lmserve.sim.cluster import Cluster, SimConfig

    class ScanLeastLoaded(RoutingLogic):
        name = "scan"

        def __init__(self) -> None:
            self.turn = 0

        def choose(self, request, candidates):
            loads = [b.load for b in candidates]
            tied = [b for b, load in zip(candidates, loads) if load == min(loads)]
            self.turn += 1
            return Decision(tied[self.turn % len(tied)], "least_loaded")

    spec = multi_round(num_users=40, request_rate=8.0)
    kept = run_cluster(profile, spec, "least-loaded", replicas=6)
    scan = Cluster(SimConfig("least-loaded", replicas=6), profile, spec,
                   logic_factory=lambda c: ScanLeastLoaded()).run()  # fmt: skip
    assert len(kept.records) == 120
    assert list(kept.records) == list(scan.records)
