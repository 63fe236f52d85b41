"""The router in front of stand-in engines: proxying, errors, keys, retries, health, metrics."""

from __future__ import annotations

import time
from collections import Counter

import httpx
import openai
import pytest

from tests.router.conftest import metric, running_router, wait_until


def client(router, api_key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key=api_key, max_retries=0, timeout=10)


def served_by(text: str) -> str:
    return text[0]  # the stand-ins answer with their name first


def test_streamed_chunks_reach_the_client_as_they_arrive(fresh_standins):
    a = fresh_standins[0]
    a.chunk_delay_s = 0.4
    with running_router([a.url]) as router:
        start = time.monotonic()
        arrivals = []
        body = {"model": "m", "prompt": "hi", "stream": True}
        with httpx.stream("POST", router.url + "/v1/completions", json=body) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic() - start)
        assert len(arrivals) == 3
        assert arrivals[0] < 0.3 and arrivals[-1] > 0.75  # not held until the end
        ttft = "lmserve_router:time_to_first_token_seconds"
        assert metric(router, ttft + "_count", backend=a.url) == 1
        assert metric(router, ttft + "_sum", backend=a.url) < 0.3  # the first chunk, not the end


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_requests_go_only_to_backends_serving_the_model(fresh_standins, api):
    a, b, c = fresh_standins
    a.models, b.models, c.models = ("m", "x"), ("m",), ("y",)
    with running_router([a.url, b.url, c.url]) as router:
        models = sorted(m.id for m in client(router).models.list().data)
        assert models == ["m", "x", "y"]
        for model in ("x", "y"):
            for _ in range(4):
                if api == "chat":
                    client(router).chat.completions.create(
                        model=model, messages=[{"role": "user", "content": "hi"}]
                    )
                else:
                    client(router).completions.create(model=model, prompt="hi")
        assert len(a.requests) == 4 and len(c.requests) == 4 and not b.requests


def test_router_errors_use_openai_error_bodies(fresh_standins):
    a = fresh_standins[0]
    with running_router([a.url]) as router:
        with pytest.raises(openai.NotFoundError) as e:
            client(router).completions.create(model="nope", prompt="hi")
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
        for raw in (b"{not json", b"[1, 2]", b'{"model": 7}'):
            resp = httpx.post(router.url + "/v1/completions", content=raw)
            assert resp.status_code == 400
            assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
        a.healthy = False
        wait_until(lambda: not router.state.pool.candidates("m"), what="a marked unhealthy")
        with pytest.raises(openai.InternalServerError) as e:
            client(router).completions.create(model="m", prompt="hi")
        assert e.value.status_code == 503 and e.value.body["code"] == "no_healthy_backend"
        assert httpx.get(router.url + "/health").status_code == 503


def test_a_listed_model_with_no_backend_up_gets_503_and_is_counted(fresh_standins):
    a = fresh_standins[0]  # serves "m"
    with running_router([a.url], models=("m", "asleep")) as router:
        with pytest.raises(openai.InternalServerError) as e:  # scaled to zero: retry later
            client(router).completions.create(model="asleep", prompt="hi")
        assert e.value.status_code == 503 and e.value.body["code"] == "no_healthy_backend"
        with pytest.raises(openai.NotFoundError):  # neither served nor listed
            client(router).completions.create(model="nope", prompt="hi")
        client(router).completions.create(model="m", prompt="hi")
        counted = "lmserve_router:model_requests_total"
        assert metric(router, counted, model="asleep") == 1
        assert metric(router, counted, model="m") == 1
        assert metric(router, counted, model="nope") == 0  # clients cannot grow the label set


def test_backend_4xx_passes_through_unchanged(fresh_standins):
    a = fresh_standins[0]
    a.fail, a.fail_status = "status", 422
    with running_router([a.url]) as router:
        resp = httpx.post(router.url + "/v1/completions", json={"model": "m", "prompt": "hi"})
        assert resp.status_code == 422
        assert resp.json() == {"error": {"message": "a refuses", "type": "x", "code": 7}}


def test_router_key_for_clients_and_backend_key_for_engines(fresh_standins):
    a = fresh_standins[0]
    with running_router([a.url], api_key="client-key", backend_api_key="engine-key") as router:
        with pytest.raises(openai.AuthenticationError):
            client(router, "wrong").completions.create(model="m", prompt="hi")
        with pytest.raises(openai.AuthenticationError):
            client(router, "wrong").models.list()
        client(router, "client-key").completions.create(model="m", prompt="hi")
        assert a.requests[-1]["headers"]["authorization"] == "Bearer engine-key"


def test_failure_before_the_first_byte_is_retried_on_another_backend(fresh_standins):
    a, b, _ = fresh_standins
    a.fail = "drop"  # headers, then the connection breaks before any chunk
    with running_router([a.url, b.url], routing_logic="roundrobin") as router:
        for _ in range(4):
            chunks = client(router).completions.create(model="m", prompt="hi", stream=True)
            assert served_by("".join(c.choices[0].text for c in chunks)) == "b"
        assert len(a.requests) >= 2  # a was tried and failed
        assert metric(router, "lmserve_router:retries_total") >= 2


def test_a_dead_backend_is_routed_around_and_marked_at_once(fresh_standins):
    from tests.router.standin import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens
    b = fresh_standins[1]
    with running_router([dead, b.url], wait_healthy=1, health_check_interval=30) as router:
        router.state.pool.get(dead).healthy = True  # as if it had just died
        router.state.pool.get(dead).model_cards = [{"id": "m"}]
        answers = [client(router).completions.create(model="m", prompt="hi") for _ in range(4)]
        assert all(served_by(r.choices[0].text) == "b" for r in answers)
        assert router.state.pool.get(dead).healthy is False  # the refused connection said so


def test_failure_mid_stream_ends_the_stream_with_an_error_event(fresh_standins):
    a = fresh_standins[0]
    a.fail = "midstream"
    with running_router([a.url]) as router:
        start = time.monotonic()
        received = []
        with pytest.raises(openai.APIError, match="mid-stream"):
            for chunk in client(router).completions.create(model="m", prompt="hi", stream=True):
                received.append(chunk.choices[0].text)
        assert received == ["a0 "] and time.monotonic() - start < 5


def test_health_checks_remove_a_failing_backend_and_restore_it(fresh_standins):
    a, b, _ = fresh_standins
    with running_router([a.url, b.url]) as router:
        a.healthy = False
        removed_s = wait_until(lambda: not router.state.pool.get(a.url).healthy, what="removal")
        answers = Counter(
            served_by(client(router).completions.create(model="m", prompt="x").choices[0].text)
            for _ in range(6)
        )
        assert answers == {"b": 6}
        a.healthy = True
        restored_s = wait_until(lambda: router.state.pool.get(a.url).healthy, what="restoration")
        assert removed_s < 3 and restored_s < 3
        assert metric(router, "lmserve_router:backend_healthy", backend=a.url) == 1


def test_least_loaded_avoids_an_engine_whose_metrics_show_a_queue(fresh_standins):
    a, b, _ = fresh_standins
    a.waiting = 20
    with running_router([a.url, b.url], routing_logic="least-loaded") as router:
        wait_until(lambda: router.state.pool.get(a.url).load >= 20, what="a's queue scraped")
        for _ in range(6):
            client(router).completions.create(model="m", prompt="hi")
        assert not a.requests and len(b.requests) == 6


def test_session_routing_by_header_or_body_field(fresh_standins):
    with running_router([e.url for e in fresh_standins], routing_logic="session") as router:
        by_header = {
            served_by(
                client(router)
                .completions.create(model="m", prompt="hi", extra_headers={"x-session-id": "s-1"})
                .choices[0]
                .text
            )
            for _ in range(5)
        }
        by_user = {
            served_by(
                client(router)
                .completions.create(model="m", prompt="hi", user="u-9")
                .choices[0]
                .text
            )
            for _ in range(5)
        }
        assert len(by_header) == 1 and len(by_user) == 1
        assert metric(router, "lmserve_router:routing_decisions_total", reason="session") == 10


def test_metrics_count_requests_decisions_latency_and_trie(fresh_standins):
    a, b, _ = fresh_standins
    with running_router([a.url, b.url], routing_logic="prefix-aware") as router:
        for i in range(4):
            client(router).completions.create(model="m", prompt=f"prompt {i} " * 40)
        assert metric(router, "lmserve_router:requests_total", status="200") == 4
        assert metric(router, "lmserve_router:routing_decisions_total", reason="prefix_miss") == 4
        assert metric(router, "lmserve_router:added_latency_seconds_count") == 4
        assert metric(router, "lmserve_router:prefix_trie_nodes") > 0
        assert metric(router, "lmserve_router:in_flight_requests", backend=a.url) == 0
        assert metric(router, "lmserve_router:backend_healthy") == 2


def test_remembered_metric_children_are_dropped_when_a_backend_leaves():
    from prometheus_client import generate_latest

    from lmserve.router.metrics import RouterMetrics

    m = RouterMetrics.create()
    m.child(m.in_flight, "http://a").set(3)
    m.child(m.requests, "http://a", "200").inc()
    assert m.child(m.in_flight, "http://a") is m.in_flight.labels("http://a")
    m.forget_backend("http://a")
    text = generate_latest(m.registry).decode()
    assert 'in_flight_requests{backend="http://a"}' not in text  # the gauge went
    assert 'requests_total{backend="http://a",status="200"} 1.0' in text  # history stays
    m.child(m.in_flight, "http://a").set(1)  # it came back: a new, exported child
    text = generate_latest(m.registry).decode()
    assert 'in_flight_requests{backend="http://a"} 1.0' in text
