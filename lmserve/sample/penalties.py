"""Logit edits that apply to greedy and random rows alike: logit_bias, banned tokens, penalties.

All functions edit `logits` in place (the sampler passes its own float32 copy) and need no host
sync. Token-id tensors are padded with `vocab_size`, an id that never occurs: counting scatters
into a [num_reqs, vocab_size + 1] buffer and drops the last column, so padding costs nothing.
"""

from __future__ import annotations

import torch

from lmserve.sample.metadata import SamplingMetadata


def apply_logit_bias(
    logits: torch.Tensor,  # [num_reqs, vocab_size] float32, edited in place
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # (rows [k], ids [k], bias [k])
) -> None:
    rows, token_ids, bias = logit_bias
    # accumulate=True: a coordinate listed twice gets both biases, as with a dense add.
    logits.index_put_((rows, token_ids), bias.to(logits.dtype), accumulate=True)


def apply_banned_tokens(
    logits: torch.Tensor,  # [num_reqs, vocab_size] float32, edited in place
    banned_tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # (rows, ids, -inf) [k] each
) -> None:
    rows, token_ids, minus_inf = banned_tokens
    # A device tensor of -inf, not a Python float: assigning a host scalar copies it from
    # pageable memory, which waits for the GPU (a full stall of every min_tokens step).
    logits.index_put_((rows, token_ids), minus_inf.to(logits.dtype))


def token_counts(
    token_ids: torch.Tensor,  # [num_reqs, max_len] int64, padded with vocab_size
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [num_reqs, vocab_size] how often each token occurs in the row
    """Per-row bincount as one scatter_add; the padding id lands in a column that is dropped."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=dtype, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=dtype))
    return counts[:, :vocab_size]


def apply_penalties(
    logits: torch.Tensor,  # [num_reqs, vocab_size] float32, edited in place
    metadata: SamplingMetadata,
) -> None:
    """Repetition (prompt + output tokens), then frequency and presence (output tokens only).

    Repetition follows HF's rule: for a seen token, logit < 0 -> logit * p, else logit / p.
    Frequency subtracts f * count_in_output; presence subtracts p once if the token was output.
    """
    vocab_size = logits.shape[-1]
    output_ids = metadata.output_token_ids
    assert output_ids is not None, "penalties need output_token_ids"
    output_counts = token_counts(output_ids, vocab_size, logits.dtype)  # [num_reqs, vocab_size]
    output_seen = output_counts > 0  # [num_reqs, vocab_size] bool

    if metadata.repetition_penalties is not None:
        seen = output_seen
        if metadata.prompt_token_ids is not None:
            seen = seen | (token_counts(metadata.prompt_token_ids, vocab_size, torch.int32) > 0)
        penalty = metadata.repetition_penalties.to(logits.dtype)[:, None]  # [num_reqs, 1]
        penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits.copy_(torch.where(seen, penalized, logits))
    if metadata.frequency_penalties is not None:
        frequency = metadata.frequency_penalties.to(logits.dtype)[:, None]  # [num_reqs, 1]
        logits.addcmul_(output_counts, frequency, value=-1.0)
    if metadata.presence_penalties is not None:
        presence = metadata.presence_penalties.to(logits.dtype)[:, None]  # [num_reqs, 1]
        logits.addcmul_(output_seen.to(logits.dtype), presence, value=-1.0)
