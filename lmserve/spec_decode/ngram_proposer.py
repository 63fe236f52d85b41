"""N-gram prompt lookup: draft tokens copied from a request's own history, no model at all.

Find the longest suffix n-gram of the request's tokens (prompt_lookup_min <= n <=
prompt_lookup_max) that occurred earlier in them, and propose the tokens that followed its
earliest occurrence (vLLM's rule). It pays off when the output echoes the input: repeating or
editing a given text, code refactors, quoting a document.

    tokens:    a b c d e  a b c  ->  suffix "a b c" (n = 3) occurred at 0..2  ->  drafts "d e ..."

One pass for the whole batch, never a Python loop over requests or tokens: one vectorised
comparison of every known token with its request's last token finds the candidate ends, and the
few candidates that survive are extended one token back at a time (at most prompt_lookup_max
times). Cost per step: O(batch tokens) for the first comparison, O(candidates) after it.
"""

from __future__ import annotations

import numpy as np


class NgramProposer:
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        assert 1 <= prompt_lookup_min <= prompt_lookup_max
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(
        self,
        token_ids: np.ndarray,  # [num_tokens] one request's known tokens (prompt + output)
        num_drafts: int,  # at most this many drafts
    ) -> np.ndarray:  # [<= num_drafts] int64; empty when no n-gram matches
        lengths = np.array([len(token_ids)])
        return self.propose_batch(token_ids[None, :], lengths, np.array([num_drafts]))[0]

    def propose_batch(
        self,
        token_ids: np.ndarray,  # [num_reqs, width] known tokens, left-aligned (rest ignored)
        num_tokens: np.ndarray,  # [num_reqs] known tokens per request (<= width)
        num_drafts: np.ndarray,  # [num_reqs] at most this many drafts per request
    ) -> list[np.ndarray]:  # per request: [<= num_drafts] int64, empty when nothing matches
        num_reqs = len(num_tokens)
        drafts = [np.empty(0, dtype=np.int64)] * num_reqs
        if not num_reqs or int(num_tokens.max()) <= self.min_n:
            return drafts
        width = int(num_tokens.max())
        tokens = token_ids[:, :width]  # [num_reqs, width]
        req, end, match_len = self._candidates(tokens, num_tokens.astype(np.int64))
        if not len(req):
            return drafts
        # Per request: the longest match (capped at max_n), then its earliest end.
        longest = np.zeros(num_reqs, dtype=np.int64)
        np.maximum.at(longest, req, match_len)
        best = match_len == longest[req]  # candidates are sorted by (request, end)
        best_reqs, first = np.unique(req[best], return_index=True)
        best_ends = end[best][first]
        for r, e in zip(best_reqs.tolist(), best_ends.tolist()):
            if longest[r] >= self.min_n and num_drafts[r] > 0:
                stop = min(e + 1 + int(num_drafts[r]), int(num_tokens[r]))
                drafts[r] = tokens[r, e + 1 : stop].astype(np.int64)
        return drafts

    def _candidates(
        self,
        tokens: np.ndarray,  # [num_reqs, width]
        num_tokens: np.ndarray,  # [num_reqs] int64
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # [num_candidates] each
        """(request, end position, match length) of every earlier position whose token equals
        its request's last token, with how many tokens back (<= max_n) the match runs."""
        last = num_tokens - 1  # [num_reqs] position of each request's last token
        rows = np.arange(len(num_tokens))
        earlier = np.arange(tokens.shape[1])[None, :] < last[:, None]  # [num_reqs, width]
        hits = (tokens == tokens[rows, last][:, None]) & earlier
        req, end = np.nonzero(hits)  # row-major: sorted by request, then end
        match_len = np.ones(len(req), dtype=np.int64)
        alive = np.arange(len(req))  # candidates still matching after m tokens
        for m in range(1, self.max_n):
            alive = alive[end[alive] >= m]  # a match cannot run past the first token
            r = req[alive]
            alive = alive[tokens[r, end[alive] - m] == tokens[r, last[r] - m]]
            if not len(alive):
                break
            match_len[alive] += 1
        return req, end, match_len
