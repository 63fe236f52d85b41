"""The dashboard's numbers: snapshots of Prometheus samples, kept for a minute, turned into
rates, hit rates and latency percentiles over a trailing window.

A snapshot holds cumulative values (counters, histogram buckets) and gauges. The increase of a
counter over a window is the newest snapshot minus the last one taken at or before the window's
start (or the oldest one, while there is less history than that); a counter that went down was
reset (the engine restarted) and counts from zero, as Prometheus' increase() does. Percentiles
interpolate linearly inside the bucket that holds the rank, as histogram_quantile() does. No
torch, no engine: the router imports this.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

RATE_WINDOW_S = 10.0  # tokens/s, requests/s, routing decisions/s
LATENCY_WINDOW_S = 60.0  # TTFT/ITL percentiles, cache hit rates
QUANTILES = (0.5, 0.9, 0.99)

GAUGES = {
    "running": "lmserve:num_requests_running",
    "waiting": "lmserve:num_requests_waiting",
    "kv_cache_usage": "lmserve:kv_cache_usage_perc",
}
RATES = {  # per second over RATE_WINDOW_S
    "prompt_tokens_per_s": "lmserve:prompt_tokens_total",
    "generation_tokens_per_s": "lmserve:generation_tokens_total",
    "requests_per_s": "lmserve:request_success_total",
}
HIT_RATES = {  # name: (hits, queries), over LATENCY_WINDOW_S
    "prefix_cache_hit_rate": ("lmserve:prefix_cache_hits_total", "lmserve:prefix_cache_queries_total"),
    "kv_offload_hit_rate": ("lmserve:kv_offload_hit_tokens_total", "lmserve:kv_offload_query_tokens_total"),
}  # fmt: skip
HISTOGRAMS = {  # over LATENCY_WINDOW_S
    "ttft_s": "lmserve:time_to_first_token_seconds",
    "itl_s": "lmserve:inter_token_latency_seconds",
}
ENGINE_COUNTERS = frozenset(RATES.values()) | {n for pair in HIT_RATES.values() for n in pair}


@dataclass
class Snapshot:
    """Samples summed over their label sets (or split by one label, for `by_label` names)."""

    t: float
    values: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)  # histogram -> le -> n
    labelled: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> label value -> v


def snapshot(
    families: Iterable[Any],
    t: float,
    names: Iterable[str] = (*GAUGES.values(), *ENGINE_COUNTERS),
    histograms: Iterable[str] = HISTOGRAMS.values(),
    by_label: dict[str, str] | None = None,
) -> Snapshot:
    """Pick the samples named `names` (summed), the buckets of `histograms`, and the samples
    named in `by_label` split by that label, from prometheus_client metric families (a
    registry's collect(), or text_string_to_metric_families)."""
    snap = Snapshot(t)
    names, by_label = set(names), by_label or {}
    bucket_names = {h + "_bucket": h for h in histograms}
    for family in families:
        for s in family.samples:
            if s.name in names:
                snap.values[s.name] = snap.values.get(s.name, 0.0) + s.value
            elif s.name in bucket_names:
                hist = snap.buckets.setdefault(bucket_names[s.name], {})
                le = float(s.labels["le"])
                hist[le] = hist.get(le, 0.0) + s.value
            if s.name in by_label:
                split = snap.labelled.setdefault(s.name, {})
                key = s.labels.get(by_label[s.name], "")
                split[key] = split.get(key, 0.0) + s.value
    return snap


def parse_text(text: str, t: float, **kwargs: Any) -> Snapshot:
    """A snapshot from a Prometheus text page (an engine's /metrics): only the lmserve lines
    reach the parser."""
    lines = [ln for ln in text.splitlines() if ln.startswith("lmserve")]
    return snapshot(text_string_to_metric_families("\n".join(lines) + "\n"), t, **kwargs)


class History:
    """One source's snapshots: enough to reach back LATENCY_WINDOW_S from the newest."""

    def __init__(self, keep_s: float = LATENCY_WINDOW_S) -> None:
        self.keep_s = keep_s
        self.snaps: deque[Snapshot] = deque()

    def add(self, snap: Snapshot) -> None:
        self.snaps.append(snap)
        # Keep the oldest snapshot that is at or before the window's start: the window's base.
        while len(self.snaps) > 2 and self.snaps[1].t <= snap.t - self.keep_s:
            self.snaps.popleft()

    @property
    def latest(self) -> Snapshot | None:
        return self.snaps[-1] if self.snaps else None

    def base(self, window_s: float) -> Snapshot | None:
        """The last snapshot at or before `window_s` ago, else the oldest; None with fewer
        than two snapshots."""
        if len(self.snaps) < 2:
            return None
        edge = self.snaps[-1].t - window_s
        found = self.snaps[0]
        for snap in list(self.snaps)[:-1]:
            if snap.t <= edge:
                found = snap
        return found

    def window(self) -> Window:
        """Gauges now and increases over the two windows."""
        new = self.latest
        if new is None:
            return Window()
        win = Window(gauges={k: new.values[n] for k, n in GAUGES.items() if n in new.values})
        rate_base, lat_base = self.base(RATE_WINDOW_S), self.base(LATENCY_WINDOW_S)
        if rate_base is not None:
            span = new.t - rate_base.t
            win.span_s = span
            win.rates = {
                n: increase(new.values, rate_base.values, n) / span for n in ENGINE_COUNTERS
            }
        if lat_base is not None:
            win.counts = {n: increase(new.values, lat_base.values, n) for n in ENGINE_COUNTERS}
            win.buckets = {h: bucket_increase(new.buckets.get(h, {}), lat_base.buckets.get(h, {}))
                           for h in new.buckets}  # fmt: skip
        return win


def increase(new: dict[str, float], old: dict[str, float], name: str) -> float:
    now, before = new.get(name, 0.0), old.get(name, 0.0)
    return now - before if now >= before else now  # went down: a reset, count from zero


def bucket_increase(new: dict[float, float], old: dict[float, float]) -> dict[float, float]:
    if any(new.get(le, 0.0) < n for le, n in old.items()):
        return dict(new)  # a reset
    return {le: n - old.get(le, 0.0) for le, n in new.items()}


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """histogram_quantile(q) of cumulative bucket counts {le: count}; None if empty."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    rank = q * items[-1][1]
    prev_le, prev_n = 0.0, 0.0
    for le, n in items:
        if n >= rank and n > prev_n:
            if math.isinf(le):
                return prev_le  # beyond the last finite bound: that bound is all we know
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = le, n
    return prev_le


@dataclass
class Window:
    """One engine (or several, added up) over the windows. None: not enough history yet."""

    gauges: dict[str, float] = field(default_factory=dict)
    span_s: float | None = None
    rates: dict[str, float] | None = None
    counts: dict[str, float] | None = None
    buckets: dict[str, dict[float, float]] | None = None

    def __add__(self, other: Window) -> Window:
        return Window(
            {k: self.gauges.get(k, 0.0) + other.gauges.get(k, 0.0)
             for k in self.gauges.keys() | other.gauges.keys()},
            self.span_s if self.span_s is not None else other.span_s,
            _add(self.rates, other.rates),
            _add(self.counts, other.counts),
            _add_buckets(self.buckets, other.buckets),
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """The JSON the page reads (a value is null when it can't be known yet)."""
        out: dict[str, Any] = {k: self.gauges.get(k) for k in GAUGES}
        for key, name in RATES.items():
            out[key] = None if self.rates is None else self.rates.get(name, 0.0)
        for key, (hits, queries) in HIT_RATES.items():
            asked = (self.counts or {}).get(queries, 0.0)
            out[key] = self.counts[hits] / asked if self.counts and asked > 0 else None
        for key, name in HISTOGRAMS.items():
            hist = (self.buckets or {}).get(name, {})
            values = {f"p{round(q * 100)}": quantile(q, hist) for q in QUANTILES}
            out[key] = values if any(v is not None for v in values.values()) else None
        return out


def _add(a: dict[str, float] | None, b: dict[str, float] | None) -> dict[str, float] | None:
    if a is None or b is None:
        return a if b is None else b
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in a.keys() | b.keys()}


def _add_buckets(a, b):
    if a is None or b is None:
        return a if b is None else b
    return {h: _add(a.get(h, {}), b.get(h, {})) for h in a.keys() | b.keys()}


def rates_by_label(history: History, name: str) -> dict[str, float]:
    """Per-second increase of a `by_label` sample over RATE_WINDOW_S, by label value."""
    new, base = history.latest, history.base(RATE_WINDOW_S)
    if new is None or base is None:
        return {}
    now, before = new.labelled.get(name, {}), base.labelled.get(name, {})
    span = new.t - base.t
    return {k: increase(now, before, k) / span for k in sorted(now)}
