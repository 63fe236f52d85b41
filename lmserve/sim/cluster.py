"""The discrete-event simulation: clients -> the router's own code -> simulated engines.

The router is lmserve's: the routing logic classes `lmserve router` builds (routing.py's
factory, kv_aware.KvAware over a kv_index.KVIndex fed through kv_events.EventSubscriber.apply
with the msgpack batches the engines publish), the prefix trie, the backend pool and the
proxy's own bookkeeping (Proxy._began / _answering / _ended: requests in flight and queued
prefill tokens, which least-loaded and kv-aware read). What is simulated: the HTTP hops (a
fixed `request_overhead_s`), the health checker's scrape (every `health_check_interval`, the
engines' running/waiting counts land on each Backend as HealthChecker._scrape_load puts them),
and time (one clock, `Cluster.now`, which KvAware reads through its `clock` parameter).

Events on one heap: arrivals (pulled lazily from the workload), engine step ends (a decode run
is one event), scrapes, autoscaler polls and pods becoming ready.
"""

from __future__ import annotations

import gc
import heapq
import math
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmserve.router.backends import Backend, BackendPool, Candidates
from lmserve.router.config import RouterConfig
from lmserve.router.kv_aware import KvAware
from lmserve.router.kv_events import EventSubscriber
from lmserve.router.kv_index import KVIndex
from lmserve.router.metrics import RouterMetrics
from lmserve.router.prefix_trie import PrefixTrie
from lmserve.router.proxy import Proxy
from lmserve.router.routing import PrefixAware, RouteRequest, RoutingLogic, make_routing_logic
from lmserve.sim.autoscale import AutoscalePolicy, Autoscaler
from lmserve.sim.engine import SimEngine, SimRequest
from lmserve.sim.profile import StepProfile
from lmserve.sim.workload import KEYS_ONLY, Session, WorkloadSpec, sessions

MODEL = "sim-model"
_ARRIVAL, _SEND, _STEP, _SCRAPE, _POLL, _READY, _DELIVER = range(7)
_PERIODIC = frozenset({_SCRAPE, _POLL})
FREEZE_EVERY_S = 60.0  # simulated seconds between collect-and-freeze rounds (Cluster.run)
# collections in a row that find no cyclic garbage, after which the run collects no more
CLEAN_COLLECTIONS_TO_STOP = 2


@dataclass
class SimConfig:
    routing_logic: str = "roundrobin"
    replicas: int = 4
    router: RouterConfig = field(default_factory=lambda: default_router_config())
    autoscale: AutoscalePolicy | None = None
    sample_interval_s: float = 15.0  # replicas-over-time resolution
    max_sim_s: float | None = None  # hard stop (simulated seconds), default: drain everything
    warmup_s: float = 0.0  # requests sent earlier are left out of the latency figures


@dataclass
class Pod:
    """An engine and its life: created -> ready (cold start) -> removed -> drained."""

    index: int
    engine: SimEngine
    created_s: float
    ready_s: float | None = None
    removed_s: float | None = None
    drained_s: float | None = None
    backend: Backend | None = None  # its entry in the pool once ready


class Records:
    """One row per finished request: (sent, first token, finish, prompt tokens, output tokens,
    cached tokens, replica index), kept as one flat array of doubles (56 bytes a request; a
    tuple of 7 numbers is ~250 bytes, and millions of them are GC-tracked)."""

    WIDTH = 7

    def __init__(self) -> None:
        self.data = array("d")

    def append(self, row: tuple) -> None:
        self.data.extend(row)

    def __len__(self) -> int:
        return len(self.data) // self.WIDTH

    def __iter__(self) -> Iterator[tuple[float, ...]]:
        d, w = self.data, self.WIDTH
        return (tuple(d[i : i + w]) for i in range(0, len(d), w))

    def as_array(self) -> np.ndarray:
        """A (requests, 7) float array (a copy)."""
        return np.array(self.data, dtype=float).reshape(-1, self.WIDTH)


LogicFactory = Callable[["Cluster"], RoutingLogic]


class Cluster:
    def __init__(
        self,
        config: SimConfig,
        profile: StepProfile,
        workload: WorkloadSpec,
        logic_factory: LogicFactory | None = None,
    ) -> None:
        self.config = config
        self.profile = profile
        self.workload = workload
        self.now = 0.0
        self._heap: list[tuple] = []
        self._seq = 0
        self._pending = 0  # events on the heap other than the periodic ones
        self.pool = BackendPool()
        self.metrics = RouterMetrics.create()
        router = config.router
        self.trie = PrefixTrie(16, router.prefix_trie_max_bytes)  # token ids, 16 per chunk
        self.index = KVIndex()
        self.subscribers: dict[str, EventSubscriber] = {}
        self.logic = (logic_factory or default_logic)(self)
        # engines publish KV events and the router indexes them only for a logic that reads
        # them (as `lmserve router` subscribes only with kv-aware routing)
        self.kv_events = self.logic.needs_tokens
        self.proxy = Proxy(
            self.pool, self.logic, None, self.metrics, None,  # type: ignore[arg-type]
            max_retries=router.max_retries, api_key=None, backend_api_key=None,
            session_key=router.session_key, session_body_field=router.session_body_field,
        )  # fmt: skip
        self.pods: list[Pod] = []
        self.by_url: dict[str, Pod] = {}
        self.autoscaler = Autoscaler(config.autoscale) if config.autoscale else None
        self.reasons: dict[str, int] = {}
        self.records = Records()  # per finished request, see report.py
        self.replica_samples: list[tuple[float, int, int]] = []  # (t, ready, total)
        self._arrivals: Iterator[tuple[float, Session]] = sessions(
            workload, profile.block_size, profile.hash_algo if self.kv_events else KEYS_ONLY
        )
        self._client_in_flight = 0
        self._client_queue: deque[SimRequest] = deque()
        self._live_sessions = 0
        self._arrivals_done = False
        self.busy_engines = 0
        self._chain_is_tries = (
            self.logic.needs_prompt
            and not self.kv_events
            and profile.block_size == self.trie.chunk_size
        )

    # ---- the event loop ----------------------------------------------------------------------
    def push(self, t: float, kind: int, a: Any = None, b: Any = None) -> None:
        if kind not in _PERIODIC:
            self._pending += 1
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, a, b))

    def run(self) -> Cluster:
        for _ in range(self.config.replicas):
            self._create_pod(ready_now=True)
        # The engines' block maps and the router's KV index grow to millions of entries. The
        # GC's own collections walked them (a third of the run's time by its 10th minute) and
        # its young generations churn with every request. Instead: what exists now is frozen,
        # automatic collection is off, and once a simulated minute one collection walks what
        # that minute left (cyclic garbage lives at most a minute), which is frozen in turn.
        # The simulation's own objects form no cycles: once CLEAN_COLLECTIONS_TO_STOP minutes
        # in a row left none, the collections stop (with kv-aware routing each walked ~1.3 M
        # new index objects, 0.3 s in the first minute and 3 s by the tenth).
        # Not when the caller froze objects itself: unfreezing would thaw those too.
        freeze = gc.get_freeze_count() == 0
        enabled = gc.isenabled()
        if freeze:
            gc.freeze()
            gc.disable()  # _loop collects once a simulated minute instead
        try:
            self._loop(freeze)
        finally:
            if freeze:
                gc.unfreeze()
                if enabled:
                    gc.enable()
        return self

    def _loop(self, freeze: bool = False) -> None:
        self._next_arrival()
        self.push(0.0, _SCRAPE)
        self.push(0.0, _POLL)
        handlers = {
            _ARRIVAL: self._on_arrival,
            _SEND: self._on_send,
            _STEP: self._on_step,
            _SCRAPE: self._on_scrape,
            _POLL: self._on_poll,
            _READY: self._on_ready,
            _DELIVER: self._on_deliver,
        }
        limit = self.config.max_sim_s or math.inf
        heap = self._heap
        next_freeze = FREEZE_EVERY_S if freeze else math.inf
        clean = 0  # collections in a row that found no garbage
        while heap:
            t, _, kind, a, b = heapq.heappop(heap)
            if t > limit:
                break
            if t >= next_freeze:  # what survived the last minute is frozen too (see run)
                clean = clean + 1 if gc.collect() == 0 else 0
                gc.freeze()
                stop = clean >= CLEAN_COLLECTIONS_TO_STOP
                next_freeze = math.inf if stop else t + FREEZE_EVERY_S
            self.now = t
            if kind not in _PERIODIC:
                self._pending -= 1
            handlers[kind](a, b)
            if self._finished() or (self._arrivals_done and not self._pending):
                break  # done, or what is left can never finish (e.g. a prompt no pool holds)
        self.end_s = self.now

    def _finished(self) -> bool:
        return self._arrivals_done and self._live_sessions == 0

    # ---- clients -----------------------------------------------------------------------------
    def _next_arrival(self) -> None:
        item = next(self._arrivals, None)
        if item is None:
            self._arrivals_done = True
            return
        self.push(item[0], _ARRIVAL, item[1])

    def _on_arrival(self, session: Session, _: Any) -> None:
        self._live_sessions += 1
        self._submit(session.next_request())
        self._next_arrival()

    def _on_send(self, session: Session, _: Any) -> None:
        self._submit(session.next_request())

    def _submit(self, request: SimRequest | None) -> None:
        """The client sends it now, or queues it behind --max-concurrency."""
        cap = self.workload.max_concurrency
        if cap is not None and self._client_in_flight >= cap:
            self._client_queue.append(request)
            return
        self._send(request)

    def _send(self, request: SimRequest) -> None:
        self._client_in_flight += 1
        request.sent_s = self.now
        decision = self.route(request)
        request.decision = decision
        pod = self.by_url[decision.backend.url]
        self.push(self.now + self.profile.request_overhead_s, _DELIVER, pod, request)

    def route(self, request: SimRequest) -> Any:
        """The router's path for one request: candidates, the logic's choice, bookkeeping."""
        logic = self.logic
        # the prompt's ids (a copy of ~2,000 of them) only for a logic that reads them
        wants_ids = logic.needs_prompt or logic.needs_tokens
        ids = request.token_ids[: request.num_prompt_tokens] if wants_ids else None
        session = request.session
        route_request = RouteRequest(
            MODEL,
            str(session.user_id) if session is not None and session.multi_round else None,
            ids if logic.needs_prompt else None,
            ids if logic.needs_tokens else None,
            # the engines' hash chain of the prompt, which the workload computed already (the
            # same function and layout): kv-aware reads it instead of hashing ~120 blocks
            # again, and checks it against its own on its first decisions and now and then
            block_hashes=(self.profile.block_size, self.profile.hash_algo, request.hashes)
            if logic.needs_tokens
            else None,
            # without KV events the workload keys blocks by the prefix trie's own chain (its
            # KEYS_ONLY hashes): with the trie's chunk size those are the chain prefix-aware
            # computes, so it reads them instead of hashing ~125 chunks again
            prefix_chain=(self.profile.block_size, request.hashes)
            if self._chain_is_tries
            else None,
        )
        decision = logic.choose(route_request, self.candidates())
        self.reasons[decision.reason] = self.reasons.get(decision.reason, 0) + 1
        self.proxy._began(decision)
        return decision

    def candidates(self) -> Candidates:
        """pool.candidates(model), as the proxy's first attempt passes it (the pool rebuilds it
        only when an engine joins, leaves or changes health)."""
        candidates = self.pool.candidates(MODEL)
        if not candidates:
            raise RuntimeError(f"no healthy engine at t={self.now:.1f}s")
        return candidates

    def _on_deliver(self, pod: Pod, request: SimRequest) -> None:
        request.arrival_s = self.now
        if pod.engine.add(request, self.now):
            self._start(pod.engine)
        elif pod.engine._run is not None:
            self.push(pod.engine.step_end_s, _STEP, pod.engine, pod.engine.version)

    def _first_token(self, request: SimRequest, now: float) -> None:
        self.proxy._answering(request.decision)

    def _finish(self, request: SimRequest, now: float) -> None:
        self.proxy._ended(request.decision.backend, "200")
        pod = self.by_url[request.engine.url]
        self.records.append(
            (request.sent_s, request.first_token_s, now, request.num_prompt_tokens,
             request.max_tokens, request.num_cached_tokens, pod.index)
        )  # fmt: skip
        session = request.session
        request.decision = request.session = None
        request.token_ids = request.hashes = []  # the session keeps them while it needs them
        self._client_in_flight -= 1
        if self._client_queue:
            self._send(self._client_queue.popleft())
        if session is not None and session.rounds_left:
            self.push(now + session.think_s, _SEND, session)
        else:
            self._live_sessions -= 1
        if pod.removed_s is not None and not pod.engine.running and not pod.engine.waiting:
            pod.drained_s = now

    # ---- engines -----------------------------------------------------------------------------
    def _start(self, engine: SimEngine) -> None:
        if engine.start_step(self.now):
            self.busy_engines += 1
            self.push(engine.step_end_s, _STEP, engine, engine.version)

    def _on_step(self, engine: SimEngine, version: int) -> None:
        if version != engine.version or not engine.busy or engine.step_end_s != self.now:
            return  # a decode run cut short since: its new end has an entry of its own
        self.busy_engines -= 1
        engine.on_step_end(self.now)
        engine.version += 1
        self._start(engine)

    def _host_load(self) -> float:
        return self.busy_engines

    def _on_kv_events(self, engine: SimEngine, payload: bytes, now: float) -> None:
        subscriber = self.subscribers.get(engine.url)
        if subscriber is not None:
            subscriber.apply(engine.seq, payload)
        engine.seq += 1

    # ---- pods --------------------------------------------------------------------------------
    def _create_pod(self, ready_now: bool = False) -> Pod:
        i = len(self.pods)
        url = f"http://sim-engine-{i:05d}:8000"
        engine = SimEngine(
            url, self.profile, self._first_token, self._finish,
            self._on_kv_events if self.kv_events else None, self._host_load,
        )  # fmt: skip
        pod = Pod(i, engine, self.now)
        self.pods.append(pod)
        self.by_url[url] = pod
        if ready_now:
            self._on_ready(pod, None)
        else:
            self.push(self.now + self.profile.cold_start_s, _READY, pod)
        return pod

    def _on_ready(self, pod: Pod, _: Any) -> None:
        if pod.removed_s is not None:
            return
        pod.ready_s = self.now
        backend = pod.backend = self.pool.add(pod.engine.url)
        backend.model_cards = [{"id": MODEL}]
        backend.healthy = True
        if self.kv_events:
            subscriber = EventSubscriber(backend.url, None, self.index, self.metrics, None)  # type: ignore[arg-type]
            subscriber.live = True  # its replay answered (empty), as for a new engine
            self.subscribers[backend.url] = subscriber

    def _remove_pod(self, pod: Pod) -> None:
        """Scale-down: the router forgets it (as app._forget and KVEventSubscriptions.removed
        do); it finishes what it holds."""
        pod.removed_s = self.now
        url = pod.engine.url
        if self.pool.get(url) is not None:
            self.pool.remove(url)
            self.trie.forget_backend(url)
            self.subscribers.pop(url, None)
            self.index.clear(url)
        if not pod.engine.running and not pod.engine.waiting:
            pod.drained_s = self.now

    def live_pods(self) -> list[Pod]:
        return [p for p in self.pods if p.removed_s is None]

    # ---- periodic: scrape, autoscaler, samples -------------------------------------------------
    def _on_scrape(self, _: Any, __: Any) -> None:
        for pod in self.pods:
            if pod.ready_s is None or pod.removed_s is not None:
                continue
            backend, engine = pod.backend, pod.engine
            backend.scraped_running = len(engine.running)
            backend.scraped_waiting = len(engine.waiting)
            backend.in_flight_at_scrape = backend.in_flight
        if not self._finished():
            self.push(self.now + self.config.router.health_check_interval, _SCRAPE)

    def _on_poll(self, _: Any, __: Any) -> None:
        live = self.live_pods()
        ready = sum(1 for p in live if p.ready_s is not None)
        self.replica_samples.append((self.now, ready, len(live)))
        if self.autoscaler is not None:
            waiting = sum(p.engine.num_waiting for p in live if p.ready_s is not None)
            want = self.autoscaler.desired(self.now, len(live), waiting)
            for _ in range(want - len(live)):
                self._create_pod()
            if want < len(live):
                # not-ready pods go first, then the newest (a ReplicaSet's preference)
                order = sorted(live, key=lambda p: (p.ready_s is not None, -p.created_s))
                for pod in order[: len(live) - want]:
                    self._remove_pod(pod)
        interval = (
            self.config.autoscale.polling_interval_s
            if self.config.autoscale
            else self.config.sample_interval_s
        )
        if not self._finished():
            self.push(self.now + interval, _POLL)


def default_logic(cluster: Cluster) -> RoutingLogic:
    """The logic `lmserve router --routing-logic NAME` builds (app._build_state/_kv_aware),
    with the simulation's clock and event index."""
    config = cluster.config.router
    name = cluster.config.routing_logic
    if name == "kv-aware":
        return KvAware(
            cluster.index,
            lambda url: (s := cluster.subscribers.get(url)) is not None and s.live,
            PrefixAware(cluster.trie, config.prefix_balance_margin),
            request_cost=config.kv_aware_request_cost,
            pending_ttl_s=config.kv_aware_pending_ttl,
            slack=config.kv_aware_slack,
            clock=lambda: cluster.now,
        )
    return make_routing_logic(name, cluster.trie, config.prefix_balance_margin)


def default_router_config(**overrides: Any) -> RouterConfig:
    """`lmserve router`'s defaults (the backends are the simulation's; one placeholder
    satisfies the config's check)."""
    return RouterConfig(backends=("http://sim-engine:8000",), **overrides)
