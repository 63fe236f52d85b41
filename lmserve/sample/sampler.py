"""Batched sampling: one pass over the batch, per-request parameters as tensors.

Order of work for one step (vLLM V1's):

    raw logits ──► grammar mask (constrained rows only, in place; structured outputs, grammar.py)
        │
        ├────────► log_softmax ──► logprobs (if asked)       <- the RAW model distribution
        │
        └─► float32 copy ─► logit_bias ─► banned tokens ─► penalties
                 │                                            │
                 │        greedy rows: argmax ◄───────────────┤
                 │                                            ▼
                 │        random rows: / temperature ─► min_p ─► top-k ─► top-p ─► race
                 └─ (no copy at all when no bias/ban/penalty is in use)

Logprobs therefore come from `log_softmax(raw logits)`: bias, bans, penalties, temperature and
truncation never change them (see lmserve/sample/logprobs.py).

Random sampling uses the exponential-race trick: argmax(p / E) with E ~ Exp(1) draws from p,
needs no cumulative sum and no device sync, and lets each seeded request draw its noise from its
own generator, so the same seed gives the same output whatever else is in the batch. On CUDA the
race is one Triton launch whose noise is keyed by (seed, position) per row (triton_race.py):
no generator launch per seeded row, one pass over the probabilities.

Device syncs: none, except top-k used without top-p in the batch, which reads the batch's largest
k on the host to size `torch.topk` (see truncation.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve.sample.grammar import apply_grammar_mask
from lmserve.sample.logprobs import LogprobsTensors, compute_logprobs_tensors, gather_logprobs
from lmserve.sample.metadata import SamplingMetadata
from lmserve.sample.penalties import apply_banned_tokens, apply_logit_bias, apply_penalties
from lmserve.sample.triton_argmax import triton_argmax
from lmserve.sample.triton_race import seeded_race
from lmserve.sample.truncation import apply_min_p, apply_top_k_top_p
from lmserve.triton_utils import triton_installed

__all__ = [
    "LogprobsTensors",
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "apply_logit_edits",
    "compute_logprobs_tensors",
    "random_probs",
]


@dataclass(slots=True)
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [num_reqs] int64
    logprobs: LogprobsTensors | None  # None when metadata.max_num_logprobs is None


class Sampler(torch.nn.Module):
    """Stateless; `forward` modifies `logits` only by the grammar mask (structured outputs:
    disallowed tokens of constrained rows set to -inf in place, the first thing done)."""

    def forward(
        self,
        logits: torch.Tensor,  # [num_reqs, vocab_size] float32, raw model output
        metadata: SamplingMetadata,
    ) -> SamplerOutput:
        if metadata.grammar_mask is not None:  # in place: no copy of the batch's logits
            apply_grammar_mask(logits, metadata.grammar_mask)
        raw_logprobs = None  # [num_reqs, vocab_size]
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        sampled = self.sample(logits, metadata)
        if raw_logprobs is None:
            return SamplerOutput(sampled, None)
        logprobs = gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled, logprobs)

    def sample(
        self,
        logits: torch.Tensor,  # [num_reqs, vocab_size], raw model output; not modified
        metadata: SamplingMetadata,
    ) -> torch.Tensor:  # [num_reqs] int64
        processed = apply_logit_edits(logits, metadata)  # `logits` itself when there are none
        if metadata.all_greedy:
            return greedy_argmax(processed)
        greedy = None if metadata.all_random else greedy_argmax(processed)  # [num_reqs]
        probs = random_probs(processed, metadata, in_place=processed is not logits)
        if metadata.race_keys is not None:
            sampled = seeded_race(probs, metadata.race_keys)
        else:
            sampled = exponential_race(probs, metadata.generators)
        if greedy is None:
            return sampled
        return torch.where(metadata.temperature > 0, sampled, greedy)


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:  # [num_reqs, vocab] -> [num_reqs]
    """`logits.argmax(-1)` (the first maximum). For a few rows on CUDA, one Triton launch
    (`triton_argmax`): PyTorch runs a one-row argmax over a large vocabulary on a single block
    (~27 us on an H100 at 128k entries)."""
    if logits.is_cuda and logits.shape[0] <= 8 and triton_installed():
        return triton_argmax(logits)
    return logits.argmax(dim=-1)


def random_probs(
    processed: torch.Tensor,  # [num_reqs, vocab_size], after apply_logit_edits
    metadata: SamplingMetadata,
    in_place: bool,  # True: `processed` is a scratch copy and may be overwritten
) -> torch.Tensor:  # [num_reqs, vocab_size] float, rows sum to 1
    """The distribution a random row samples from: / temperature, min-p, top-k, top-p, softmax.
    Greedy rows riding along get temperature 1 (their result is meant to be discarded). The
    rejection sampler uses this too, so speculative and plain sampling share one definition."""
    temperature = metadata.temperature.to(processed.dtype)  # [num_reqs]
    if not metadata.all_random:
        temperature = torch.where(temperature > 0, temperature, 1.0)
    if in_place:
        scaled = processed.div_(temperature[:, None])
    else:
        scaled = processed / temperature[:, None]  # the working copy starts here
    _apply_truncation(scaled, metadata)
    return scaled.softmax(dim=-1)


def apply_logit_edits(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Bias, bans and penalties on a float32 copy; returns `logits` itself when none is in use."""
    uses_penalties = (
        metadata.presence_penalties is not None
        or metadata.frequency_penalties is not None
        or metadata.repetition_penalties is not None
    )
    if metadata.logit_bias is None and metadata.banned_tokens is None and not uses_penalties:
        return logits
    processed = logits.to(torch.float32, copy=True)  # [num_reqs, vocab_size]
    if metadata.logit_bias is not None:
        apply_logit_bias(processed, metadata.logit_bias)
    if metadata.banned_tokens is not None:
        apply_banned_tokens(processed, metadata.banned_tokens)
    if uses_penalties:
        apply_penalties(processed, metadata)
    return processed


def _apply_truncation(
    logits: torch.Tensor,  # [num_reqs, vocab_size], temperature-scaled; edited in place
    metadata: SamplingMetadata,
) -> None:
    if metadata.min_p is not None:
        apply_min_p(logits, metadata.min_p)
    if metadata.top_k is not None or metadata.top_p is not None:
        apply_top_k_top_p(logits, metadata.top_k, metadata.top_p)


def exponential_race(
    probs: torch.Tensor,  # [num_reqs, vocab_size], rows sum to 1 (or any proportions); overwritten
    generators: dict[int, torch.Generator],  # row -> the request's seeded generator
    noise: torch.Tensor | None = None,  # [num_reqs, vocab_size] Exp(1) already drawn; overwritten
) -> torch.Tensor:  # [num_reqs] int64
    """argmax(p / E), E ~ Exp(1) i.i.d.: token i wins with probability p_i, without a cumsum.

    Seeded rows draw their whole row of noise from their own generator, so their draw depends
    only on their generator's state, not on the batch. The loop is over seeded rows, not tokens
    (one small kernel launch each), and each generator must live on the logits' device.
    NOTE: torch's CPU exponential_ can return 0 with probability ~2**-53 (pytorch#22557); 0/0
    would then be NaN, which argmax picks. CUDA's never returns 0. We accept that odds on CPU.
    """
    if noise is None:
        noise = torch.empty_like(probs)  # [num_reqs, vocab_size]
        if len(generators) < probs.shape[0]:
            noise.exponential_()
        for row, generator in generators.items():
            noise[row].exponential_(generator=generator)
    return probs.div_(noise).argmax(dim=-1)
