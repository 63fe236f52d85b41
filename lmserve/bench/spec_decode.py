"""Speculative-decoding figures in `lmserve bench` output.

Offline benchmarks (throughput, latency) read the totals from `LLM.get_spec_decode_stats()`;
`bench serve` reads lmserve's `/metrics` counters before and after the run and reports the
difference (nothing when the server is not lmserve or runs without speculation).
"""

from __future__ import annotations

from typing import Any

from lmserve.core.messages import SpecDecodeStats

_PREFIX = "lmserve:spec_decode_"


def format_spec_decode(stats: dict[str, Any]) -> str:
    """One block of text from `SpecDecodeStats.to_dict()`."""
    by_pos = ", ".join(
        f"{j}: {rate:.1%}" for j, rate in enumerate(stats["acceptance_rate_per_pos"])
    )
    return (
        f"Speculative decoding: {stats['num_draft_tokens']} draft tokens, "
        f"{stats['num_accepted_tokens']} accepted (acceptance rate "
        f"{stats['acceptance_rate']:.1%}), mean accepted length "
        f"{stats['mean_accepted_length']:.2f} tokens per verification\n"
        f"Acceptance rate by draft position: {by_pos or '-'}"
    )


def scrape_spec_decode(base_url: str, timeout: float = 5.0) -> SpecDecodeStats | None:
    """Totals of lmserve's spec-decode counters on `base_url/metrics` (summed over models);
    None when the page is missing or has none of them."""
    from prometheus_client.parser import text_string_to_metric_families

    from lmserve.bench import http_get

    try:
        status, text = http_get(base_url.rstrip("/") + "/metrics", {}, timeout)
    except OSError:
        return None
    if status != 200:
        return None
    totals: dict[str, float] = {}
    per_pos: dict[str, dict[int, float]] = {"draft": {}, "accepted": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith(_PREFIX) or not sample.name.endswith("_total"):
                continue
            name = sample.name[len(_PREFIX) : -len("_total")]
            if "position" in sample.labels:
                kind = "draft" if name == "num_draft_tokens_per_pos" else "accepted"
                pos = int(sample.labels["position"])
                per_pos[kind][pos] = per_pos[kind].get(pos, 0.0) + sample.value
            else:
                totals[name] = totals.get(name, 0.0) + sample.value
    if not totals:
        return None
    width = max([*per_pos["draft"], *per_pos["accepted"], -1]) + 1
    return SpecDecodeStats(
        num_drafts=int(totals.get("num_drafts", 0)),
        num_draft_tokens=int(totals.get("num_draft_tokens", 0)),
        num_accepted_tokens=int(totals.get("num_accepted_tokens", 0)),
        num_draft_tokens_per_pos=[int(per_pos["draft"].get(j, 0)) for j in range(width)],
        num_accepted_tokens_per_pos=[int(per_pos["accepted"].get(j, 0)) for j in range(width)],
    )


def difference(after: SpecDecodeStats, before: SpecDecodeStats | None) -> SpecDecodeStats:
    """`after - before`, counter by counter (what one benchmark run added)."""
    if before is None:
        return after

    def minus(a: list[int], b: list[int]) -> list[int]:
        return [x - (b[j] if j < len(b) else 0) for j, x in enumerate(a)]

    return SpecDecodeStats(
        num_drafts=after.num_drafts - before.num_drafts,
        num_draft_tokens=after.num_draft_tokens - before.num_draft_tokens,
        num_accepted_tokens=after.num_accepted_tokens - before.num_accepted_tokens,
        num_draft_tokens_per_pos=minus(after.num_draft_tokens_per_pos, before.num_draft_tokens_per_pos),
        num_accepted_tokens_per_pos=minus(after.num_accepted_tokens_per_pos, before.num_accepted_tokens_per_pos),
    )  # fmt: skip
