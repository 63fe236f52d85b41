"""The dashboard for real: a router in front of a real `lmserve serve` (tiny random Llama, CPU)
under a little load, its /dashboard/data, and the page in headless Chromium, driven over the
DevTools protocol (websocket-client; Debian's `chromium` package, which CI installs).

LMSERVE_DASHBOARD_SCREENSHOT=docs/dashboard.png makes the browser test run the load for longer
and save the README's screenshot there."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.entrypoints.openai.conftest import API_KEY, MODEL_NAME, start_server
from tests.router.conftest import running_router, wait_until

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium")
SCREENSHOT = os.environ.get("LMSERVE_DASHBOARD_SCREENSHOT")
PROMPT = "Once upon a time in the valley there lived a farmer who kept a careful diary. " * 2


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    engine = start_server(tiny_model_dir("llama"), log_dir=tmp_path_factory.mktemp("dashboard"))
    try:
        with running_router([engine.url], backend_api_key=API_KEY) as router:
            with load(router.url):
                yield engine, router
    finally:
        engine.stop()


@contextlib.contextmanager
def load(url: str, clients: int = 2) -> Iterator[None]:
    """Completions sent back to back by `clients` threads until the block ends: a shared
    prompt prefix (prefix-cache hits), a few tokens each."""
    stop = threading.Event()

    def send(worker: int) -> None:
        with httpx.Client(timeout=60) as client:
            for i in itertools.count():
                if stop.is_set():
                    return
                body = {"model": MODEL_NAME, "prompt": f"{PROMPT} {worker}.{i}", "max_tokens": 12,
                        "ignore_eos": True}  # fmt: skip
                client.post(url + "/v1/completions", json=body)

    threads = [threading.Thread(target=send, args=(w,), daemon=True) for w in range(clients)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)


def test_data_on_engine_and_router(cluster):
    engine, router = cluster

    def data(url: str) -> dict:
        return httpx.get(url + "/dashboard/data", timeout=10).json()

    def busy(d: dict) -> bool:  # a request finished since the first poll, and was timed
        return bool(d["routing"]["requests_per_s"]) and d["total"]["ttft_s"] is not None

    wait_until(lambda: busy(data(router.url)), timeout=30, what="the load on the dashboard")
    on_router = data(router.url)
    (seen,) = on_router["engines"]
    assert seen["url"] == engine.url and seen["healthy"]
    assert seen["generation_tokens_per_s"] > 0 and seen["prefix_cache_hit_rate"] > 0
    assert seen["itl_s"]["p99"] >= seen["itl_s"]["p50"] > 0
    assert on_router["routing"]["decisions_total"]["roundrobin"] > 0

    data(engine.url)
    time.sleep(0.6)  # past the source's cache: a second snapshot to compare with
    on_engine = data(engine.url)
    (me,) = on_engine["engines"]
    assert on_engine["role"] == "engine" and me["url"] == "self" and me["healthy"]
    assert me["generation_tokens_per_s"] > 0 and me["ttft_s"]["p50"] > 0
    assert me.keys() <= seen.keys() and on_engine["routing"] is None


# ---- the page in Chromium -------------------------------------------------------------------
class Chromium:
    """Headless Chromium and one page, over the DevTools protocol: commands in, and the
    console errors and uncaught exceptions it reports collected in `errors`."""

    def __init__(self, width: int = 1400, height: int = 1500) -> None:
        import websocket  # websocket-client

        self.profile = tempfile.mkdtemp(prefix="chromium-")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        port_file = Path(self.profile) / "DevToolsActivePort"
        wait_until(port_file.exists, timeout=30, what="Chromium's DevTools port")
        wait_until(lambda: len(port_file.read_text().splitlines()) >= 2, timeout=5)
        port = port_file.read_text().split()[0]
        pages = [t for t in self._targets(port) if t["type"] == "page"]
        # No Origin header: Chromium (since 111) refuses DevTools connections from an origin
        # it was not started with --remote-allow-origins for; a client without one is let in.
        self.ws = websocket.create_connection(
            pages[0]["webSocketDebuggerUrl"], timeout=30, suppress_origin=True
        )
        self.ids = itertools.count(1)
        self.errors: list[str] = []
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable")

    @staticmethod
    def _targets(port: str) -> list[dict]:
        for _ in range(50):
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
            if any(t["type"] == "page" for t in targets):
                return targets
            time.sleep(0.1)
        raise AssertionError("Chromium opened no page")

    def send(self, method: str, **params) -> dict:
        """Send a command; return its result, noting the events that arrive meanwhile."""
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                assert "error" not in msg, msg
                return msg["result"]
            self._event(msg)

    def _event(self, msg: dict) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.errors.append(
                " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            )
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description", details["text"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(params["entry"]["text"] + " " + params["entry"].get("url", ""))

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout: float) -> None:
        wait_until(lambda: self.evaluate(expression), timeout=timeout, what=expression)

    def screenshot(self, path: Path) -> None:
        png = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(png["data"]))

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


# Per chart: how many of its polls have a value in some series (the page's own state).
POINTS = """Object.fromEntries(Object.entries(window.dashboard.charts).map(([id, c]) =>
  [id, c.times.filter((_, i) => Object.values(c.cols).some(col => col[i] != null)).length]))"""


@pytest.fixture
def chromium() -> Iterator[Chromium]:
    if CHROMIUM is None:
        pytest.skip("no `chromium` on PATH (Debian: apt-get install chromium)")
    browser = Chromium()
    yield browser
    browser.close()


def test_dashboard_page_charts_live_data_in_chromium(cluster, chromium, tmp_path):
    engine, router = cluster
    chromium.evaluate("console.error('probe')")
    assert chromium.errors == ["probe"]  # what the last assertion checks is seen
    chromium.errors.clear()
    polls = 30 if SCREENSHOT else 5
    chromium.open(router.url + "/dashboard")
    chromium.wait_for(f"window.dashboard?.polls >= {polls}", timeout=polls * 3)
    points = chromium.evaluate(POINTS)
    assert set(points) == {"load", "kv", "hits", "ttft", "itl", "tokens", "routing"}
    for chart in ("load", "kv", "hits", "ttft", "itl", "tokens", "routing"):
        assert points[chart] >= 2, points
    assert chromium.evaluate("window.dashboard.failures") == 0
    rows = chromium.evaluate("document.querySelectorAll('#engines tbody tr').length")
    assert rows == 2  # the engine and the total
    assert "healthy" in chromium.evaluate("document.querySelector('#engines tbody').innerText")
    chromium.screenshot(Path(SCREENSHOT) if SCREENSHOT else tmp_path / "dashboard.png")

    chromium.open(engine.url + "/dashboard")  # the engine's own page: no routing chart
    chromium.wait_for(
        f"location.href.startsWith('{engine.url}') && window.dashboard?.polls >= 3", timeout=15
    )
    points = chromium.evaluate(POINTS)
    assert "routing" not in points and points["tokens"] >= 1, points
    assert chromium.errors == []
