"""The Prometheus collectors, created once per process (Prometheus registries are global), all
labelled with `model_name`."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


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


_lock = threading.Lock()
_metrics: Metrics | None = None


def get_metrics() -> Metrics:
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = _create()
        return _metrics


def _create() -> Metrics:
    m = ["model_name"]
    return Metrics(
        num_requests_running=Gauge(
            "lmserve:num_requests_running", "Requests running in the engine now", m
        ),
        num_requests_waiting=Gauge(
            "lmserve:num_requests_waiting", "Requests waiting to be scheduled", m
        ),
        kv_cache_usage_perc=Gauge("lmserve:kv_cache_usage_perc", "KV-cache blocks in use, 0..1", m),
        prefix_cache_queries=Counter(
            "lmserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", m
        ),
        prefix_cache_hits=Counter(
            "lmserve:prefix_cache_hits", "Prompt tokens found in the prefix cache", m
        ),
        num_preemptions=Counter("lmserve:num_preemptions", "Requests preempted", m),
        prompt_tokens=Counter("lmserve:prompt_tokens", "Prompt tokens received", m),
        generation_tokens=Counter("lmserve:generation_tokens", "Tokens generated", m),
        request_success=Counter(
            "lmserve:request_success", "Requests finished", m + ["finished_reason"]
        ),
        time_to_first_token=Histogram(
            "lmserve:time_to_first_token_seconds",
            "Arrival to first generated token",
            m,
            buckets=_LATENCY_BUCKETS,
        ),
        inter_token_latency=Histogram(
            "lmserve:inter_token_latency_seconds",
            "Time between generated tokens",
            m,
            buckets=_LATENCY_BUCKETS,
        ),
        e2e_request_latency=Histogram(
            "lmserve:e2e_request_latency_seconds", "Arrival to last token", m, buckets=_E2E_BUCKETS
        ),
        request_queue_time=Histogram(
            "lmserve:request_queue_time_seconds",
            "Arrival to first scheduled in the engine",
            m,
            buckets=_E2E_BUCKETS,
        ),
        request_prompt_tokens=Histogram(
            "lmserve:request_prompt_tokens", "Prompt tokens per request", m, buckets=_TOKEN_BUCKETS
        ),
        request_generation_tokens=Histogram(
            "lmserve:request_generation_tokens",
            "Generated tokens per request",
            m,
            buckets=_TOKEN_BUCKETS,
        ),
        **_spec_decode_metrics(m),
        **_kv_offload_metrics(m),
    )


def _kv_offload_metrics(m: list[str]) -> dict[str, Counter]:
    tier = m + ["tier"]
    return dict(
        kv_offload_query_tokens=Counter(
            "lmserve:kv_offload_query_tokens",
            "Prompt tokens looked up in the KV connector's tiers beyond the GPU prefix-cache hit",
            m,
        ),
        kv_offload_hit_tokens=Counter(
            "lmserve:kv_offload_hit_tokens", "Tokens whose KV was loaded from the tier", tier
        ),
        kv_offload_loaded_bytes=Counter(
            "lmserve:kv_offload_loaded_bytes", "Bytes of KV read from the tier", tier
        ),
        kv_offload_load_seconds=Counter(
            "lmserve:kv_offload_load_seconds", "Seconds spent reading KV from the tier", tier
        ),
        kv_offload_saved_bytes=Counter(
            "lmserve:kv_offload_saved_bytes", "Bytes of KV written to the tier", tier
        ),
        kv_offload_save_seconds=Counter(
            "lmserve:kv_offload_save_seconds", "Seconds spent writing KV to the tier", tier
        ),
        kv_offload_failures=Counter(
            "lmserve:kv_offload_failures",
            "KV tier faults (each one a miss: the tokens are recomputed)",
            tier + ["reason"],
        ),
    )


def _spec_decode_metrics(m: list[str]) -> dict[str, Counter | Gauge]:
    pos = m + ["position"]
    return dict(
        spec_decode_num_drafts=Counter(
            "lmserve:spec_decode_num_drafts", "Verifications of >= 1 draft token (one request)", m
        ),
        spec_decode_num_draft_tokens=Counter(
            "lmserve:spec_decode_num_draft_tokens", "Draft tokens verified", m
        ),
        spec_decode_num_accepted_tokens=Counter(
            "lmserve:spec_decode_num_accepted_tokens", "Draft tokens accepted", m
        ),
        spec_decode_num_draft_tokens_per_pos=Counter(
            "lmserve:spec_decode_num_draft_tokens_per_pos", "Draft tokens verified at position", pos
        ),
        spec_decode_num_accepted_tokens_per_pos=Counter(
            "lmserve:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at position",
            pos,
        ),
        spec_decode_acceptance_rate=Gauge(
            "lmserve:spec_decode_acceptance_rate", "Accepted / draft tokens since start", m
        ),
        spec_decode_acceptance_rate_per_pos=Gauge(
            "lmserve:spec_decode_acceptance_rate_per_pos",
            "Accepted / draft tokens at draft position (0-based) since start",
            pos,
        ),
    )
