"""kv-aware routing over real engines (tiny random Llama, CPU) publishing KV events: the
router's predicted cached tokens equal what the engine reports, for chat and completions;
an engine killed and restarted loses its index entries."""

from __future__ import annotations

import json
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from lmserve.router.proxy import BACKEND_HEADER, PREDICTED_CACHED_HEADER
from tests.entrypoints.openai.conftest import API_KEY, MODEL_NAME, RemoteServer, start_server
from tests.ports import free_port
from tests.router.conftest import metric, running_router, wait_until

pytestmark = pytest.mark.slow
SYSTEM = "You are a careful assistant who answers questions about the valley and its farms. " * 4


def start_engine(model: str, log_dir, pub: int, replay: int, port: int | None = None):
    events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{pub}",
        "replay_endpoint": f"tcp://*:{replay}",
    }
    return start_server(model, "--kv-events-config", json.dumps(events), log_dir=log_dir, port=port)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("kv-cluster")
    model = tiny_model_dir("llama")
    ports = [(free_port(), free_port()) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        engines = list(pool.map(lambda p: start_engine(model, log_dir, *p), ports))
    yield model, log_dir, engines, ports
    for engine in engines:
        engine.stop()


def kv_router(model: str, engines: list[RemoteServer], ports):
    return running_router(
        [e.url for e in engines],
        routing_logic="kv-aware",
        tokenizer=model,
        kv_events_endpoints=tuple(f"tcp://127.0.0.1:{p}" for p, _ in ports),
        kv_events_replay_endpoints=tuple(f"tcp://*:{r}" for _, r in ports),
        backend_api_key=API_KEY,
    )


def described(router, url: str) -> dict:
    return next(b for b in httpx.get(router.url + "/router/backends").json() if b["url"] == url)


def chat(client: openai.OpenAI, question: str):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=messages, max_tokens=3, temperature=0
    )
    return raw.parse(), raw.headers


def test_predicted_cached_tokens_equal_the_engines_for_chat_and_completions(cluster):
    model, _, engines, ports = cluster
    with kv_router(model, engines, ports) as router:
        wait_until(lambda: all(described(router, e.url)["kv_events_live"] for e in engines))
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
        first, headers = chat(client, "Which farm grows the most wheat?")
        home = headers[BACKEND_HEADER]
        wait_until(lambda: described(router, home)["kv_blocks"] > 0, what="BlockStored events")
        again, headers = chat(client, "Which farm grows the most wheat?")
        cached = again.usage.prompt_tokens_details.cached_tokens
        assert headers[BACKEND_HEADER] == home
        assert cached > 0 and int(headers[PREDICTED_CACHED_HEADER]) == cached
        # a new question after the same system prompt reuses the system prompt's blocks
        other, headers = chat(client, "And the least?")
        assert headers[BACKEND_HEADER] == home
        reported = other.usage.prompt_tokens_details.cached_tokens
        assert 0 < reported == int(headers[PREDICTED_CACHED_HEADER])

        prompt = "The farmer walked along the river to the old mill, " * 3
        for _ in range(2):
            raw = client.completions.with_raw_response.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0
            )
            url = raw.headers[BACKEND_HEADER]
            wait_until(lambda url=url: described(router, url)["kv_blocks"] > 0)
        reported = raw.parse().usage.prompt_tokens_details.cached_tokens
        assert reported > 0 and int(raw.headers[PREDICTED_CACHED_HEADER]) == reported
        errors = metric(router, "lmserve_router:kv_cached_tokens_prediction_error_count")
        exact = metric(router, "lmserve_router:kv_cached_tokens_prediction_error_bucket", le="0.0")
        assert (
            errors >= 5
            and exact
            - metric(router, "lmserve_router:kv_cached_tokens_prediction_error_bucket", le="-1.0")
            >= 3
        )
        assert metric(router, "lmserve_router:routing_decisions_total", reason="kv_hit") >= 3


def test_an_engine_killed_and_restarted_loses_its_entries(cluster):
    model, log_dir, engines, ports = cluster
    with kv_router(model, engines, ports) as router:
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
        _, headers = chat(client, "Where is the mill?")
        home = headers[BACKEND_HEADER]
        i = [e.url for e in engines].index(home)
        wait_until(lambda: described(router, home)["kv_blocks"] > 0)
        engines[i].proc.send_signal(signal.SIGKILL)
        engines[i].wait(30)
        wait_until(lambda: described(router, home)["kv_blocks"] == 0, timeout=10)
        port = int(home.rsplit(":", 1)[1])
        engines[i] = start_engine(model, log_dir, *ports[i], port=port)
        wait_until(lambda: described(router, home)["healthy"], timeout=10)
        assert described(router, home)["kv_blocks"] == 0  # the new engine's cache is empty
        _, headers = chat(client, "Where is the mill?")  # recomputed somewhere, then known
        wait_until(lambda: described(router, headers[BACKEND_HEADER])["kv_blocks"] > 0)
