"""Structured outputs on the sampler's path: the step's grammar bitmask applied to the logits.

The EngineCore's matchers decide which tokens each constrained row may take
(lmserve/core/structured_output.py); here, on the device, every other token of those rows gets
-inf before anything else reads the logits (bias, penalties, greedy argmax, temperature,
truncation, logprobs, the rejection sampler's acceptance test). Rows of unconstrained requests
are untouched, and a batch without constrained rows never comes here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(slots=True)
class GrammarMask:
    """The masks of one step, on the device, as the sampler needs them."""

    rows: torch.Tensor  # [num_masked] int64, logits rows that are constrained
    bitmask: torch.Tensor  # [num_masked, num_words] int32, bit t % 32 of word t // 32 = allowed


def unpack_bitmask(
    bitmask: torch.Tensor,  # [n, num_words] int32
    vocab_size: int,
) -> torch.Tensor:  # [n, vocab_size] bool, True = allowed
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)  # [32]
    bits = (bitmask[:, :, None] >> shifts) & 1  # [n, num_words, 32]
    allowed = bits.flatten(1).bool()  # [n, num_words * 32]
    if allowed.shape[1] < vocab_size:  # tokens beyond the mask are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]))
    return allowed[:, :vocab_size]


def apply_grammar_mask(
    logits: torch.Tensor,  # [num_rows, vocab_size]
    mask: GrammarMask,
) -> torch.Tensor:  # [num_rows, vocab_size], a copy: `logits` is not modified
    """Disallowed tokens of the constrained rows get -inf."""
    allowed = unpack_bitmask(mask.bitmask, logits.shape[-1])  # [num_masked, vocab_size]
    masked = logits.clone()
    masked[mask.rows] = masked[mask.rows].masked_fill(~allowed, float("-inf"))
    return masked


def build_grammar_mask(
    structured_output,  # core.sched_output.StructuredOutputBatch
    req_ids: list[str],  # [num_rows'] request of each sampling request, in logits order
    logits_row_start: np.ndarray | None,  # [len(req_ids)] first logits row of each; None: i
    device: torch.device,
) -> GrammarMask | None:
    """Match the step's mask rows to logits rows. A request has len(its rows) consecutive
    logits rows (1 + its drafts) from `logits_row_start[i]`; None when none is constrained."""
    host = np.frombuffer(structured_output.bitmask, dtype=np.int32)
    host = host.reshape(-1, structured_output.num_words)  # [num_mask_rows, num_words]
    starts = structured_output.req_row_start
    ends = sorted(starts.values())[1:] + [len(host)]
    row_end = dict(zip(sorted(starts.values()), ends))
    logits_rows, mask_rows = [], []
    for i, req_id in enumerate(req_ids):
        start = starts.get(req_id)
        if start is None:
            continue
        first = i if logits_row_start is None else int(logits_row_start[i])
        count = row_end[start] - start
        logits_rows.extend(range(first, first + count))
        mask_rows.extend(range(start, start + count))
    if not logits_rows:
        return None
    bitmask = torch.from_numpy(host[mask_rows]).to(device, non_blocking=True)
    rows = torch.tensor(logits_rows, dtype=torch.int64).to(device, non_blocking=True)
    return GrammarMask(rows=rows, bitmask=bitmask)
