"""Speculative decoding metrics: the counters' arithmetic, their trip from the EngineCore to the
front-end, and what `/metrics` shows (draft tokens, accepted tokens, acceptance rate by
position)."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, generate_latest

from lmserve.core.messages import EngineCoreOutputs, SchedulerStats, SpecDecodeStats
from lmserve.metrics.stats import StatsRecorder
from lmserve.serial_utils import MsgpackDecoder, MsgpackEncoder


def test_acceptance_rate_by_position_counts_drafts_at_each_position():
    stats = SpecDecodeStats()
    stats.observe(num_draft_tokens=3, num_accepted_tokens=3)
    stats.observe(num_draft_tokens=3, num_accepted_tokens=1)
    stats.observe(num_draft_tokens=1, num_accepted_tokens=0)  # near max_tokens: one draft
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (3, 7, 4)
    assert stats.num_draft_tokens_per_pos == [3, 2, 2]
    assert stats.num_accepted_tokens_per_pos == [2, 1, 1]
    assert stats.acceptance_rate_per_pos() == [2 / 3, 0.5, 0.5]
    assert stats.acceptance_rate == 4 / 7
    assert stats.mean_accepted_length == 1 + 4 / 3
    total = SpecDecodeStats()
    total.add(stats)
    total.add(stats)
    assert total.num_accepted_tokens_per_pos == [4, 2, 2] and total.num_drafts == 6


def test_spec_decode_stats_travel_with_the_engine_outputs():
    stats = SpecDecodeStats()
    stats.observe(4, 2)
    message = EngineCoreOutputs(scheduler_stats=SchedulerStats(spec_decode=stats))
    decoded = MsgpackDecoder(EngineCoreOutputs).decode(MsgpackEncoder().encode(message))
    assert decoded.scheduler_stats.spec_decode == stats


def value(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, {"model_name": "spec-metrics", **labels}) or 0.0


def test_metrics_endpoint_shows_draft_and_accepted_tokens_and_rates():
    recorder = StatsRecorder(model_name="spec-metrics")
    first, second = SpecDecodeStats(), SpecDecodeStats()
    first.observe(2, 2)
    second.observe(2, 0)
    for stats in (first, second):
        recorder.on_scheduler_stats(SchedulerStats(spec_decode=stats))
    recorder.on_scheduler_stats(SchedulerStats())  # a step without verification changes nothing
    assert value("lmserve:spec_decode_num_drafts_total") == 2
    assert value("lmserve:spec_decode_num_draft_tokens_total") == 4
    assert value("lmserve:spec_decode_num_accepted_tokens_total") == 2
    assert value("lmserve:spec_decode_num_accepted_tokens_per_pos_total", position="1") == 1
    assert value("lmserve:spec_decode_num_draft_tokens_per_pos_total", position="1") == 2
    assert value("lmserve:spec_decode_acceptance_rate") == 0.5
    assert value("lmserve:spec_decode_acceptance_rate_per_pos", position="0") == 0.5
    text = generate_latest(REGISTRY).decode()
    assert 'lmserve:spec_decode_acceptance_rate_per_pos{model_name="spec-metrics",position="1"} 0.5' in text  # fmt: skip


@pytest.mark.slow
def test_served_engine_reports_spec_decode_on_metrics(tiny_model_dir, tmp_path):
    """`lmserve serve --speculative-config ...`: after a request, /metrics has the counters."""
    from tests.entrypoints.openai.conftest import start_server

    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}'
    server = start_server(tiny_model_dir("llama"), "--speculative-config", spec, log_dir=tmp_path)
    try:
        prompt = [7, 8, 9, 10, 11] * 8
        response = server.post(
            "/v1/completions",
            json={"model": server.model, "prompt": prompt, "max_tokens": 32, "temperature": 0},
        )
        assert response.status_code == 200, response.text
        assert server.metric("lmserve:spec_decode_num_draft_tokens_total") > 0
        drafts_at_0 = server.metric("lmserve:spec_decode_num_draft_tokens_per_pos_total", position="0")  # fmt: skip
        assert drafts_at_0 > 0
        rate = server.metric("lmserve:spec_decode_acceptance_rate")
        accepted = server.metric("lmserve:spec_decode_num_accepted_tokens_total")
        drafted = server.metric("lmserve:spec_decode_num_draft_tokens_total")
        assert rate == pytest.approx(accepted / drafted)
    finally:
        server.stop()
