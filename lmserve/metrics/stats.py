"""StatsRecorder: turns front-end events and engine stats into Prometheus observations.

Latencies are measured in the front-end (where the client's experience is): time to first
token from the request's arrival, inter-token latency per sample, end-to-end on finish. Queue
time comes from the engine with the request's first output.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmserve.core.messages import (
    EncoderStats,
    EngineCoreOutput,
    SchedulerStats,
    SpecDecodeStats,
)
from lmserve.kv_transfer.base import KVTransferStats
from lmserve.metrics.prometheus import get_metrics, info_gauge
from lmserve.outputs import RequestOutput


@dataclass
class _RequestTimes:
    arrival: float
    num_prompt_tokens: int
    first_scheduled: float | None = None  # arrival + the engine's queue time
    first_token: float | None = None
    last_token_per_sample: dict[str, float] = field(default_factory=dict)
    num_generated: int = 0
    sample_ids: list[str] = field(default_factory=list)


class StatsRecorder:
    def __init__(self, model_name: str = "") -> None:
        metrics = get_metrics()
        self.metrics = metrics
        labels = {"model_name": model_name}
        self._labels = labels
        self.running = metrics.num_requests_running.labels(**labels)
        self.waiting = metrics.num_requests_waiting.labels(**labels)
        self.kv_usage = metrics.kv_cache_usage_perc.labels(**labels)
        self._requests: dict[str, _RequestTimes] = {}
        self._parent_of: dict[str, str] = {}  # engine request id -> user request id
        self._spec_totals = SpecDecodeStats()  # since start, for the acceptance-rate gauges

    def describe_engine(self, config: object, is_alive: Callable[[], bool]) -> None:
        """The engine-health gauge (read at scrape time) and the `cache_config_info` gauge."""
        self.metrics.engine_healthy.labels(**self._labels).set_function(
            lambda: 1.0 if is_alive() else 0.0
        )
        cache = getattr(config, "cache_config", None)
        if cache is not None:
            info_gauge(
                "cache_config_info",
                "The KV cache's configuration (labels), value 1",
                {f.name: getattr(cache, f.name) for f in dataclasses.fields(cache)},
            )

    def on_request_added(
        self,
        request_id: str,
        num_prompt_tokens: int,
        sample_ids: list[str] | None = None,
        max_tokens: int | None = None,
    ) -> None:
        """`sample_ids`: the engine request ids of its n samples (default: the id itself)."""
        sample_ids = sample_ids or [request_id]
        m, labels = self.metrics, self._labels
        m.request_params_n.labels(**labels).observe(len(sample_ids))
        if max_tokens is not None:
            m.request_params_max_tokens.labels(**labels).observe(max_tokens)
            m.request_max_num_generation_tokens.labels(**labels).observe(max_tokens)
        self._requests[request_id] = _RequestTimes(
            time.monotonic(), num_prompt_tokens, sample_ids=sample_ids
        )
        for sample_id in sample_ids:
            self._parent_of[sample_id] = request_id
        self.metrics.prompt_tokens.labels(**self._labels).inc(num_prompt_tokens)

    def on_request_aborted(self, request_id: str) -> None:
        self._forget(request_id)
        if self._requests.pop(request_id, None) is not None:
            self.metrics.request_success.labels(**self._labels, finished_reason="abort").inc()

    def on_scheduler_stats(self, stats: SchedulerStats) -> None:
        self.running.set(stats.num_running_reqs)
        self.waiting.set(stats.num_waiting_reqs)
        self.kv_usage.set(stats.kv_cache_usage)
        m, labels = self.metrics, self._labels
        m.prefix_cache_queries.labels(**labels).inc(stats.prefix_cache_queries)
        m.prefix_cache_hits.labels(**labels).inc(stats.prefix_cache_hits)
        m.num_preemptions.labels(**labels).inc(stats.num_preemptions)
        if stats.iteration_tokens:
            m.iteration_tokens.labels(**labels).observe(stats.iteration_tokens)
        if stats.spec_decode is not None:
            self._on_spec_decode(stats.spec_decode)
        if stats.kv_transfer is not None:
            self._on_kv_transfer(stats.kv_transfer)
        if stats.encoder is not None:
            self._on_encoder(stats.encoder)

    def _on_encoder(self, encoder: EncoderStats) -> None:
        m, labels = self.metrics, self._labels
        m.encoder_cache_usage_perc.labels(**labels).set(encoder.cache_usage)
        m.encoder_cache_queries.labels(**labels).inc(encoder.cache_queries)
        m.encoder_cache_hits.labels(**labels).inc(encoder.cache_hits)
        m.encoder_inputs.labels(**labels).inc(encoder.num_encoder_inputs)
        m.encoder_time_seconds.labels(**labels).inc(encoder.encoder_seconds)

    def _on_kv_transfer(self, kv: KVTransferStats) -> None:
        m, labels = self.metrics, self._labels
        m.kv_offload_query_tokens.labels(**labels).inc(kv.query_tokens)
        per_tier = (
            (m.kv_offload_hit_tokens, kv.hit_tokens),
            (m.kv_offload_loaded_bytes, kv.bytes_loaded),
            (m.kv_offload_load_seconds, kv.seconds_loaded),
            (m.kv_offload_saved_bytes, kv.bytes_saved),
            (m.kv_offload_save_seconds, kv.seconds_saved),
        )
        for counter, values in per_tier:
            for tier, value in values.items():
                counter.labels(**labels, tier=tier).inc(value)
        for key, count in kv.failures.items():
            tier, _, reason = key.partition(":")
            m.kv_offload_failures.labels(**labels, tier=tier, reason=reason).inc(count)

    def _on_spec_decode(self, spec: SpecDecodeStats) -> None:
        m, labels = self.metrics, self._labels
        m.spec_decode_num_drafts.labels(**labels).inc(spec.num_drafts)
        m.spec_decode_num_draft_tokens.labels(**labels).inc(spec.num_draft_tokens)
        m.spec_decode_num_accepted_tokens.labels(**labels).inc(spec.num_accepted_tokens)
        for pos, (drafted, accepted) in enumerate(
            zip(spec.num_draft_tokens_per_pos, spec.num_accepted_tokens_per_pos)
        ):
            m.spec_decode_num_draft_tokens_per_pos.labels(**labels, position=pos).inc(drafted)
            m.spec_decode_num_accepted_tokens_per_pos.labels(**labels, position=pos).inc(accepted)
        totals = self._spec_totals
        totals.add(spec)
        m.spec_decode_acceptance_rate.labels(**labels).set(totals.acceptance_rate)
        for pos, rate in enumerate(totals.acceptance_rate_per_pos()):
            m.spec_decode_acceptance_rate_per_pos.labels(**labels, position=pos).set(rate)

    def on_engine_outputs(
        self, engine_outputs: list[EngineCoreOutput], request_outputs: list[RequestOutput]
    ) -> None:
        now = time.monotonic()
        m, labels = self.metrics, self._labels
        for out in engine_outputs:
            times = self._requests.get(self._parent_of.get(out.request_id, ""))
            if times is None or not out.new_token_ids:
                continue
            n = len(out.new_token_ids)
            m.generation_tokens.labels(**labels).inc(n)
            times.num_generated += n
            if out.queue_time is not None:
                m.request_queue_time.labels(**labels).observe(out.queue_time)
                if times.first_scheduled is None:
                    times.first_scheduled = min(times.arrival + out.queue_time, now)
            if times.first_token is None:
                times.first_token = now
                m.time_to_first_token.labels(**labels).observe(now - times.arrival)
                scheduled = times.first_scheduled or times.arrival
                m.request_prefill_time.labels(**labels).observe(now - scheduled)
            last = times.last_token_per_sample.get(out.request_id)
            if last is not None:
                m.inter_token_latency.labels(**labels).observe((now - last) / n)
            times.last_token_per_sample[out.request_id] = now
        for out in request_outputs:
            if out.finished:
                self._on_finished(out, now)

    def _forget(self, request_id: str) -> None:
        times = self._requests.get(request_id)
        for sample_id in times.sample_ids if times is not None else ():
            self._parent_of.pop(sample_id, None)

    def _on_finished(self, out: RequestOutput, now: float) -> None:
        self._forget(out.request_id)
        times = self._requests.pop(out.request_id, None)
        if times is None:
            return
        m, labels = self.metrics, self._labels
        m.e2e_request_latency.labels(**labels).observe(now - times.arrival)
        m.request_prompt_tokens.labels(**labels).observe(times.num_prompt_tokens)
        m.request_generation_tokens.labels(**labels).observe(times.num_generated)
        if times.first_token is not None:
            decode = now - times.first_token
            m.request_decode_time.labels(**labels).observe(decode)
            scheduled = times.first_scheduled or times.arrival
            m.request_inference_time.labels(**labels).observe(now - scheduled)
            if times.num_generated > 1:
                per_token = decode / (times.num_generated - 1)
                m.request_time_per_output_token.labels(**labels).observe(per_token)
        for completion in out.outputs:
            reason = completion.finish_reason or "abort"
            m.request_success.labels(**labels, finished_reason=reason).inc()
