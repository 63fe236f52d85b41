"""Rejection sampling for speculative decoding: verify every request's draft tokens against the
target model in one batched pass, so the tokens emitted follow exactly the distribution plain
sampling from the target would give (Leviathan et al. 2023; Chen et al. 2023).

For request i with drafts d_1..d_k (k may be 0) and target rows p_0..p_k (p_j: the target's
processed distribution after d_1..d_j, built with the same penalties, temperature and top-k/p/
min-p as the plain sampler, see `random_probs`):

    greedy rows  accept d_j while d_j == argmax p_{j-1}; then emit argmax p_a at the first
                 mismatch a (the "recovered" token), or argmax p_k when all k were accepted (bonus).
    random rows  accept d_j with probability min(1, p_{j-1}(d_j) / q_{j-1}(d_j)); at the first
                 rejection emit a sample of norm(max(p - q, 0)) from that row; when all k are
                 accepted emit a sample of p_k (bonus). q is the draft's distribution; None means
                 a point mass on d_j (n-gram lookup, or a draft model proposing greedily), so the
                 test is u < p(d_j) and the residual is p with d_j removed.

So each request emits 1..k+1 tokens. All of it is tensor work on the device: the per-position
acceptance tests, the first-rejection index (a cumulative product), and one exponential race per
request (only its first rejected row, or its bonus row, is ever sampled). Randomness per request:
k uniforms and one row of Exp(1) noise, drawn from its own generator when it is seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve.sample.grammar import apply_grammar_mask
from lmserve.sample.logprobs import LogprobsTensors, gather_logprobs
from lmserve.sample.metadata import SamplingMetadata
from lmserve.sample.sampler import apply_logit_edits, exponential_race, random_probs
from lmserve.spec_decode.metadata import PLACEHOLDER_TOKEN_ID, SpecDecodeMetadata


@dataclass(slots=True)
class RejectionSamplerOutput:
    output_token_ids: torch.Tensor  # [num_reqs, max_k + 1] int64, padded with PLACEHOLDER
    num_output_tokens: torch.Tensor  # [num_reqs] int64, accepted drafts + 1
    # Logprobs of the emitted token at every target row (rows past a request's last emitted
    # token hold junk); None when nobody asked.
    logprobs: LogprobsTensors | None


class RejectionSampler(torch.nn.Module):
    """Stateless; `forward` modifies `target_logits` only by the grammar mask (in place)."""

    def forward(
        self,
        spec: SpecDecodeMetadata,
        target_logits: torch.Tensor,  # [num_rows, vocab_size] raw model output
        sampling: SamplingMetadata,  # one row per target row (all_greedy etc. over the rows)
        generators: dict[int, torch.Generator] | None = None,  # request index -> its generator
        draft_probs: torch.Tensor | None = None,  # [num_rows, vocab]; None = point masses
    ) -> RejectionSamplerOutput:
        if sampling.grammar_mask is not None:  # structured outputs: rows after each draft
            apply_grammar_mask(target_logits, sampling.grammar_mask)
        processed = apply_logit_edits(target_logits, sampling)  # [num_rows, vocab]
        if sampling.all_greedy:
            return _greedy(spec, target_logits, processed, sampling.max_num_logprobs)
        argmax = processed.argmax(dim=-1)  # [num_rows]
        probs = None  # [num_rows, vocab]
        if not sampling.all_greedy:
            probs = random_probs(processed, sampling, in_place=processed is not target_logits)
        is_random = sampling.temperature[spec.target_rows[:, 0]] > 0  # [num_reqs] bool
        uniforms, noise = _draw(spec, probs, generators or {})
        num_accepted = _num_accepted(spec, argmax, probs, draft_probs, is_random, uniforms)
        candidate_rows = spec.target_rows.gather(1, num_accepted[:, None])[:, 0]  # [num_reqs]
        candidates = argmax[candidate_rows]  # [num_reqs]
        if probs is not None:
            residual = _residual(spec, probs, draft_probs, num_accepted, candidate_rows)
            sampled = exponential_race(residual, {}, noise)  # [num_reqs]
            candidates = torch.where(is_random, sampled, candidates)
        output = _assemble(spec.draft_token_ids, num_accepted, candidates)
        logprobs = None
        if sampling.max_num_logprobs is not None:
            logprobs = _logprobs(spec, target_logits, output, sampling.max_num_logprobs)
        return RejectionSamplerOutput(output, num_accepted + 1, logprobs)


def _greedy(
    spec: SpecDecodeMetadata,
    target_logits: torch.Tensor,  # [num_rows, vocab_size] raw
    processed: torch.Tensor,  # [num_rows, vocab_size] after bias, bans and penalties
    num_logprobs: int | None,
) -> RejectionSamplerOutput:
    """Every row greedy: an accepted draft equals the target's argmax at its row, so a request
    emits exactly the argmax at its first 1 + accepted target rows. One gather of the argmax by
    target row gives both the acceptance test and the output (a third of the general path's
    kernel launches, which a host-bound verify step pays for)."""
    picks = processed.argmax(dim=-1)[spec.target_rows]  # [num_reqs, max_k + 1]
    max_k = spec.draft_token_ids.shape[1]
    # A padding draft (-1) never equals an argmax: each run stops at its request's drafts.
    matched = (picks[:, :max_k] == spec.draft_token_ids).to(torch.int64)  # [num_reqs, max_k]
    num_accepted = matched.cumprod(dim=1).sum(dim=1)  # [num_reqs]
    cols = torch.arange(max_k + 1, device=picks.device)[None, :]
    output = torch.where(cols <= num_accepted[:, None], picks, PLACEHOLDER_TOKEN_ID)
    logprobs = None
    if num_logprobs is not None:
        logprobs = _logprobs(spec, target_logits, output, num_logprobs)
    return RejectionSamplerOutput(output, num_accepted + 1, logprobs)


def _draw(
    spec: SpecDecodeMetadata,
    probs: torch.Tensor | None,
    generators: dict[int, torch.Generator],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(uniforms [num_reqs, max_k], Exp(1) noise [num_reqs, vocab]), or (None, None) when all
    rows are greedy. A seeded request draws both from its own generator (loop over seeded
    requests, not tokens)."""
    if probs is None:
        return None, None
    num_reqs, max_k = spec.draft_token_ids.shape
    uniforms = torch.empty(num_reqs, max_k, device=probs.device, dtype=torch.float32)
    noise = torch.empty(num_reqs, probs.shape[1], device=probs.device, dtype=probs.dtype)
    if len(generators) < num_reqs:
        uniforms.uniform_()
        noise.exponential_()
    for i, generator in generators.items():
        uniforms[i].uniform_(generator=generator)
        noise[i].exponential_(generator=generator)
    return uniforms, noise


def _num_accepted(
    spec: SpecDecodeMetadata,
    argmax: torch.Tensor,  # [num_rows]
    probs: torch.Tensor | None,  # [num_rows, vocab]
    draft_probs: torch.Tensor | None,  # [num_rows, vocab]
    is_random: torch.Tensor,  # [num_reqs] bool
    uniforms: torch.Tensor | None,  # [num_reqs, max_k]
) -> torch.Tensor:  # [num_reqs] int64: leading drafts accepted
    drafts = spec.draft_token_ids  # [num_reqs, max_k]
    max_k = drafts.shape[1]
    if max_k == 0:
        return torch.zeros(drafts.shape[0], dtype=torch.int64, device=drafts.device)
    rows = spec.target_rows[:, :max_k]  # [num_reqs, max_k]: row verifying draft j+1
    valid = drafts != PLACEHOLDER_TOKEN_ID
    safe_drafts = drafts.clamp(min=0)
    accepted = argmax[rows] == drafts  # greedy test
    if probs is not None:
        p = probs[rows, safe_drafts]  # [num_reqs, max_k]: p_j(d_{j+1})
        q = 1.0 if draft_probs is None else draft_probs[rows, safe_drafts]
        random_accepted = uniforms * q < p  # u < p / q, without a division by q
        accepted = torch.where(is_random[:, None], random_accepted, accepted)
    accepted &= valid
    return accepted.to(torch.int64).cumprod(dim=1).sum(dim=1)


def _residual(
    spec: SpecDecodeMetadata,
    probs: torch.Tensor,  # [num_rows, vocab]
    draft_probs: torch.Tensor | None,  # [num_rows, vocab]
    num_accepted: torch.Tensor,  # [num_reqs]
    candidate_rows: torch.Tensor,  # [num_reqs]
) -> torch.Tensor:  # [num_reqs, vocab]: what each request's final token is drawn from
    """norm(max(p - q, 0)) at the first rejected row, p itself at the bonus row (q = 0 there).
    Not normalised: the exponential race only needs proportions."""
    rejected = num_accepted < spec.num_draft_tokens_dev  # [num_reqs] bool
    p = probs[candidate_rows]  # [num_reqs, vocab]
    if draft_probs is None:  # point mass: remove the rejected draft token
        max_k = spec.draft_token_ids.shape[1]
        index = num_accepted.clamp(max=max(max_k - 1, 0))[:, None]
        rejected_draft = spec.draft_token_ids.gather(1, index).clamp(min=0) if max_k else None
        if rejected_draft is not None:
            keep = torch.where(rejected[:, None], 0.0, p.gather(1, rejected_draft))
            residual = p.scatter(1, rejected_draft, keep)
        else:
            residual = p
    else:
        q = torch.where(rejected[:, None], draft_probs[candidate_rows], 0.0)
        residual = (p - q).clamp_(min=0.0)
    # A rejection where p <= q everywhere has probability 0; guard the race against 0/0 anyway.
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    return torch.where(empty, p, residual)


def _assemble(
    drafts: torch.Tensor,  # [num_reqs, max_k]
    num_accepted: torch.Tensor,  # [num_reqs]
    candidates: torch.Tensor,  # [num_reqs]
) -> torch.Tensor:  # [num_reqs, max_k + 1]: accepted drafts, then the candidate, then padding
    num_reqs, max_k = drafts.shape
    cols = torch.arange(max_k + 1, device=drafts.device)[None, :]  # [1, max_k + 1]
    padded = torch.cat([drafts, drafts.new_full((num_reqs, 1), PLACEHOLDER_TOKEN_ID)], dim=1)
    output = torch.where(cols < num_accepted[:, None], padded, PLACEHOLDER_TOKEN_ID)
    return output.scatter_(1, num_accepted[:, None], candidates[:, None])


def _logprobs(
    spec: SpecDecodeMetadata,
    target_logits: torch.Tensor,  # [num_rows, vocab]
    output: torch.Tensor,  # [num_reqs, max_k + 1]
    num_logprobs: int,
) -> LogprobsTensors:
    """Raw-model logprobs of the token emitted at each target row (see logprobs.py)."""
    raw = torch.log_softmax(target_logits, dim=-1, dtype=torch.float32)  # [num_rows, vocab]
    cols = torch.arange(output.shape[1], device=output.device)[None, :]
    in_request = cols <= spec.num_draft_tokens_dev[:, None]  # [num_reqs, max_k + 1]
    row_tokens = torch.zeros(raw.shape[0], dtype=torch.int64, device=raw.device)  # [num_rows]
    row_tokens[spec.target_rows[in_request]] = output[in_request].clamp(min=0)
    return gather_logprobs(raw, row_tokens, num_logprobs)
