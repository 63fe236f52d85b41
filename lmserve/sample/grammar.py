"""Structured outputs on the sampler's path: the step's grammar bitmask applied to the logits.

The EngineCore's matchers decide which tokens each constrained row may take
(lmserve/core/structured_output.py); here, on the device, every other token of those rows gets
-inf before anything else reads the logits (bias, penalties, greedy argmax, temperature,
truncation, logprobs, the rejection sampler's acceptance test). The mask is applied in place:
on CUDA by xgrammar's Triton kernel (one launch, only the constrained rows, nothing copied),
elsewhere by vectorised torch code. Rows of unconstrained requests are untouched, and a batch
without constrained rows never comes here.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import numpy as np
import torch

from lmserve.worker.device_inputs import host_to_device


@dataclass(slots=True)
class GrammarMask:
    """The masks of one step, on the device, as the sampler needs them."""

    rows: torch.Tensor  # [num_masked] int64, logits rows that are constrained (unique)
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
    logits: torch.Tensor,  # [num_rows, vocab_size]; modified in place
    mask: GrammarMask,
) -> torch.Tensor:  # `logits` itself
    """Disallowed tokens of the constrained rows get -inf, in place."""
    if use_triton_kernel(logits, mask):
        apply_grammar_mask_triton(logits, mask)
    else:
        apply_grammar_mask_torch(logits, mask)
    return logits


def use_triton_kernel(logits: torch.Tensor, mask: GrammarMask) -> bool:
    return logits.is_cuda and logits.dim() == 2 and logits.stride(-1) == 1 and _triton_installed()


def apply_grammar_mask_torch(logits: torch.Tensor, mask: GrammarMask) -> None:
    """Any device: unpack the constrained rows' bits, then one masked write of those rows."""
    allowed = unpack_bitmask(mask.bitmask, logits.shape[-1])  # [num_masked, vocab_size]
    logits[mask.rows] = logits[mask.rows].masked_fill(~allowed, float("-inf"))


def apply_grammar_mask_triton(logits: torch.Tensor, mask: GrammarMask) -> None:
    """CUDA: xgrammar's Triton kernel, which reads bitmask row i for logits row i, so the
    constrained rows are scattered into a [num_rows, words of the logits] mask first (a few
    KiB per row on the device; words past the mask's stay 0: never allowed) and only those
    rows are visited."""
    import xgrammar as xgr

    num_words = -(-logits.shape[1] // 32)
    full = torch.zeros(
        (logits.shape[0], num_words), dtype=torch.int32, device=logits.device
    )  # [num_rows, num_words]; rows not in mask.rows are never read
    full[mask.rows, : mask.bitmask.shape[1]] = mask.bitmask
    xgr.apply_token_bitmask_inplace(logits, full, indices=mask.rows, backend="triton")


@functools.cache
def _triton_installed() -> bool:
    return (
        importlib.util.find_spec("triton") is not None
        and importlib.util.find_spec("xgrammar") is not None
    )


def build_grammar_mask(
    structured_output,  # core.sched_output.StructuredOutputBatch
    req_ids: list[str],  # [num_rows'] request of each sampling request, in logits order
    logits_row_start: np.ndarray | None,  # [len(req_ids)] first logits row of each; None: i
    device: torch.device,
) -> GrammarMask | None:
    """Match the step's mask rows to logits rows. A request has len(its rows) consecutive
    logits rows (1 + its drafts) from `logits_row_start[i]`; None when none is constrained."""
    host = _host_bitmask(structured_output)  # [num_mask_rows, num_words]
    logits_rows, mask_rows = _matching_rows(
        structured_output.req_row_start, len(host), req_ids, logits_row_start
    )
    if not logits_rows:
        return None
    if not host.flags.writeable:  # a view of a received frame: torch wants its own
        host = host.copy()
    # Every mask row goes over as is; any reordering (the scheduler's order is not the
    # batch's) is a gather on the device, not a copy of the rows on the host.
    # Through pinned memory: a pageable copy could wait for the forward still running.
    bitmask = host_to_device(host, device)  # [num_mask_rows, num_words]
    index = host_to_device(np.array([logits_rows, mask_rows], dtype=np.int64), device)  # [2, n]
    if mask_rows != list(range(len(host))):
        bitmask = bitmask.index_select(0, index[1])  # [n, num_words]
    return GrammarMask(rows=index[0], bitmask=bitmask)


def _matching_rows(
    req_row_start: dict[str, int],  # req_id -> its first mask row
    num_mask_rows: int,
    req_ids: list[str],
    logits_row_start: np.ndarray | None,
) -> tuple[list[int], list[int]]:
    """(logits rows, mask rows), pairwise, of the constrained requests among `req_ids`; a
    request's rows run up to the next request's first mask row."""
    starts = sorted(req_row_start.values())
    row_end = dict(zip(starts, starts[1:] + [num_mask_rows]))
    logits_rows: list[int] = []
    mask_rows: list[int] = []
    for i, req_id in enumerate(req_ids):
        start = req_row_start.get(req_id)
        if start is None:
            continue
        first = i if logits_row_start is None else int(logits_row_start[i])
        count = row_end[start] - start
        logits_rows.extend(range(first, first + count))
        mask_rows.extend(range(start, start + count))
    return logits_rows, mask_rows


def _host_bitmask(structured_output) -> np.ndarray:  # [num_mask_rows, num_words] int32
    bitmask = structured_output.bitmask
    if isinstance(bitmask, (bytes, bytearray, memoryview)):
        bitmask = np.frombuffer(bitmask, dtype=np.int32)
    return np.asarray(bitmask, dtype=np.int32).reshape(-1, structured_output.num_words)
