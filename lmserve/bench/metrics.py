"""Serving metrics: per-request records in, one summary out. Pure functions, no I/O.

Per request (all times in seconds, measured by the client):
    TTFT   time to first token: request sent -> first chunk that carries generated text
    ITL    inter-token latency: each gap between consecutive chunks that carry text
    E2EL   end-to-end latency: request sent -> the stream ended
    TPOT   time per output token after the first: (E2EL - TTFT) / (output_tokens - 1); defined
           only for requests with at least 2 output tokens (a 1-token request has none)

Summary (vLLM's `bench serve` names; latencies in milliseconds):
    request_throughput      completed requests / benchmark duration
    output_throughput       output tokens of completed requests / duration
    total_token_throughput  (input + output tokens of completed requests) / duration
    request_goodput         completed requests meeting EVERY given SLO / duration; a request
                            without a TPOT meets any TPOT SLO (its TPOT counts as 0, as in vLLM)
    {mean,median,std,pXX}_{ttft,tpot,itl,e2el}_ms
                            over completed requests; ITL pools the gaps of all of them.
                            Percentiles interpolate linearly (numpy's default); std is the
                            population standard deviation. With no samples every statistic is 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}
DEFAULT_PERCENTILES = (90.0, 99.0)


@dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request. Times are seconds on the client's monotonic clock."""

    success: bool = False
    prompt_len: int = 0  # prompt tokens (counted client-side, see serve.py)
    output_len: int = 0  # generated tokens (the server's usage when given)
    start_time: float = 0.0  # when the request was sent (time.perf_counter)
    ttft: float = 0.0
    latency: float = 0.0  # E2EL
    itl: list[float] = field(default_factory=list)  # gaps between text-carrying chunks
    generated_text: str = ""
    error: str = ""
    user_id: int | None = None  # multi-round-qa only
    round_index: int | None = None  # multi-round-qa only

    @property
    def tpot(self) -> float | None:
        if self.output_len < 2:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)


def timings_from_events(
    start: float, event_times: Sequence[float], end: float
) -> tuple[float, list[float], float]:
    """(TTFT, ITL gaps, E2EL) of one request from the time it was sent, the arrival times of the
    events that carried generated text (at least one), and the time its stream ended."""
    assert event_times and start <= event_times[0] <= event_times[-1] <= end, (start, end)
    itl = [b - a for a, b in zip(event_times, event_times[1:])]
    return event_times[0] - start, itl, end - start


def parse_goodput(specs: Sequence[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds). Raises
    ValueError naming the bad entry."""
    slos: dict[str, float] = {}
    for spec in specs or []:
        name, sep, value = spec.partition(":")
        name = name.strip().lower()
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"--goodput {spec!r}: expected KEY:MS with KEY in ttft, tpot, e2el")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {spec!r}: {value!r} is not a number") from None
        if not slos[name] >= 0:
            raise ValueError(f"--goodput {spec!r}: the SLO must be >= 0 ms")
    return slos


def meets_slos(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """True when a completed request is within every SLO (milliseconds; value <= SLO)."""
    values = {"ttft": record.ttft, "tpot": record.tpot or 0.0, "e2el": record.latency}
    return record.success and all(values[k] * 1000 <= slo for k, slo in slos_ms.items())


def metric_samples(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Per metric, the samples (seconds) of the completed requests."""
    done = [r for r in records if r.success]
    return {
        "ttft": [r.ttft for r in done],
        "tpot": [r.tpot for r in done if r.tpot is not None],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.latency for r in done],
    }


def distribution_ms(
    samples_s: Sequence[float], percentiles: Sequence[float] = DEFAULT_PERCENTILES
) -> dict[str, float]:
    """{"mean", "median", "std", "p90", ...} in milliseconds of samples given in seconds."""
    values = np.asarray(samples_s, dtype=np.float64) * 1000
    if values.size == 0:
        values = np.zeros(1)
    stats = {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "std": float(values.std()),
    }
    for p in percentiles:
        stats[percentile_key(p)] = float(np.percentile(values, p))
    return stats


def percentile_key(p: float) -> str:
    """90 -> "p90", 99.9 -> "p99.9"."""
    return f"p{p:g}"


def max_concurrency_seen(records: Sequence[RequestRecord]) -> int:
    """Most requests in flight at one time (from send and end times of the requests sent)."""
    sent = [r for r in records if r.success or r.latency > 0]
    events = sorted(
        [(r.start_time, 1) for r in sent] + [(r.start_time + r.latency, -1) for r in sent],
        key=lambda e: (e[0], e[1]),  # at a tie the end counts first
    )
    in_flight = peak = 0
    for _, delta in events:
        in_flight += delta
        peak = max(peak, in_flight)
    return peak


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    goodput_slos_ms: dict[str, float] | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict[str, Any]:
    """The benchmark's summary (see the module docstring for every key's meaning)."""
    assert duration_s > 0, duration_s
    done = [r for r in records if r.success]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_len for r in done)
    summary: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "request_goodput": None,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "max_concurrent_requests": max_concurrency_seen(records),
    }
    if goodput_slos_ms:
        good = sum(meets_slos(r, goodput_slos_ms) for r in done)
        summary["request_goodput"] = good / duration_s
    for metric, samples in metric_samples(records).items():
        for stat, value in distribution_ms(samples, percentiles).items():
            summary[f"{stat}_{metric}_ms"] = value
    return summary


def per_round_summary(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """multi-round-qa: per round, how many completed and their mean prompt length, TTFT (mean,
    p50, p90) and E2EL (a shared, growing history should keep TTFT flat when the server caches
    prefixes)."""
    rounds = sorted({r.round_index for r in records if r.round_index is not None})
    table = []
    for k in rounds:
        done = [r for r in records if r.round_index == k and r.success]
        ttft = distribution_ms([r.ttft for r in done], (50, 90))
        table.append(
            {
                "round": k,
                "completed": len(done),
                "mean_prompt_len": float(np.mean([r.prompt_len for r in done])) if done else 0.0,
                "mean_ttft_ms": ttft["mean"],
                "p50_ttft_ms": ttft["p50"],
                "p90_ttft_ms": ttft["p90"],
                "mean_e2el_ms": float(np.mean([r.latency for r in done]) * 1000) if done else 0.0,
            }
        )
    return table


def returning_rounds_ttft(records: Sequence[RequestRecord]) -> dict[str, float]:
    """multi-round-qa: TTFT (ms: mean, p50, p90, p99) of the rounds after each user's first --
    the requests whose history the server has seen before, which only a cache can speed up."""
    later = [r.ttft for r in records if r.success and (r.round_index or 0) > 0]
    return distribution_ms(later, (50, 90, 99))


def format_summary(summary: dict[str, Any], percentiles: Sequence[float]) -> str:
    """The summary as vLLM's result table."""
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value: Any) -> None:
        text = f"{value:<10.2f}" if isinstance(value, float) else f"{value:<10}"
        lines.append(f"{label:<40}{text}")

    row("Successful requests:", summary["completed"])
    row("Failed requests:", summary["failed"])
    row("Benchmark duration (s):", summary["duration"])
    row("Total input tokens:", summary["total_input_tokens"])
    row("Total generated tokens:", summary["total_output_tokens"])
    row("Request throughput (req/s):", summary["request_throughput"])
    if summary.get("request_goodput") is not None:
        row("Request goodput (req/s):", summary["request_goodput"])
    row("Output token throughput (tok/s):", summary["output_throughput"])
    row("Total token throughput (tok/s):", summary["total_token_throughput"])
    row("Peak concurrent requests:", summary["max_concurrent_requests"])
    for metric in METRICS:
        lines.append("{s:{c}^50}".format(s=METRIC_TITLES[metric], c="-"))
        name = metric.upper()
        row(f"Mean {name} (ms):", summary[f"mean_{metric}_ms"])
        row(f"Median {name} (ms):", summary[f"median_{metric}_ms"])
        row(f"Std {name} (ms):", summary[f"std_{metric}_ms"])
        for p in percentiles:
            key = percentile_key(p)
            row(f"P{p:g} {name} (ms):", summary[f"{key}_{metric}_ms"])
    lines.append("=" * 50)
    return "\n".join(lines)
