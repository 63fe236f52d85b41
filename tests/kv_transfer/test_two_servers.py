"""Two `lmserve serve` processes sharing one real Redis: KV that one engine computed is a remote
hit on the other (its /metrics say so), the answers are identical, and the stored KV outlives
an engine restart."""

from __future__ import annotations

import json
import time

import pytest

from tests.entrypoints.openai.conftest import start_server

pytestmark = pytest.mark.slow

CHUNK = 32
PROMPT = " ".join(f"word{i % 50}" for i in range(80))  # ~380 tokens of the tiny tokenizer
HIT = "lmserve:kv_offload_hit_tokens_total"


def kv_flags(redis_url: str, **extra) -> list[str]:
    options = {"chunk_size": CHUNK, "cpu_size_gib": 0.01, "remote_url": redis_url, **extra}
    config = {"kv_connector": "TieredConnector", "kv_connector_extra_config": options}
    return ["--kv-transfer-config", json.dumps(config)]


def complete(server) -> tuple[str, int]:
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    answer = server.post("/v1/completions", json=body).json()
    assert "choices" in answer, answer
    return answer["choices"][0]["text"], answer["usage"]["prompt_tokens"]


def wait_for_keys(client, at_least: int, timeout_s: float = 20.0) -> int:
    """The engine writes to Redis from a background thread: wait until the keys are there."""
    deadline = time.monotonic() + timeout_s
    while (n := client.dbsize()) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


def test_kv_computed_by_one_engine_is_a_redis_hit_on_another_and_survives_a_restart(
    tiny_model_dir, redis_server, tmp_path
):
    model_dir = tiny_model_dir("llama")
    redis = redis_server.client()
    disk = str(tmp_path / "kv-a")
    first = start_server(model_dir, *kv_flags(redis_server.url, disk_path=disk), log_dir=tmp_path)
    second = start_server(model_dir, *kv_flags(redis_server.url), log_dir=tmp_path)
    try:
        text_first, prompt_tokens = complete(first)
        num_chunks = prompt_tokens // CHUNK
        assert wait_for_keys(redis, num_chunks) >= num_chunks
        text_second, _ = complete(second)
        assert text_second == text_first
        loadable = (prompt_tokens - 1) // CHUNK * CHUNK
        assert second.metric(HIT, tier="redis") == loadable
        assert first.metric(HIT) == 0  # it computed everything itself

        port = int(first.url.rsplit(":", 1)[1])
        assert first.stop() == 0
        first = start_server(
            model_dir, *kv_flags(redis_server.url, disk_path=disk), log_dir=tmp_path, port=port
        )
        text_restarted, _ = complete(first)
        assert text_restarted == text_first
        # Its own disk tier (the fastest that has the chunks after a restart) served them.
        assert first.metric(HIT, tier="disk") == loadable
    finally:
        first.stop()
        second.stop()
