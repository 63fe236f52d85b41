"""Truncation of temperature-scaled logits for random rows: min-p, top-k, top-p.

Each function masks the dropped tokens to -inf in place, batched, with per-row values as
tensors; a row whose value means "off" (min_p 0, top_k vocab_size, top_p 1) is left as is. The
top token always survives, so greedy rows that ride along in the batch keep their argmax.

Every cut-off is applied as a per-row threshold on logit values (`logits < threshold` is
dropped), so tokens tied with the last kept token are all kept: a row may keep more than k
tokens, or slightly more mass than top_p, when logits tie exactly at the boundary.

Cost, per [num_reqs, vocab_size] pass:
  min-p        max-reduce + masked fill; done in logit space (p_i < min_p * p_max  <=>
               logit_i < logit_max + log(min_p)), so it needs no softmax.
  top-k alone  `torch.topk` with the batch's largest k, much cheaper than a full sort for the
               usual small k; it needs that k on the host, so it costs ONE device sync.
  top-p        one sort (values only are used) + softmax + cumsum on the sorted rows, no sync.
               Top-k in the same batch reuses the sort, so top-k + top-p costs one sort.
               Rows go TOP_P_ROWS at a time: a sort of [num_reqs, vocab_size] floats holds
               its values, int64 indices and scratch, several times the logits' size (with
               1,024 rows of a 128k vocabulary, gigabytes the KV cache would not get).
"""

from __future__ import annotations

import torch

TOP_P_ROWS = 256  # rows per sort (see the module docstring)


def apply_min_p(
    logits: torch.Tensor,  # [num_reqs, vocab_size] float32, temperature-scaled; edited in place
    min_p: torch.Tensor,  # [num_reqs] float32; 0 = off
) -> None:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    max_logits = logits.amax(dim=-1, keepdim=True)  # [num_reqs, 1]
    # log(0) = -inf, so rows with min_p 0 get threshold -inf and keep everything.
    threshold = max_logits + torch.log(min_p.to(logits.dtype))[:, None]  # [num_reqs, 1]
    logits.masked_fill_(logits < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor,  # [num_reqs, vocab_size] float32, temperature-scaled; edited in place
    top_k: torch.Tensor | None,  # [num_reqs] int64; vocab_size (or <= 0) = off
    top_p: torch.Tensor | None,  # [num_reqs] float32; 1.0 = off
) -> None:
    """Keep the k most likely tokens, then the smallest set whose renormalised mass >= top_p."""
    if top_p is None:
        if top_k is not None:
            _apply_top_k_only(logits, top_k)
        return
    for start in range(0, logits.shape[0], TOP_P_ROWS):
        rows = slice(start, start + TOP_P_ROWS)  # a view: edits land in `logits`
        _apply_top_k_top_p_sorted(logits[rows], None if top_k is None else top_k[rows], top_p[rows])


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor) -> None:
    vocab_size = logits.shape[-1]
    top_k_off = (top_k >= vocab_size) | (top_k <= 0)  # [num_reqs] bool
    # Rows that are off count as k = 1 so they don't push the topk width up to a full sort.
    k = top_k.masked_fill(top_k_off, 1)  # [num_reqs] int64
    max_k = int(k.max())  # NOTE: the one host sync of the sampler; see the module docstring.
    top_values = logits.topk(max_k, dim=-1).values  # [num_reqs, max_k], descending
    threshold = top_values.gather(1, (k - 1)[:, None])  # [num_reqs, 1]: the k-th largest logit
    threshold.masked_fill_(top_k_off[:, None], float("-inf"))
    logits.masked_fill_(logits < threshold, float("-inf"))


def _apply_top_k_top_p_sorted(
    logits: torch.Tensor,  # [num_reqs, vocab_size], edited in place
    top_k: torch.Tensor | None,  # [num_reqs] int64 or None
    top_p: torch.Tensor,  # [num_reqs] float32
) -> None:
    vocab_size = logits.shape[-1]
    sorted_logits = logits.sort(dim=-1).values  # [num_reqs, vocab_size], ascending
    kept = sorted_logits
    if top_k is not None:
        # k <= 0 is treated as off too, like vocab_size.
        k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)  # [num_reqs]
        kth_largest = sorted_logits.gather(1, (vocab_size - k)[:, None])  # [num_reqs, 1]
        kept = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    # Ascending cumulative mass: the prefix whose mass is <= 1 - top_p can go, and what remains
    # is the smallest top set with mass >= top_p. Summing small values first also keeps float32
    # error low. Top-k's -inf tokens have probability 0, so they fall in that prefix too.
    cumulative = kept.softmax(dim=-1).cumsum_(dim=-1)  # [num_reqs, vocab_size]
    dropped = cumulative <= (1.0 - top_p.to(cumulative.dtype))[:, None]  # a prefix of each row
    dropped[:, -1] = False  # the top token always stays
    num_dropped = dropped.sum(dim=-1, keepdim=True)  # [num_reqs, 1]
    threshold = sorted_logits.gather(1, num_dropped)  # [num_reqs, 1]: the smallest kept logit
    logits.masked_fill_(logits < threshold, float("-inf"))
