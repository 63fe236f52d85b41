"""Router fixtures: three stand-in engines shared by a module, and a router factory."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmserve.router.app import build_app
from lmserve.router.config import RouterConfig
from tests.router.standin import ServedApp, StandInEngine, serve_in_thread


@pytest.fixture(scope="module")
def standins() -> Iterator[list[StandInEngine]]:
    engines = [StandInEngine(name) for name in ("a", "b", "c")]
    for engine in engines:
        engine.__enter__()
    yield engines
    for engine in engines:
        engine.stop()


@pytest.fixture
def fresh_standins(standins) -> list[StandInEngine]:
    """The shared stand-ins, reset to their defaults for this test."""
    for engine in standins:
        defaults = StandInEngine(engine.name, port=engine.port)
        for f in dataclasses.fields(StandInEngine):
            if f.name not in ("port", "host"):
                setattr(engine, f.name, getattr(defaults, f.name))
    return standins


def wait_until(condition, timeout: float = 5.0, what: str = "condition") -> float:
    """Poll `condition()` until true; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.monotonic() - start


def healthy_backends(router: ServedApp) -> int:
    try:
        resp = httpx.get(router.url + "/health", timeout=2)
    except httpx.HTTPError:
        return 0
    return resp.json().get("healthy_backends", 0) if resp.status_code == 200 else 0


@contextlib.contextmanager
def running_router(backends, wait_healthy: int | None = None, **overrides) -> Iterator[ServedApp]:
    """A router in a thread in front of `backends` (URLs); waits until `wait_healthy` (default:
    all) of them pass a health check."""
    config = RouterConfig(backends=tuple(backends), **{"health_check_interval": 0.2, **overrides})
    app = build_app(config)
    with serve_in_thread(app) as router:
        router.state = app.state.router
        want = len(backends) if wait_healthy is None else wait_healthy
        wait_until(lambda: healthy_backends(router) >= want, what=f"{want} healthy backend(s)")
        yield router


def metric(router: ServedApp, name: str, **labels: str) -> float:
    """The sum of the router's /metrics samples named `name` whose labels include `labels`."""
    text = httpx.get(router.url + "/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )
