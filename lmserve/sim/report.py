"""What a simulation reports: latency percentiles, throughput, per-replica load and hit rates,
replicas over time and GPU-hours, as one JSON-able dict; and a plot of it.

Latencies are the client's: TTFT = first token - sent (the request overhead of the profile
included), E2E = last token - sent; ITL percentiles are over every generated token after the
first (each is the step that produced it). Requests sent before `warmup_s` are left out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lmserve.sim.cluster import Cluster
from lmserve.sim.engine import ITL_BIN_RATIO

PERCENTILES = (50, 90, 99)


def _percentiles(values: np.ndarray, prefix: str, scale: float = 1000.0) -> dict[str, float]:
    if values.size == 0:
        return {}
    out = {f"mean_{prefix}_ms": float(values.mean() * scale)}
    for p in PERCENTILES:
        out[f"p{p}_{prefix}_ms"] = float(np.percentile(values, p) * scale)
    return out


def _histogram_percentiles(hist: dict[int, float]) -> dict[str, float]:
    if not hist:
        return {}
    bins = np.array(sorted(hist))
    weights = np.array([hist[b] for b in bins], dtype=float)
    cdf = np.cumsum(weights) / weights.sum()
    values = ITL_BIN_RATIO ** (bins + 0.5)
    out = {"mean_itl_ms": float((values * weights).sum() / weights.sum() * 1000)}
    for p in PERCENTILES:
        out[f"p{p}_itl_ms"] = float(values[np.searchsorted(cdf, p / 100)] * 1000)
    return out


def summarize(cluster: Cluster) -> dict[str, Any]:
    records = cluster.records.as_array()
    records = records[records[:, 0] >= cluster.config.warmup_s]
    sent, first, finish, prompt, output, cached, replica = (
        records.T if len(records) else [np.zeros(0)] * 7
    )
    duration = float(finish.max() - sent.min()) if len(records) else 0.0
    itl: dict[int, float] = {}
    queries = hits = 0
    replicas = []
    end = cluster.end_s
    gpu_s = 0.0
    for pod in cluster.pods:
        stats = pod.engine.stats
        for b, n in stats.token_steps.items():
            itl[b] = itl.get(b, 0) + n
        queries += stats.prefix_queries
        hits += stats.prefix_hits
        stop = pod.drained_s if pod.drained_s is not None else (pod.removed_s or end)
        stop = max(stop, pod.removed_s or 0.0)
        alive = max(0.0, stop - pod.created_s)
        serving = max(0.0, stop - (pod.ready_s if pod.ready_s is not None else stop))
        gpu_s += alive
        replicas.append({
            "replica": pod.index,
            "requests": stats.requests,
            "busy": stats.busy_s / serving if serving else 0.0,
            "prefix_cache_hit_rate": stats.prefix_hits / stats.prefix_queries
            if stats.prefix_queries else 0.0,
            "preemptions": stats.preemptions,
            "evicted_blocks": stats.evicted_blocks,
        })  # fmt: skip
    busy = np.array([r["busy"] for r in replicas]) if replicas else np.zeros(1)
    per_replica_requests = np.array([r["requests"] for r in replicas]) if replicas else np.zeros(1)
    summary: dict[str, Any] = {
        "routing_logic": cluster.config.routing_logic,
        "profile": cluster.profile.name,
        "simulated_s": end,
        "completed": int(len(records)),
        "duration_s": duration,
        "request_throughput": len(records) / duration if duration else 0.0,
        "output_throughput": float(output.sum() / duration) if duration else 0.0,
        "total_token_throughput": float((output.sum() + prompt.sum()) / duration)
        if duration else 0.0,
        "mean_prompt_tokens": float(prompt.mean()) if len(records) else 0.0,
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "cached_tokens_per_prompt_token": float(cached.sum() / prompt.sum())
        if len(records) else 0.0,
        **_percentiles(first - sent, "ttft"),
        **_histogram_percentiles(itl),
        **_percentiles(finish - sent, "e2el"),
        "routing_decisions": dict(sorted(cluster.reasons.items())),
        "replica_busy": {"mean": float(busy.mean()), "min": float(busy.min()),
                         "max": float(busy.max())},
        "replica_requests": {"mean": float(per_replica_requests.mean()),
                             "min": int(per_replica_requests.min()),
                             "max": int(per_replica_requests.max()),
                             "cv": float(per_replica_requests.std()
                                         / max(per_replica_requests.mean(), 1e-9))},
        "replicas_over_time": [list(s) for s in cluster.replica_samples],
        "gpu_hours": gpu_s / 3600.0,
        "per_replica": replicas,
    }  # fmt: skip
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"routing {s['routing_logic']}, profile {s['profile']}: {s['completed']} requests in "
        f"{s['duration_s']:.1f} simulated s",
        f"  TTFT ms  p50 {s.get('p50_ttft_ms', 0):9.1f}  p90 {s.get('p90_ttft_ms', 0):9.1f}  "
        f"p99 {s.get('p99_ttft_ms', 0):9.1f}",
        f"  ITL ms   p50 {s.get('p50_itl_ms', 0):9.2f}  p90 {s.get('p90_itl_ms', 0):9.2f}  "
        f"p99 {s.get('p99_itl_ms', 0):9.2f}",
        f"  E2E ms   p50 {s.get('p50_e2el_ms', 0):9.1f}  p90 {s.get('p90_e2el_ms', 0):9.1f}  "
        f"p99 {s.get('p99_e2el_ms', 0):9.1f}",
        f"  throughput {s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} output "
        f"tok/s; prefix-cache hit rate {s['prefix_cache_hit_rate']:.3f}",
        f"  replicas busy mean {s['replica_busy']['mean']:.2f} (min {s['replica_busy']['min']:.2f}"
        f", max {s['replica_busy']['max']:.2f}); requests per replica cv "
        f"{s['replica_requests']['cv']:.2f}; GPU-hours {s['gpu_hours']:.2f}",
        f"  routing decisions {s['routing_decisions']}",
    ]
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: str) -> None:
    """TTFT percentiles, per-replica load and replicas over time, one colour per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib"
        ) from None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = [r["routing_logic"] for r in results]
    x = np.arange(len(results))
    for i, p in enumerate(PERCENTILES):
        axes[0].bar(x + (i - 1) * 0.25, [r.get(f"p{p}_ttft_ms", 0) for r in results], 0.25,
                    label=f"p{p}")  # fmt: skip
    axes[0].set_xticks(x, names)
    axes[0].set_ylabel("TTFT (ms)")
    axes[0].set_yscale("log")
    axes[0].legend()
    for r in results:
        busy = sorted(rep["busy"] for rep in r["per_replica"])
        axes[1].plot(np.linspace(0, 1, len(busy)), busy, label=r["routing_logic"])
        t = [s[0] / 60 for s in r["replicas_over_time"]]
        axes[2].step(t, [s[2] for s in r["replicas_over_time"]], where="post",
                     label=r["routing_logic"])  # fmt: skip
    axes[1].set_xlabel("replicas (sorted)")
    axes[1].set_ylabel("busy fraction")
    axes[1].legend()
    axes[2].set_xlabel("simulated minutes")
    axes[2].set_ylabel("replicas")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
