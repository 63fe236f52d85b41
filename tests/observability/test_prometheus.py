"""The shipped dashboards and rules against a REAL Prometheus (Debian's `prometheus` binary)
scraping two real `lmserve serve` engines (tiny random Llama, CPU, sharing a real Redis KV
tier) and a real router, after a short load through the router:

- every PromQL expression of every dashboard panel and template variable, every recording rule
  and every alert rule evaluates without error and returns at least one series. An alert's
  expression is a threshold that must not fire on a healthy cluster, so each of its operands
  (the expression with its comparisons and `and`/`or`/`unless` split off, e.g. `up{...}` of
  `up{...} == 0`) must return series instead; the full expression need only evaluate;
- every rule Prometheus loaded reports health "ok", and no health alert fires;
- stopping an engine fires LmserveEngineDown (and the router's LmserveRouterBackendUnhealthy)
  for real, with the test's copy of the alert rules set to `for: 0s`.

Prometheus scrapes and evaluates every second; the test polls until every expression has data
(or 60 s pass) and then names each expression that failed.
"""

from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.entrypoints.openai.conftest import API_KEY, MODEL_NAME, free_port, start_server
from tests.kv_transfer.conftest import RedisServer
from tests.observability.promql import (
    ALERT_RULES,
    ENGINE_JOB,
    RECORDING_RULES,
    ROUTER_JOB,
    Prometheus,
    alerts_with_for,
    dashboard_files,
    dashboard_queries,
    operands,
    require_binary,
    substitute,
)
from tests.router.conftest import running_router

pytestmark = pytest.mark.slow

CHUNK = 32
LONG_PROMPT = " ".join(f"word{i % 50}" for i in range(80))  # ~380 tokens: 11 KV chunks
VARIABLES = {
    "model": MODEL_NAME,
    "instance": ".*",  # the "All" choice
    "job": ENGINE_JOB,
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
}
HEALTH_ALERTS = {"LmserveEngineDown", "LmserveEngineUnhealthy", "LmserveRouterBackendUnhealthy"}


def kv_flags(redis_url: str) -> list[str]:
    options = {"chunk_size": CHUNK, "cpu_size_gib": 0.01, "remote_url": redis_url}
    config = {"kv_connector": "TieredConnector", "kv_connector_extra_config": options}
    return ["--kv-transfer-config", json.dumps(config)]


def host_port(url: str) -> str:
    return url.removeprefix("http://")


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    """(engines, router, prometheus, redis): two engines sharing a Redis KV tier, a round-robin
    router, and Prometheus scraping all three every second with the shipped recording rules and
    a copy of the alert rules whose `for:` is 0s."""
    prometheus_bin = require_binary("prometheus", "prometheus")
    workdir = tmp_path_factory.mktemp("observability")
    model = tiny_model_dir("llama")
    with contextlib.ExitStack() as stack:
        redis = RedisServer(require_binary("redis-server", "redis-server"), workdir)
        redis.start()
        stack.callback(redis.stop)
        with ThreadPoolExecutor(2) as pool:  # start-up is mostly waiting: overlap the two
            futures = [
                pool.submit(start_server, model, *kv_flags(redis.url), log_dir=workdir)
                for _ in range(2)
            ]
        engines, errors = [], []
        for future in futures:
            try:
                engines.append(future.result())
                stack.callback(engines[-1].stop)
            except Exception as e:  # the other one is still stopped by the stack
                errors.append(e)
        if errors:
            raise errors[0]
        router = stack.enter_context(
            running_router([e.url for e in engines], backend_api_key=API_KEY)
        )
        alerts = workdir / "lmserve.alerts.yml"
        alerts.write_text(alerts_with_for(ALERT_RULES.read_text(), "0s"))
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(RECORDING_RULES), str(alerts)],
            "scrape_configs": [
                {"job_name": ENGINE_JOB,
                 "static_configs": [{"targets": [host_port(e.url) for e in engines]}]},
                {"job_name": ROUTER_JOB,
                 "static_configs": [{"targets": [host_port(router.url)]}]},
            ],
        }  # fmt: skip
        prometheus = Prometheus(prometheus_bin, workdir, config, free_port())
        stack.callback(prometheus.stop)
        yield engines, router, prometheus, redis


def drive_load(router_url: str, redis: RedisServer) -> int:
    """A few completions and chats through the router, streamed and not; the long prompt twice
    (round-robin: once on each engine, the second a Redis hit). Returns the request count."""
    client = openai.OpenAI(base_url=router_url + "/v1", api_key="x", max_retries=0, timeout=60)
    sent = 0

    def complete(prompt: str, **kwargs) -> None:
        nonlocal sent
        reply = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, **kwargs)
        if kwargs.get("stream"):
            assert any(chunk.choices and chunk.choices[0].text for chunk in reply)
        sent += 1

    def chat(content: str, **kwargs) -> None:
        nonlocal sent
        messages = [{"role": "user", "content": content}]
        reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, **kwargs)
        if kwargs.get("stream"):
            assert sum(1 for chunk in reply if chunk.choices) >= 1
        sent += 1

    complete(LONG_PROMPT, max_tokens=4)
    with redis.client() as r:  # the first engine writes its chunks from a background thread
        deadline = time.monotonic() + 20
        while r.dbsize() < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
    complete(LONG_PROMPT, max_tokens=4)  # the other engine: loaded from Redis
    complete("The farmer", max_tokens=6, stream=True)
    complete("The river", max_tokens=3, n=2)
    chat("What is the weather?", max_tokens=5)
    chat("Tell me about the valley.", max_tokens=6, stream=True)
    for i in range(4):
        chat(f"Question {i}: how far is the city?", max_tokens=4 + i, stream=i % 2 == 1)
    return sent


def catalogue(prometheus: Prometheus) -> list[tuple[str, str, bool]]:
    """(where, expression, must it return series) for every expression to check."""
    out = []
    for path in dashboard_files():
        for q in dashboard_queries(path):
            out.append((q.where, substitute(q.expr, VARIABLES), True))
    for rule in prometheus.rules():
        if rule["type"] == "recording":
            out.append((f"recording rule {rule['name']}", rule["query"], True))
            out.append((f"recorded series {rule['name']}", rule["name"], True))
        else:
            out.append((f"alert {rule['name']}", rule["query"], False))
            for i, operand in enumerate(operands(rule["query"])):
                out.append((f"alert {rule['name']} operand {i}", operand, True))
    return out


def failures(prometheus: Prometheus, exprs: list[tuple[str, str, bool]]) -> list[str]:
    bad = []
    for where, expr, needs_series in exprs:
        result, error = prometheus.query(expr)
        if error is not None:
            bad.append(f"{where}: {expr}\n    ERROR {error}")
        elif needs_series and not result:
            bad.append(f"{where}: {expr}\n    no series")
    return bad


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def test_every_dashboard_query_recording_rule_and_alert_expression_has_data(cluster, capsys):
    engines, router, prometheus, redis = cluster
    start = time.monotonic()
    wait_for(
        lambda: (
            all(t["health"] == "up" for t in prometheus.targets())
            and len(prometheus.targets()) == 3
        ),
        timeout=30,
        what="3 targets up",
    )
    sent = drive_load(router.url, redis)
    done = f'sum(lmserve:request_success_total{{job="{ENGINE_JOB}"}})'
    wait_for(
        lambda: (r := prometheus.query(done)[0]) and float(r[0]["value"][1]) >= sent,
        timeout=30,
        what=f"Prometheus to see {sent} finished requests",
    )
    assert sum(e.metric("lmserve:kv_offload_hit_tokens_total", tier="redis") for e in engines) > 0

    exprs = catalogue(prometheus)
    # Prometheus loaded every shipped rule.
    recording = [e for e in exprs if e[0].startswith("recording rule")]
    alerting = [e for e in exprs if e[0].startswith("alert ") and "operand" not in e[0]]
    assert len(recording) == RECORDING_RULES.read_text().count("- record:")
    assert len(alerting) == ALERT_RULES.read_text().count("- alert:")
    # Rates need two samples of a series born with the load, and recording rules an evaluation
    # after that: poll until every expression has data.
    deadline = time.monotonic() + 60
    while (bad := failures(prometheus, exprs)) and time.monotonic() < deadline:
        time.sleep(1)
    with capsys.disabled():
        print(f"\n{len(exprs)} expressions evaluated; {len(bad)} failed; "
              f"{time.monotonic() - start:.1f} s after the targets came up")  # fmt: skip
    assert not bad, "expressions that errored or returned no series:\n" + "\n".join(bad)

    unhealthy = [r for r in prometheus.rules() if r["health"] != "ok"]
    assert not unhealthy, unhealthy
    firing = [a for a in prometheus.alerts() if a["labels"]["alertname"] in HEALTH_ALERTS]
    assert not firing, firing


def test_stopping_an_engine_fires_the_engine_down_and_router_backend_alerts(cluster):
    engines, router, prometheus, _ = cluster
    victim = engines[1]
    instance, backend = host_port(victim.url), victim.url
    start = time.monotonic()
    victim.stop()  # SIGTERM: it drains and exits

    def firing() -> set[str]:
        got = set()
        for alert in prometheus.alerts():
            labels = alert["labels"]
            if alert["state"] != "firing":
                continue
            if labels["alertname"] == "LmserveEngineDown" and labels["instance"] == instance:
                got.add("LmserveEngineDown")
            if (
                labels["alertname"] == "LmserveRouterBackendUnhealthy"
                and labels["backend"] == backend
            ):
                got.add("LmserveRouterBackendUnhealthy")
        return got

    wait_for(
        lambda: firing() == {"LmserveEngineDown", "LmserveRouterBackendUnhealthy"},
        timeout=30,
        what="LmserveEngineDown and LmserveRouterBackendUnhealthy firing",
    )
    print(f"alerts firing {time.monotonic() - start:.1f} s after SIGTERM to the engine")
    # The other engine is fine: no alert names it.
    survivor = host_port(engines[0].url)
    assert not [
        a for a in prometheus.alerts()
        if a["labels"].get("instance") == survivor and a["labels"]["alertname"] in HEALTH_ALERTS
    ]  # fmt: skip
    assert httpx.get(router.url + "/health").status_code == 200  # one backend left
