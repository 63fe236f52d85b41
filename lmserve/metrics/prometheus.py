"""The Prometheus collectors, created once per process (Prometheus registries are global), all
labelled with `model_name`.

Names, label sets and histogram buckets are vLLM V1's, under the prefix `lmserve:`; with
`lmserve serve --metrics-prefix vllm` they are exported under vLLM's own `vllm:` names, so
dashboards, alerts and autoscaling triggers written for vLLM work unchanged. The prefix is
chosen once per process, before the first collector is created (`set_metrics_prefix`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

METRICS_PREFIXES = ("lmserve", "vllm")
# vLLM V1's buckets (vllm/v1/metrics/loggers.py)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                            40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
_ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_N_BUCKETS = (1, 2, 5, 10, 20)


@dataclass(frozen=True)
class Metrics:
    num_requests_running: Gauge
    num_requests_waiting: Gauge
    kv_cache_usage_perc: Gauge
    prefix_cache_queries: Counter
    prefix_cache_hits: Counter
    num_preemptions: Counter
    prompt_tokens: Counter
    generation_tokens: Counter
    request_success: Counter  # label finished_reason
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    e2e_request_latency: Histogram
    request_queue_time: Histogram
    request_prompt_tokens: Histogram
    request_generation_tokens: Histogram
    # vLLM V1's request phases and parameters, per-step tokens, health and configuration
    request_prefill_time: Histogram  # first scheduled -> first token
    request_decode_time: Histogram  # first token -> last token
    request_inference_time: Histogram  # first scheduled -> last token
    request_time_per_output_token: Histogram  # decode time / (generated tokens - 1)
    iteration_tokens: Histogram  # tokens scheduled per engine step
    request_max_num_generation_tokens: Histogram
    request_params_n: Histogram
    request_params_max_tokens: Histogram
    engine_healthy: Gauge  # 1 while the EngineCore is alive
    # Speculative decoding (counters; rates in PromQL) and cumulative acceptance gauges.
    spec_decode_num_drafts: Counter
    spec_decode_num_draft_tokens: Counter
    spec_decode_num_accepted_tokens: Counter
    spec_decode_num_draft_tokens_per_pos: Counter  # label position
    spec_decode_num_accepted_tokens_per_pos: Counter  # label position
    spec_decode_acceptance_rate: Gauge
    spec_decode_acceptance_rate_per_pos: Gauge  # label position
    # KV connector (lmserve/kv_transfer/): counters per storage tier ("cpu", "disk", "redis")
    kv_offload_query_tokens: Counter
    kv_offload_hit_tokens: Counter  # label tier
    kv_offload_loaded_bytes: Counter  # label tier
    kv_offload_load_seconds: Counter  # label tier
    kv_offload_saved_bytes: Counter  # label tier
    kv_offload_save_seconds: Counter  # label tier
    kv_offload_failures: Counter  # labels tier, reason
    # Vision-language models: the encoder cache (image embeddings) and the vision encoder.
    encoder_cache_usage_perc: Gauge
    encoder_cache_queries: Counter  # images looked up when first scheduled
    encoder_cache_hits: Counter  # ... whose embeddings were already cached
    encoder_inputs: Counter  # images the vision encoder ran on
    encoder_time_seconds: Counter  # time the vision encoder ran


_lock = threading.Lock()
_metrics: Metrics | None = None
_prefix = "lmserve"


def set_metrics_prefix(prefix: str) -> None:
    """Export under `prefix:` names; once per process, before the collectors exist."""
    global _prefix
    if prefix not in METRICS_PREFIXES:
        raise ValueError(f"--metrics-prefix {prefix!r}: choose from {METRICS_PREFIXES}")
    with _lock:
        if _metrics is not None and prefix != _prefix:
            raise RuntimeError(f"the metrics already exist under {_prefix}:")
        _prefix = prefix


def get_metrics() -> Metrics:
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = _create(_prefix)
        return _metrics


def info_gauge(name: str, documentation: str, values: dict[str, object]) -> None:
    """A vLLM-style `*_info` gauge: 1, with the configuration as labels (created once)."""
    labels = {k: str(v) for k, v in values.items()}
    with _lock:
        gauge = _info_gauges.get(name)
        if gauge is None:
            gauge = _info_gauges[name] = Gauge(f"{_prefix}:{name}", documentation, list(labels))
    gauge.labels(**labels).set(1)


_info_gauges: dict[str, Gauge] = {}


def _create(p: str) -> Metrics:
    m = ["model_name"]
    return Metrics(
        num_requests_running=Gauge(
            f"{p}:num_requests_running", "Requests running in the engine now", m
        ),
        num_requests_waiting=Gauge(
            f"{p}:num_requests_waiting", "Requests waiting to be scheduled", m
        ),
        kv_cache_usage_perc=Gauge(f"{p}:kv_cache_usage_perc", "KV-cache blocks in use, 0..1", m),
        prefix_cache_queries=Counter(
            f"{p}:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", m
        ),
        prefix_cache_hits=Counter(
            f"{p}:prefix_cache_hits", "Prompt tokens found in the prefix cache", m
        ),
        num_preemptions=Counter(f"{p}:num_preemptions", "Requests preempted", m),
        prompt_tokens=Counter(f"{p}:prompt_tokens", "Prompt tokens received", m),
        generation_tokens=Counter(f"{p}:generation_tokens", "Tokens generated", m),
        request_success=Counter(
            f"{p}:request_success", "Requests finished", m + ["finished_reason"]
        ),
        time_to_first_token=Histogram(
            f"{p}:time_to_first_token_seconds",
            "Arrival to first generated token",
            m,
            buckets=_TTFT_BUCKETS,
        ),
        inter_token_latency=Histogram(
            f"{p}:inter_token_latency_seconds",
            "Time between generated tokens",
            m,
            buckets=_ITL_BUCKETS,
        ),
        e2e_request_latency=Histogram(
            f"{p}:e2e_request_latency_seconds",
            "Arrival to last token",
            m,
            buckets=_REQUEST_LATENCY_BUCKETS,
        ),
        request_queue_time=Histogram(
            f"{p}:request_queue_time_seconds",
            "Arrival to first scheduled in the engine",
            m,
            buckets=_REQUEST_LATENCY_BUCKETS,
        ),
        request_prompt_tokens=Histogram(
            f"{p}:request_prompt_tokens", "Prompt tokens per request", m, buckets=_TOKEN_BUCKETS
        ),
        request_generation_tokens=Histogram(
            f"{p}:request_generation_tokens",
            "Generated tokens per request",
            m,
            buckets=_TOKEN_BUCKETS,
        ),
        **_request_phase_metrics(m, p),
        **_spec_decode_metrics(m, p),
        **_kv_offload_metrics(m, p),
    )


def _request_phase_metrics(m: list[str], p: str) -> dict[str, Histogram | Gauge]:
    def latency(name: str, doc: str) -> Histogram:
        return Histogram(f"{p}:{name}", doc, m, buckets=_REQUEST_LATENCY_BUCKETS)

    return dict(
        request_prefill_time=latency(
            "request_prefill_time_seconds", "First scheduled to first token (prefill phase)"
        ),
        request_decode_time=latency(
            "request_decode_time_seconds", "First token to last token (decode phase)"
        ),
        request_inference_time=latency(
            "request_inference_time_seconds", "First scheduled to last token"
        ),
        request_time_per_output_token=Histogram(
            f"{p}:request_time_per_output_token_seconds",
            "Per request: decode time over its generated tokens after the first",
            m,
            buckets=_ITL_BUCKETS,
        ),
        iteration_tokens=Histogram(
            f"{p}:iteration_tokens_total",
            "Tokens (prompt and generated) scheduled per engine step",
            m,
            buckets=_ITERATION_TOKEN_BUCKETS,
        ),
        request_max_num_generation_tokens=Histogram(
            f"{p}:request_max_num_generation_tokens",
            "Most tokens a request may generate (max_tokens)",
            m,
            buckets=_TOKEN_BUCKETS,
        ),
        request_params_n=Histogram(
            f"{p}:request_params_n", "The n parameter per request", m, buckets=_N_BUCKETS
        ),
        request_params_max_tokens=Histogram(
            f"{p}:request_params_max_tokens",
            "The max_tokens parameter per request",
            m,
            buckets=_TOKEN_BUCKETS,
        ),
        engine_healthy=Gauge(f"{p}:engine_healthy", "1 while the EngineCore is alive, else 0", m),
    )


def _kv_offload_metrics(m: list[str], p: str) -> dict[str, Counter]:
    tier = m + ["tier"]
    return dict(
        kv_offload_query_tokens=Counter(
            f"{p}:kv_offload_query_tokens",
            "Prompt tokens looked up in the KV connector's tiers beyond the GPU prefix-cache hit",
            m,
        ),
        kv_offload_hit_tokens=Counter(
            f"{p}:kv_offload_hit_tokens", "Tokens whose KV was loaded from the tier", tier
        ),
        kv_offload_loaded_bytes=Counter(
            f"{p}:kv_offload_loaded_bytes", "Bytes of KV read from the tier", tier
        ),
        kv_offload_load_seconds=Counter(
            f"{p}:kv_offload_load_seconds", "Seconds spent reading KV from the tier", tier
        ),
        kv_offload_saved_bytes=Counter(
            f"{p}:kv_offload_saved_bytes", "Bytes of KV written to the tier", tier
        ),
        kv_offload_save_seconds=Counter(
            f"{p}:kv_offload_save_seconds", "Seconds spent writing KV to the tier", tier
        ),
        kv_offload_failures=Counter(
            f"{p}:kv_offload_failures",
            "KV tier faults (each one a miss: the tokens are recomputed)",
            tier + ["reason"],
        ),
        encoder_cache_usage_perc=Gauge(
            f"{p}:encoder_cache_usage_perc",
            "Encoder cache usage (image embedding rows held / all); 1 = 100%",
            m,
        ),
        encoder_cache_queries=Counter(
            f"{p}:encoder_cache_queries", "Images looked up in the encoder cache", m
        ),
        encoder_cache_hits=Counter(
            f"{p}:encoder_cache_hits", "Images found in the encoder cache (encoder not run)", m
        ),
        encoder_inputs=Counter(f"{p}:encoder_inputs", "Images the vision encoder ran on", m),
        encoder_time_seconds=Counter(
            f"{p}:encoder_time_seconds", "Seconds the vision encoder ran", m
        ),
    )


def _spec_decode_metrics(m: list[str], p: str) -> dict[str, Counter | Gauge]:
    pos = m + ["position"]
    return dict(
        spec_decode_num_drafts=Counter(
            f"{p}:spec_decode_num_drafts", "Verifications of >= 1 draft token (one request)", m
        ),
        spec_decode_num_draft_tokens=Counter(
            f"{p}:spec_decode_num_draft_tokens", "Draft tokens verified", m
        ),
        spec_decode_num_accepted_tokens=Counter(
            f"{p}:spec_decode_num_accepted_tokens", "Draft tokens accepted", m
        ),
        spec_decode_num_draft_tokens_per_pos=Counter(
            f"{p}:spec_decode_num_draft_tokens_per_pos", "Draft tokens verified at position", pos
        ),
        spec_decode_num_accepted_tokens_per_pos=Counter(
            f"{p}:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at position",
            pos,
        ),
        spec_decode_acceptance_rate=Gauge(
            f"{p}:spec_decode_acceptance_rate", "Accepted / draft tokens since start", m
        ),
        spec_decode_acceptance_rate_per_pos=Gauge(
            f"{p}:spec_decode_acceptance_rate_per_pos",
            "Accepted / draft tokens at draft position (0-based) since start",
            pos,
        ),
    )
