"""TTFT / TPOT / ITL / E2EL / goodput math on synthetic timestamps: exact numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pytest import approx

from lmserve.bench.metrics import (
    RequestRecord,
    distribution_ms,
    format_summary,
    max_concurrency_seen,
    parse_goodput,
    per_round_summary,
    returning_rounds_ttft,
    summarize,
    timings_from_events,
)


def test_ttft_itl_e2el_from_event_times():
    ttft, itl, e2el = timings_from_events(10.0, [10.25, 10.5, 10.75, 11.5], 11.625)
    assert ttft == approx(0.25)
    assert itl == approx([0.25, 0.25, 0.75])
    assert e2el == approx(1.625)
    record = RequestRecord(success=True, output_len=4, ttft=ttft, latency=e2el, itl=itl)
    assert record.tpot == approx((1.625 - 0.25) / 3)


def test_tpot_is_undefined_for_one_output_token():
    assert RequestRecord(success=True, output_len=1, ttft=0.2, latency=0.2).tpot is None
    assert RequestRecord(success=True, output_len=2, ttft=0.2, latency=0.5).tpot == approx(0.3)


def _records() -> list[RequestRecord]:
    return [
        # TPOT = (0.5 - 0.1) / 2 = 0.2
        RequestRecord(True, 10, 3, start_time=0.0, ttft=0.1, latency=0.5, itl=[0.2, 0.2]),
        # one output token: no TPOT, no ITL
        RequestRecord(True, 20, 1, start_time=0.1, ttft=0.3, latency=0.3),
        # TPOT = (1.4 - 0.2) / 4 = 0.3
        RequestRecord(True, 30, 5, start_time=0.2, ttft=0.2, latency=1.4, itl=[0.1, 0.3, 0.4, 0.4]),
        RequestRecord(False, 40, 0, start_time=0.3, latency=0.05, error="HTTP 500"),
    ]


def test_summary_numbers_are_exact():
    s = summarize(_records(), duration_s=2.0, percentiles=[50, 90, 99])
    assert (s["completed"], s["failed"]) == (3, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (60, 9)  # the failed one not
    assert s["request_throughput"] == approx(1.5)
    assert s["output_throughput"] == approx(4.5)
    assert s["total_token_throughput"] == approx(34.5)
    assert s["request_goodput"] is None
    # TTFT [100, 300, 200] ms
    assert s["mean_ttft_ms"] == approx(200)
    assert s["median_ttft_ms"] == approx(200)
    assert s["std_ttft_ms"] == approx(math.sqrt(20000 / 3))
    assert s["p90_ttft_ms"] == approx(280)  # linear interpolation
    assert s["p99_ttft_ms"] == approx(298)
    assert s["p50_ttft_ms"] == approx(200)
    # TPOT [200, 300] ms (the 1-token request has none)
    assert s["mean_tpot_ms"] == approx(250)
    assert s["median_tpot_ms"] == approx(250)
    assert s["p90_tpot_ms"] == approx(290)
    # ITL pools every gap: [200, 200, 100, 300, 400, 400] ms
    assert s["mean_itl_ms"] == approx(1600 / 6)
    assert s["median_itl_ms"] == approx(250)
    assert s["p99_itl_ms"] == approx(np.percentile([200, 200, 100, 300, 400, 400], 99))
    # E2EL [500, 300, 1400] ms
    assert s["mean_e2el_ms"] == approx(2200 / 3)
    assert s["median_e2el_ms"] == approx(500)
    assert s["max_concurrent_requests"] == 4  # all four overlap at t = 0.3


@pytest.mark.parametrize(
    "slos, good",
    [
        ({"ttft": 250}, 2),  # 100 and 200 ms pass, 300 ms does not
        ({"ttft": 300}, 3),  # equal to the SLO passes
        ({"tpot": 250}, 2),  # 200 ms passes; the 1-token request has no TPOT and passes
        ({"tpot": 100}, 1),
        ({"e2el": 600}, 2),
        ({"ttft": 250, "e2el": 600}, 1),  # every SLO must hold
        ({"ttft": 0}, 0),
    ],
)
def test_goodput_counts_completed_requests_meeting_every_slo(slos, good):
    s = summarize(_records(), duration_s=2.0, goodput_slos_ms=slos)
    assert s["request_goodput"] == approx(good / 2.0)


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "TPOT:50.5", "e2el:3000"]) == {
        "ttft": 500.0,
        "tpot": 50.5,
        "e2el": 3000.0,
    }
    assert parse_goodput(None) == {}
    for bad in (["itl:5"], ["ttft"], ["ttft:x"], ["ttft:-1"]):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput(bad)


def test_empty_distributions_are_zero():
    stats = distribution_ms([], [99])
    assert stats == {"mean": 0.0, "median": 0.0, "std": 0.0, "p99": 0.0}
    s = summarize([RequestRecord(False, error="x", latency=0.1)], duration_s=1.0)
    assert s["completed"] == 0 and s["mean_ttft_ms"] == 0.0 and s["request_throughput"] == 0


def test_max_concurrency_counts_overlaps_and_skips_unsent_requests():
    records = [
        RequestRecord(True, start_time=0.0, latency=1.0),
        RequestRecord(True, start_time=1.0, latency=1.0),  # starts as the first ends
        RequestRecord(True, start_time=1.5, latency=0.1),
        RequestRecord(False, error="not sent"),  # latency 0: never sent
    ]
    assert max_concurrency_seen(records) == 2


def test_per_round_summary():
    records = [
        RequestRecord(True, 100, 5, ttft=0.1, latency=0.5, user_id=0, round_index=0),
        RequestRecord(True, 200, 5, ttft=0.3, latency=0.7, user_id=1, round_index=0),
        RequestRecord(True, 300, 5, ttft=0.2, latency=0.6, user_id=0, round_index=1),
        RequestRecord(False, error="x", user_id=1, round_index=1),
    ]
    assert per_round_summary(records) == [
        {
            "round": 0,
            "completed": 2,
            "mean_prompt_len": 150.0,
            "mean_ttft_ms": approx(200),
            "p50_ttft_ms": approx(200),
            "p90_ttft_ms": approx(280),
            "mean_e2el_ms": approx(600),
        },
        {
            "round": 1,
            "completed": 1,
            "mean_prompt_len": 300.0,
            "mean_ttft_ms": approx(200),
            "p50_ttft_ms": approx(200),
            "p90_ttft_ms": approx(200),
            "mean_e2el_ms": approx(600),
        },
    ]


def test_returning_rounds_ttft_leaves_out_each_users_first_round():
    records = [
        RequestRecord(True, 100, 5, ttft=1.0, latency=2.0, user_id=0, round_index=0),
        RequestRecord(True, 100, 5, ttft=0.1, latency=0.5, user_id=0, round_index=1),
        RequestRecord(True, 100, 5, ttft=0.3, latency=0.5, user_id=0, round_index=2),
        RequestRecord(False, error="x", user_id=1, round_index=1),
    ]
    stats = returning_rounds_ttft(records)
    assert stats["mean"] == approx(200) and stats["p50"] == approx(200)
    assert stats["p99"] < 300.0 + 1e-9


def test_format_summary_lists_every_metric():
    s = summarize(_records(), duration_s=2.0, goodput_slos_ms={"ttft": 250}, percentiles=[99])
    text = format_summary(s, [99])
    for label in (
        "Mean TTFT (ms):",
        "P99 TPOT (ms):",
        "Median ITL (ms):",
        "Std E2EL (ms):",
        "Request goodput (req/s):",
        "Successful requests:",
    ):
        assert label in text
