"""/metrics carries vLLM V1's complete set: under `lmserve:` by default and, with
`--metrics-prefix vllm`, under vLLM's own names, which is what the production stack's Grafana
dashboard and its KEDA trigger query."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.entrypoints.openai.conftest import MODEL_NAME, start_server

# What the production stack's dashboard and KEDA trigger query, and the rest of vLLM V1's set.
EXPOSED = [
    "num_requests_waiting", "num_requests_running", "kv_cache_usage_perc",
    "prefix_cache_queries_total", "prefix_cache_hits_total",
    "time_to_first_token_seconds_bucket", "time_to_first_token_seconds_count",
    "e2e_request_latency_seconds_bucket", "e2e_request_latency_seconds_sum",
    "e2e_request_latency_seconds_count", "inter_token_latency_seconds_bucket",
    "request_queue_time_seconds_bucket", "request_queue_time_seconds_sum",
    "request_queue_time_seconds_count", "prompt_tokens_total", "generation_tokens_total",
    "num_preemptions_total", "request_success_total", "request_prompt_tokens_bucket",
    "request_generation_tokens_bucket", "request_prefill_time_seconds_bucket",
    "request_decode_time_seconds_bucket", "request_inference_time_seconds_bucket",
    "request_time_per_output_token_seconds_bucket", "iteration_tokens_total_bucket",
    "request_max_num_generation_tokens_bucket", "request_params_n_bucket",
    "request_params_max_tokens_bucket", "engine_healthy", "cache_config_info",
]  # fmt: skip


def samples(text: str) -> dict[str, list]:
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found.setdefault(s.name, []).append(s)
    return found


def drive(server) -> None:
    client = server.client()
    client.completions.create(model=server.model, prompt="The farmer", max_tokens=4)
    stream = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        stream=True,
        n=2,
    )
    for _ in stream:
        pass


def value(found: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in found[name] if labels.items() <= s.labels.items())


@pytest.fixture(scope="module")
def vllm_named_server(tiny_model_dir, tmp_path_factory):
    server = start_server(
        tiny_model_dir("llama"), "--metrics-prefix", "vllm", log_dir=tmp_path_factory.mktemp("m")
    )
    yield server
    server.stop()


def test_metrics_prefix_vllm_serves_every_name_vllm_dashboards_query(vllm_named_server):
    drive(vllm_named_server)
    found = samples(vllm_named_server.get("/metrics").text)
    missing = [n for n in EXPOSED if f"vllm:{n}" not in found]
    assert not missing, f"missing under vllm: {missing}"
    assert not [n for n in found if n.startswith("lmserve:")]
    assert value(found, "vllm:engine_healthy", model_name=MODEL_NAME) == 1
    info = found["vllm:cache_config_info"][0]
    assert info.value == 1 and info.labels["block_size"] == "16"


def test_request_phases_and_parameters_are_observed_per_request(vllm_named_server):
    before = samples(vllm_named_server.get("/metrics").text)
    drive(vllm_named_server)
    after = samples(vllm_named_server.get("/metrics").text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("vllm:request_params_n_count") == 2  # one completion, one chat with n=2
    assert delta("vllm:request_params_n_sum") == 1 + 2
    assert delta("vllm:request_params_max_tokens_sum") == 4 + 3
    assert delta("vllm:request_max_num_generation_tokens_count") == 2
    for phase in ("prefill", "decode", "inference"):
        assert delta(f"vllm:request_{phase}_time_seconds_count") == 2
    assert delta("vllm:request_time_per_output_token_seconds_count") == 2
    inference = delta("vllm:request_inference_time_seconds_sum")
    parts = delta("vllm:request_prefill_time_seconds_sum") + delta(
        "vllm:request_decode_time_seconds_sum"
    )
    assert inference == pytest.approx(parts, rel=1e-6)
    assert 0 < inference <= delta("vllm:e2e_request_latency_seconds_sum")
    steps = delta("vllm:iteration_tokens_total_count")
    assert steps >= 4 and delta("vllm:iteration_tokens_total_sum") >= steps  # >= 1 token a step


def test_default_names_are_lmserve_prefixed(server):
    drive(server)
    found = samples(server.get("/metrics").text)
    missing = [n for n in EXPOSED if f"lmserve:{n}" not in found]
    assert not missing, f"missing under lmserve: {missing}"


def test_a_second_metrics_prefix_in_one_process_is_refused():
    from lmserve.metrics.prometheus import get_metrics, set_metrics_prefix

    get_metrics()  # this test process exports under lmserve:
    with pytest.raises(RuntimeError, match="already exist"):
        set_metrics_prefix("vllm")
    with pytest.raises(ValueError, match="choose from"):
        set_metrics_prefix("tgi")


def test_engine_healthy_follows_the_engine_and_cache_config_info_labels_its_config():
    from prometheus_client import REGISTRY

    from lmserve.config import CacheConfig
    from lmserve.metrics.stats import StatsRecorder

    alive = {"value": True}
    config = type("Config", (), {"cache_config": CacheConfig(block_size=32)})()
    StatsRecorder(model_name="health-probe").describe_engine(config, lambda: alive["value"])
    name = "lmserve:engine_healthy"
    assert REGISTRY.get_sample_value(name, {"model_name": "health-probe"}) == 1
    alive["value"] = False  # read at scrape time: a dead EngineCore shows at once
    assert REGISTRY.get_sample_value(name, {"model_name": "health-probe"}) == 0
    infos = [
        s
        for m in REGISTRY.collect()
        if m.name == "lmserve:cache_config_info"
        for s in m.samples
        if s.labels.get("block_size") == "32"
    ]
    assert infos and infos[0].value == 1
