"""Sampler tests. Shared helpers: a SamplingMetadata builder from per-row dicts, and a chi-square
goodness-of-fit p-value (scipy is not a dependency, so it uses torch.special.gammaincc)."""

from __future__ import annotations

from typing import Any

import torch

from lmserve.sample.metadata import SamplingMetadata

# Statistical tests fail when the p-value is below this: with a changed seed, a correct sampler
# would fail each such test with probability 1e-6. With the fixed seeds used here they are
# deterministic anyway.
ALPHA = 1e-6

# Device-dependent tests run on each of these (CUDA only where present).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_metadata(
    vocab_size: int,
    rows: list[dict[str, Any]],
    max_num_logprobs: int | None = None,
    device: torch.device | str = "cpu",
) -> SamplingMetadata:
    """Build batched metadata the way the runner would, leaving unused groups None.

    Row keys (all optional): temperature (default 0 = greedy), generator, top_k, top_p, min_p,
    presence, frequency, repetition, prompt (list of ids), output (list of ids),
    logit_bias ({id: bias}), banned (list of ids).
    """

    def column(key: str, off: float | int, dtype: torch.dtype) -> torch.Tensor | None:
        if all(key not in row for row in rows):
            return None
        return torch.tensor([row.get(key, off) for row in rows], dtype=dtype)

    def padded(key: str) -> torch.Tensor:
        width = max((len(row.get(key, [])) for row in rows), default=0)
        ids = [
            list(row.get(key, [])) + [vocab_size] * (width - len(row.get(key, []))) for row in rows
        ]
        return torch.tensor(ids, dtype=torch.int64).reshape(len(rows), width)

    temperature = torch.tensor([row.get("temperature", 0.0) for row in rows], dtype=torch.float32)
    presence = column("presence", 0.0, torch.float32)
    frequency = column("frequency", 0.0, torch.float32)
    repetition = column("repetition", 1.0, torch.float32)
    uses_penalties = any(t is not None for t in (presence, frequency, repetition))
    bias = [(i, t, b) for i, row in enumerate(rows) for t, b in row.get("logit_bias", {}).items()]
    banned = [(i, t) for i, row in enumerate(rows) for t in row.get("banned", [])]
    metadata = SamplingMetadata(
        temperature=temperature,
        all_greedy=bool((temperature == 0).all()),
        all_random=bool((temperature > 0).all()),
        generators={i: row["generator"] for i, row in enumerate(rows) if "generator" in row},
        top_k=column("top_k", vocab_size, torch.int64),
        top_p=column("top_p", 1.0, torch.float32),
        min_p=column("min_p", 0.0, torch.float32),
        presence_penalties=presence,
        frequency_penalties=frequency,
        repetition_penalties=repetition,
        prompt_token_ids=padded("prompt") if uses_penalties else None,
        output_token_ids=padded("output") if uses_penalties else None,
        logit_bias=(
            (
                torch.tensor([r for r, _, _ in bias], dtype=torch.int64),
                torch.tensor([t for _, t, _ in bias], dtype=torch.int64),
                torch.tensor([b for _, _, b in bias], dtype=torch.float32),
            )
            if bias
            else None
        ),
        banned_tokens=(
            (
                torch.tensor([r for r, _ in banned], dtype=torch.int64),
                torch.tensor([t for _, t in banned], dtype=torch.int64),
                torch.full((len(banned),), float("-inf")),
            )
            if banned
            else None
        ),
        max_num_logprobs=max_num_logprobs,
    )
    return _to_device(metadata, torch.device(device))


def _to_device(metadata: SamplingMetadata, device: torch.device) -> SamplingMetadata:
    for name in SamplingMetadata.__slots__:
        value = getattr(metadata, name)
        if isinstance(value, torch.Tensor):
            setattr(metadata, name, value.to(device))
        elif isinstance(value, tuple):
            setattr(metadata, name, tuple(t.to(device) for t in value))
    return metadata


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(X >= statistic) for Pearson's goodness-of-fit test of `counts` against `probs`.

    Only cells with probs > 0 take part (df = their number - 1); each must expect >= 5 draws.
    """
    keep = probs > 0
    counts, probs = counts[keep].double(), probs[keep].double()
    probs = probs / probs.sum()
    expected = counts.sum() * probs
    assert bool((expected >= 5).all()), "too few draws for a chi-square test"
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(len(counts) - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, statistic / 2))
