"""Where /dashboard/data comes from: an engine's own Prometheus registry, or, on the router, its
engines' /metrics pages (fetched when the page asks, at most once a MIN_INTERVAL_S whatever the
number of open pages) and the router's own metrics. Both answer the same JSON:

    {"role": "engine" | "router", "time": unix seconds,
     "windows_s": {"rates": 10, "latency": 60},
     "engines": [{"url", "healthy", "running", "waiting", "kv_cache_usage",
                  "prefix_cache_hit_rate", "kv_offload_hit_rate",
                  "prompt_tokens_per_s", "generation_tokens_per_s", "requests_per_s",
                  "ttft_s": {"p50", "p90", "p99"}, "itl_s": {...},
                  router only: "in_flight", "load", "routed_per_s"}],
     "total": the same numbers for all healthy engines together (percentiles of the merged
              histograms),
     "routing": null, or on the router {"decisions_total": {reason: n},
                "decisions_per_s": {reason: r}, "requests_per_s": r,
                "added_latency_s": {"p50", "p90", "p99"} or null}}

Rates, hit rates and percentiles are null until there are two snapshots (the second poll).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

from lmserve.dashboard.data import (
    LATENCY_WINDOW_S,
    QUANTILES,
    RATE_WINDOW_S,
    History,
    Window,
    bucket_increase,
    parse_text,
    quantile,
    rates_by_label,
    snapshot,
)

MIN_INTERVAL_S = 0.5  # polls closer together than this get the previous answer

DECISIONS = "lmserve_router:routing_decisions_total"
ROUTED = "lmserve_router:requests_total"
ADDED_LATENCY = "lmserve_router:added_latency_seconds"


class Source:
    """Caches the last answer for MIN_INTERVAL_S; subclasses `_collect` a fresh one."""

    role = ""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._last: dict[str, Any] | None = None
        self._last_at = 0.0

    async def data(self) -> dict[str, Any]:
        async with self._lock:
            now = time.time()
            if self._last is None or now - self._last_at >= MIN_INTERVAL_S:
                self._last = {
                    "role": self.role,
                    "time": now,
                    "windows_s": {"rates": RATE_WINDOW_S, "latency": LATENCY_WINDOW_S},
                    **await self._collect(now),
                }
                self._last_at = now
            return self._last

    async def _collect(self, now: float) -> dict[str, Any]:
        raise NotImplementedError


class EngineSource(Source):
    """An engine's view of itself, from the process' Prometheus registry."""

    role = "engine"

    def __init__(self, engine: Any, registry: CollectorRegistry = REGISTRY) -> None:
        super().__init__()
        self.engine = engine
        self.registry = registry
        self.history = History()

    async def _collect(self, now: float) -> dict[str, Any]:
        self.history.add(snapshot(self.registry.collect(), now))
        window = self.history.window()
        me = {"url": "self", "healthy": not self.engine.is_dead, **window.describe()}
        return {"engines": [me], "total": window.describe(), "routing": None}


class RouterSource(Source):
    """The router's engines (from their /metrics) and its own routing decisions.
    `pool`: the BackendPool; `health`: the HealthChecker, whose HTTP client and timeout the
    scrapes use; `registry`: the router's own metrics."""

    role = "router"

    def __init__(self, pool: Any, health: Any, registry: CollectorRegistry) -> None:
        super().__init__()
        self.pool = pool
        self.health = health
        self.registry = registry
        self.histories: dict[str, History] = {}
        self.own = History()

    async def _collect(self, now: float) -> dict[str, Any]:
        backends = sorted(self.pool, key=lambda b: b.url)
        pages = await asyncio.gather(*(self._scrape(b) for b in backends))
        for url in set(self.histories) - {b.url for b in backends}:
            del self.histories[url]  # left the pool
        self.own.add(
            snapshot(
                self.registry.collect(),
                now,
                names=(),
                histograms=(ADDED_LATENCY,),
                by_label={DECISIONS: "reason", ROUTED: "backend"},
            )
        )
        routed = rates_by_label(self.own, ROUTED)
        engines, total = [], Window()
        for backend, page in zip(backends, pages):
            history = self.histories.setdefault(backend.url, History())
            if page is not None:
                history.add(parse_text(page, now))
            window = history.window() if backend.healthy else Window()
            if backend.healthy:
                total = total + window
            engines.append(
                {
                    "url": backend.url,
                    "healthy": backend.healthy,
                    **window.describe(),
                    "in_flight": backend.in_flight,
                    "load": backend.load,
                    "routed_per_s": routed.get(backend.url, 0.0 if routed else None),
                }
            )
        return {"engines": engines, "total": total.describe(), "routing": self._routing(routed)}

    def _routing(self, routed: dict[str, float]) -> dict[str, Any]:
        latest, base = self.own.latest, self.own.base(LATENCY_WINDOW_S)
        added = None
        if latest is not None and base is not None:
            delta = bucket_increase(
                latest.buckets.get(ADDED_LATENCY, {}), base.buckets.get(ADDED_LATENCY, {})
            )
            values = {f"p{round(q * 100)}": quantile(q, delta) for q in QUANTILES}
            added = values if values["p50"] is not None else None
        has_rates = self.own.base(RATE_WINDOW_S) is not None
        return {
            "decisions_total": dict(sorted(latest.labelled.get(DECISIONS, {}).items())),
            "decisions_per_s": rates_by_label(self.own, DECISIONS),
            "requests_per_s": sum(routed.values()) if has_rates else None,
            "added_latency_s": added,
        }

    async def _scrape(self, backend: Any) -> str | None:
        """The backend's /metrics page, or None (unhealthy, unreachable, not lmserve)."""
        client = self.health.client
        if not backend.healthy or client is None:
            return None
        try:
            async with client.get(backend.url + "/metrics", timeout=self.health.timeout) as resp:
                if resp.status != 200:
                    return None
                return (await resp.read()).decode("utf-8", "replace")
        except Exception:  # aiohttp errors, timeouts: no data this round
            return None
