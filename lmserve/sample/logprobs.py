"""Logprobs of the RAW model distribution: `log_softmax(logits)` before any sampling parameter.

Like vLLM V1, the logprobs a request gets back describe what the model predicted, not what the
sampler drew from: logit_bias, banned tokens, penalties, temperature and top-k/top-p/min-p do not
change them. So a token may be sampled whose logprob is low, and a token top-k excluded may still
appear in the top-N list.

Layout (one row per request or per prompt position):

    token_ids [n, N + 1]  column 0 = the sampled (or given) token, columns 1..N = the N most likely
    logprobs  [n, N + 1]  the matching logprobs
    ranks     [n]         rank of the column-0 token: 1 + number of tokens with a strictly greater
                          logprob, so tied tokens share the best rank (a tie for first is rank 1)

Among tokens tied at the top-N boundary, which ids appear is up to `torch.topk`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Prompt logprobs may cover thousands of positions; a full [n, vocab] float32 log_softmax for all
# of them at once could take gigabytes, so `compute_logprobs_tensors` works in row chunks of at
# most this many elements (2**26 floats = 256 MiB).
_MAX_CHUNK_ELEMENTS = 1 << 26


@dataclass(slots=True)
class LogprobsTensors:
    token_ids: torch.Tensor  # [n, num_logprobs + 1] int64; column 0 = the sampled/given token
    logprobs: torch.Tensor  # [n, num_logprobs + 1] float32, matching token_ids
    ranks: torch.Tensor  # [n] int64; rank of the column-0 token among all tokens (1 = most likely)

    def __post_init__(self) -> None:
        assert self.token_ids.shape == self.logprobs.shape
        assert self.ranks.shape == self.token_ids.shape[:1]


def gather_logprobs(
    logprobs: torch.Tensor,  # [n, vocab_size] float32, already log_softmax-ed
    token_ids: torch.Tensor,  # [n] int64, the token to report in column 0
    num_logprobs: int,  # N: how many of the most likely tokens to add after column 0
) -> LogprobsTensors:
    """Pick the column-0 token's logprob and rank, and the top-N tokens, from full logprobs."""
    token_ids = token_ids.to(torch.int64)[:, None]  # [n, 1]
    token_logprobs = logprobs.gather(1, token_ids)  # [n, 1]
    ranks = (logprobs > token_logprobs).sum(dim=-1) + 1  # [n]
    num_logprobs = min(num_logprobs, logprobs.shape[-1])
    if num_logprobs <= 0:
        return LogprobsTensors(token_ids, token_logprobs, ranks)
    top_logprobs, top_ids = logprobs.topk(num_logprobs, dim=-1)  # [n, N] each, descending
    return LogprobsTensors(
        token_ids=torch.cat([token_ids, top_ids], dim=1),
        logprobs=torch.cat([token_logprobs, top_logprobs], dim=1),
        ranks=ranks,
    )


def compute_logprobs_tensors(
    logits: torch.Tensor,  # [n, vocab_size] raw model output
    token_ids: torch.Tensor,  # [n] int64: the actual next token at each position
    num_logprobs: int,
) -> LogprobsTensors:
    """Logprobs of given tokens under the raw logits (prompt logprobs); same layout as sampling.

    Works in row chunks so that long prompts do not materialise one huge [n, vocab] tensor.
    """
    num_rows, vocab_size = logits.shape
    rows_per_chunk = max(1, _MAX_CHUNK_ELEMENTS // vocab_size)
    chunks = [
        gather_logprobs(
            torch.log_softmax(logits[start : start + rows_per_chunk], dim=-1, dtype=torch.float32),
            token_ids[start : start + rows_per_chunk],
            num_logprobs,
        )
        for start in range(0, num_rows, rows_per_chunk)
    ]
    if len(chunks) == 1:
        return chunks[0]
    if not chunks:  # n == 0
        return gather_logprobs(logits.float(), token_ids, num_logprobs)
    return LogprobsTensors(
        token_ids=torch.cat([c.token_ids for c in chunks]),
        logprobs=torch.cat([c.logprobs for c in chunks]),
        ranks=torch.cat([c.ranks for c in chunks]),
    )
