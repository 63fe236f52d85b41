"""The router's Prometheus metrics, in a registry of its own (one per app, so tests can build
several routers in one process and /metrics shows only the router's series)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Added latency is sub-millisecond when all is well; the upper buckets catch a busy event loop.
_ADDED_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)


@dataclass(frozen=True)
class RouterMetrics:
    registry: CollectorRegistry
    requests: Counter  # labels backend, status ("200", "404", ..., or "error")
    model_requests: Counter  # label model
    in_flight: Gauge  # label backend
    routing_decisions: Counter  # label reason
    retries: Counter  # label reason
    backend_healthy: Gauge  # label backend
    trie_nodes: Gauge
    trie_bytes: Gauge
    trie_evictions: Counter
    added_latency: Histogram
    backend_ttft: Histogram  # label backend
    kv_events: Counter  # label backend
    kv_events_replayed: Counter  # label backend
    kv_events_dropped: Counter  # label backend
    kv_events_restarts: Counter  # label backend
    kv_event_lag: Histogram
    kv_index_blocks: Gauge
    kv_index_engines: Gauge
    kv_prediction_error: Histogram
    # labelled children the per-request path updates, by (metric, label values): labels() costs
    # a lock and a validation per call (forget_backend drops a backend's)
    _children: dict[tuple[Any, tuple[str, ...]], Any] = field(default_factory=dict)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    @classmethod
    def create(cls) -> RouterMetrics:
        r = CollectorRegistry()
        return cls(
            registry=r,
            requests=Counter(
                "lmserve_router:requests",
                "Requests proxied, by backend and HTTP status ('error': no response)",
                ["backend", "status"],
                registry=r,
            ),
            model_requests=Counter(
                "lmserve_router:model_requests",
                "Requests received, by model, on arrival (before a backend is chosen, so a "
                "model scaled to zero counts too); models a backend serves or --models names",
                ["model"],
                registry=r,
            ),
            in_flight=Gauge(
                "lmserve_router:in_flight_requests",
                "Requests sent to a backend and not finished",
                ["backend"],
                registry=r,
            ),
            routing_decisions=Counter(
                "lmserve_router:routing_decisions",
                "Routing decisions by reason (prefix_hit, prefix_miss, prefix_overloaded, "
                "session, session_fallback, least_loaded, roundrobin, kv_hit, kv_miss, kv_overloaded, "
                "kv_fallback_*)",
                ["reason"],
                registry=r,
            ),
            retries=Counter(
                "lmserve_router:retries",
                "Requests sent again to another backend, by what failed",
                ["reason"],
                registry=r,
            ),
            backend_healthy=Gauge(
                "lmserve_router:backend_healthy",
                "1 if the backend passes health checks",
                ["backend"],
                registry=r,
            ),
            trie_nodes=Gauge(
                "lmserve_router:prefix_trie_nodes", "Nodes in the prefix trie", registry=r
            ),
            trie_bytes=Gauge(
                "lmserve_router:prefix_trie_bytes",
                "Upper bound of the prefix trie's memory",
                registry=r,
            ),
            trie_evictions=Counter(
                "lmserve_router:prefix_trie_evictions",
                "Prefix trie nodes evicted (LRU)",
                registry=r,
            ),
            added_latency=Histogram(
                "lmserve_router:added_latency_seconds",
                "Time the router adds before the response starts: parsing, routing and "
                "forwarding, excluding the backend's own time",
                buckets=_ADDED_LATENCY_BUCKETS,
                registry=r,
            ),
            backend_ttft=Histogram(
                "lmserve_router:time_to_first_token_seconds",
                "Streamed answers: from sending the request to a backend to its first chunk, "
                "as the router sees it",
                ["backend"],
                buckets=(
                    0.001,
                    0.005,
                    0.01,
                    0.02,
                    0.04,
                    0.06,
                    0.08,
                    0.1,
                    0.25,
                    0.5,
                    0.75,
                    1.0,
                    2.5,
                    5.0,
                    7.5,
                    10.0,
                    20.0,
                    40.0,
                    80.0,
                ),  # fmt: skip
                registry=r,
            ),
            kv_events=Counter(
                "lmserve_router:kv_event_batches",
                "KV event batches applied to the index, by backend",
                ["backend"],
                registry=r,
            ),
            kv_events_replayed=Counter(
                "lmserve_router:kv_event_batches_replayed",
                "KV event batches recovered from a backend's replay socket after a gap",
                ["backend"],
                registry=r,
            ),
            kv_events_dropped=Counter(
                "lmserve_router:kv_event_batches_dropped",
                "KV event batches missed and no longer in the backend's replay buffer",
                ["backend"],
                registry=r,
            ),
            kv_events_restarts=Counter(
                "lmserve_router:kv_event_restarts",
                "Times a backend's event sequence started over (its index entries cleared)",
                ["backend"],
                registry=r,
            ),
            kv_event_lag=Histogram(
                "lmserve_router:kv_event_lag_seconds",
                "From an engine stamping a KV event batch to the index applying it (the "
                "engines' clocks against the router's: meaningful on one host or with NTP)",
                buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
                registry=r,
            ),
            kv_index_blocks=Gauge(
                "lmserve_router:kv_index_blocks",
                "Distinct block hashes the KV index holds",
                registry=r,
            ),
            kv_index_engines=Gauge(
                "lmserve_router:kv_index_engines",
                "Backends with at least one block in the KV index",
                registry=r,
            ),
            kv_prediction_error=Histogram(
                "lmserve_router:kv_cached_tokens_prediction_error",
                "The engine's reported cached_tokens minus the tokens kv-aware routing predicted "
                "it would find cached, per request (0: exact)",
                buckets=(-1024, -256, -64, -16, -1, 0, 16, 64, 256, 1024),
                registry=r,
            ),
        )

    def forget_backend(self, url: str) -> None:
        """A backend left: drop its gauges (its counters stay, they are history)."""
        for key in [k for k in self._children if k[1][:1] == (url,)]:
            del self._children[key]
        for gauge in (self.in_flight, self.backend_healthy, self.backend_ttft):
            try:
                gauge.remove(url)
            except KeyError:
                pass
