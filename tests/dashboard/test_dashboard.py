"""The dashboard's numbers (windows, resets, percentiles) and its two routes on a router in
front of stand-in engines and on an engine's source; no browser, no model."""

from __future__ import annotations

import asyncio
import math
import re

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lmserve.dashboard import add_dashboard_routes, page
from lmserve.dashboard.data import History, Snapshot, Window, quantile
from lmserve.dashboard.sources import EngineSource
from tests.router.conftest import running_router
from tests.router.standin import StandInEngine

ENGINE_KEYS = {
    "url", "healthy", "running", "waiting", "kv_cache_usage", "prefix_cache_hit_rate",
    "kv_offload_hit_rate", "prompt_tokens_per_s", "generation_tokens_per_s", "requests_per_s",
    "ttft_s", "itl_s",
}  # fmt: skip
ROUTER_ENGINE_KEYS = ENGINE_KEYS | {"in_flight", "load", "routed_per_s"}
TTFT = "lmserve:time_to_first_token_seconds"


def snap(t: float, tokens: float, ttft: dict[float, float] | None = None) -> Snapshot:
    return Snapshot(t, {"lmserve:generation_tokens_total": tokens}, {TTFT: ttft or {}})


def test_quantile_interpolates_inside_the_bucket_like_histogram_quantile():
    buckets = {0.1: 50.0, 0.2: 90.0, 0.4: 100.0, math.inf: 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.7, buckets) == pytest.approx(0.15)
    assert quantile(0.99, buckets) == pytest.approx(0.38)
    assert quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None
    assert quantile(0.99, {0.1: 1.0, math.inf: 10.0}) == 0.1  # past the last bound: that bound


def test_history_rates_over_the_window_and_counts_a_reset_from_zero():
    h = History()
    h.add(snap(0.0, 0.0))
    assert h.window().rates is None  # one snapshot: nothing to compare yet
    for t in range(1, 31):
        h.add(snap(float(t), 100.0 * t))
    win = h.window()
    assert win.span_s == 10.0 and win.rates["lmserve:generation_tokens_total"] == 100.0
    h.add(snap(31.0, 50.0))  # the engine restarted: its counters began again
    assert h.window().rates["lmserve:generation_tokens_total"] == pytest.approx(50.0 / 10)
    h.add(snap(200.0, 60.0))
    assert [s.t for s in h.snaps] == [31.0, 200.0]  # older ones dropped, the base kept


def test_windows_add_up_and_percentiles_use_the_merged_buckets():
    a, b = History(), History()
    for h, fast in ((a, True), (b, False)):
        h.add(snap(0.0, 0.0, {0.1: 0.0, 1.0: 0.0, math.inf: 0.0}))
        h.add(snap(5.0, 50.0, {0.1: 10.0, 1.0: 10.0, math.inf: 10.0} if fast else
                   {0.1: 0.0, 1.0: 10.0, math.inf: 10.0}))  # fmt: skip
    total = (a.window() + b.window()).describe()
    assert total["generation_tokens_per_s"] == 20.0
    assert total["ttft_s"]["p50"] == pytest.approx(0.1)
    assert total["ttft_s"]["p99"] == pytest.approx(0.1 + 0.9 * 0.98)
    assert Window().describe()["ttft_s"] is None


def engine_registry() -> tuple[CollectorRegistry, dict]:
    r, m = CollectorRegistry(), ["model_name"]
    ms = {
        "running": Gauge("lmserve:num_requests_running", "", m, registry=r),
        "queries": Counter("lmserve:prefix_cache_queries", "", m, registry=r),
        "hits": Counter("lmserve:prefix_cache_hits", "", m, registry=r),
        "tokens": Counter("lmserve:generation_tokens", "", m, registry=r),
        "ttft": Histogram(TTFT, "", m, buckets=(0.01, 0.1, 1.0), registry=r),
    }
    return r, {k: v.labels("tiny") for k, v in ms.items()}


class FakeEngine:
    is_dead = False


def test_engine_source_reads_its_registry(monkeypatch):
    monkeypatch.setattr("lmserve.dashboard.sources.MIN_INTERVAL_S", 3600.0)
    registry, m = engine_registry()
    source = EngineSource(FakeEngine(), registry)
    app = FastAPI()
    add_dashboard_routes(app, source)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            first = (await client.get("/dashboard/data")).json()
            m["running"].set(2)
            assert (await client.get("/dashboard/data")).json() == first  # the cached answer
            m["queries"].inc(100)
            m["hits"].inc(25)
            m["tokens"].inc(40)
            for v in (0.05, 0.05, 0.5):
                m["ttft"].observe(v)
            source._last_at = 0.0  # the cache has run out
            second = (await client.get("/dashboard/data")).json()
            html = await client.get("/dashboard")
        return first, second, html

    first, second, html = asyncio.run(run())
    assert first["role"] == "engine" and first["routing"] is None
    assert first["engines"][0]["prompt_tokens_per_s"] is None  # one snapshot so far
    me = second["engines"][0]
    assert set(me) == ENGINE_KEYS and me["healthy"] and me["running"] == 2
    assert me["prefix_cache_hit_rate"] == 0.25 and me["kv_offload_hit_rate"] is None
    assert me["generation_tokens_per_s"] > 0 and 0.01 < me["ttft_s"]["p50"] < 0.1
    assert second["total"]["ttft_s"] == me["ttft_s"]
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")


def test_page_is_self_contained():
    html = page()
    assert "uPlot" in html and "/*uPlot" not in html  # inlined
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing from the network


def test_router_dashboard_lists_its_engines_and_decisions():
    with StandInEngine("a", running=3) as a, StandInEngine("b", waiting=2) as b:
        with running_router([a.url, b.url]) as router:
            for i in range(4):
                httpx.post(router.url + "/v1/completions", json={"model": "m", "prompt": str(i)})
            html = httpx.get(router.url + "/dashboard")
            data = httpx.get(router.url + "/dashboard/data").json()
    assert html.status_code == 200 and "lmserve" in html.text
    by_url = {e["url"]: e for e in data["engines"]}
    assert data["role"] == "router" and list(by_url) == sorted([a.url, b.url])
    assert all(set(e) == ROUTER_ENGINE_KEYS and e["healthy"] for e in data["engines"])
    assert by_url[a.url]["running"] == 3 and by_url[b.url]["waiting"] == 2
    assert data["total"]["running"] == 3 and data["total"]["waiting"] == 2
    assert data["routing"]["decisions_total"] == {"roundrobin": 4}
