"""Periodic health checks: who is alive, what each serves, how busy each engine says it is.

Every `interval` seconds, for every backend at once: GET /health (200 = alive), then, if alive,
GET /metrics (lmserve:num_requests_running / _waiting, for least-loaded and prefix-aware) and,
when the backend (re)joins or every MODELS_REFRESH_CYCLES cycles, GET /v1/models.

A refused connection marks a backend dead at once (nothing listens: the process is gone);
timeouts and error statuses need `failure_threshold` in a row, so one slow answer from a busy
engine does not take it out. One good answer restores it. The proxy also reports refused
connections (`mark_dead`), so a killed engine leaves the rotation before the next check.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from lmserve.router.backends import Backend, BackendPool
from lmserve.router.metrics import RouterMetrics

logger = logging.getLogger(__name__)

MODELS_REFRESH_CYCLES = 10
_LOAD_METRICS = ("lmserve:num_requests_running", "lmserve:num_requests_waiting")


class HealthChecker:
    def __init__(
        self,
        pool: BackendPool,
        client: aiohttp.ClientSession | None,
        metrics: RouterMetrics,
        interval: float,
        timeout: float,
        failure_threshold: int,
        backend_headers: dict[str, str],
    ) -> None:
        self.pool = pool
        self.client = client  # set by the app's lifespan
        self.metrics = metrics
        self.interval = interval
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.failure_threshold = max(1, failure_threshold)
        self.headers = backend_headers
        self._failures: dict[str, int] = {}
        self._cycle = 0
        self.on_change: list[Callable[[Backend, bool], None]] = []  # (backend, now healthy)

    async def run(self) -> None:
        """Check every backend each interval, forever (cancel to stop)."""
        while True:
            await self.check_all()
            self._cycle += 1
            await asyncio.sleep(self.interval)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(b) for b in list(self.pool)))

    async def check(self, backend: Backend) -> None:
        """One backend's check; never raises."""
        try:
            status, _ = await self._get(backend.url + "/health")
            alive, why = status == 200, f"/health answered {status}"
        except aiohttp.ClientConnectorError as e:
            self.mark_dead(backend, f"connection refused ({e})")
            return
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            alive, why = False, f"{type(e).__name__}: {e}"
        if not alive:
            self._failed(backend, why)
            return
        rejoined = not backend.healthy
        if rejoined or not backend.model_cards or self._cycle % MODELS_REFRESH_CYCLES == 0:
            await self._refresh_models(backend)
        await self._scrape_load(backend)
        self._failures.pop(backend.url, None)
        if rejoined and self.pool.get(backend.url) is backend:
            logger.info("backend %s is healthy (models %s)", backend.url, sorted(backend.models))
            self._set_healthy(backend, True)

    def mark_dead(self, backend: Backend, why: str) -> None:
        self._failures[backend.url] = self.failure_threshold
        if backend.healthy:
            logger.warning("backend %s is down: %s", backend.url, why)
        self._set_healthy(backend, False)

    def forget(self, backend: Backend) -> None:
        self._failures.pop(backend.url, None)

    def _failed(self, backend: Backend, why: str) -> None:
        count = self._failures.get(backend.url, 0) + 1
        self._failures[backend.url] = count
        if count >= self.failure_threshold:
            self.mark_dead(backend, why)

    def _set_healthy(self, backend: Backend, healthy: bool) -> None:
        changed = backend.healthy != healthy
        backend.healthy = healthy
        if self.pool.get(backend.url) is backend:
            self.metrics.backend_healthy.labels(backend.url).set(1 if healthy else 0)
            if changed:
                for listener in self.on_change:
                    listener(backend, healthy)

    async def _get(self, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        assert self.client is not None, "the app's lifespan sets the client session"
        async with self.client.get(url, headers=headers, timeout=self.timeout) as resp:
            return resp.status, await resp.read()

    async def _refresh_models(self, backend: Backend) -> None:
        try:
            status, body = await self._get(backend.url + "/v1/models", self.headers)
            data = json.loads(body).get("data") if status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
            data = None
        if isinstance(data, list):
            backend.model_cards = [c for c in data if isinstance(c, dict)]

    async def _scrape_load(self, backend: Backend) -> None:
        """Queue lengths from the engine's /metrics; a backend without them (not lmserve)
        counts by our in-flight requests alone."""
        try:
            status, body = await self._get(backend.url + "/metrics")
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return
        if status != 200:
            return
        running, waiting = parse_load(body.decode("utf-8", "replace"))
        backend.scraped_running, backend.scraped_waiting = running, waiting
        backend.in_flight_at_scrape = backend.in_flight


def parse_load(text: str) -> tuple[float, float]:
    """(running, waiting) summed over label sets, from a Prometheus text page. Only the lines
    of those two metrics reach the parser: an engine's page has hundreds of others."""
    lines = [ln for ln in text.splitlines() if ln.startswith(_LOAD_METRICS)]
    totals = dict.fromkeys(_LOAD_METRICS, 0.0)
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals[_LOAD_METRICS[0]], totals[_LOAD_METRICS[1]]
