"""N-gram prompt lookup: draft tokens copied from a request's own history, no model at all.

Find the longest suffix n-gram of the request's tokens (prompt_lookup_min <= n <=
prompt_lookup_max) that occurred earlier in them, and propose the tokens that followed its
earliest occurrence (vLLM's rule). It pays off when the output echoes the input: repeating or
editing a given text, code refactors, quoting a document.

    tokens:    a b c d e  a b c  ->  suffix "a b c" (n = 3) occurred at 0..2  ->  drafts "d e ..."

Cost per request: O(len(tokens) * prompt_lookup_max) vectorised numpy comparisons — one pass
per n-gram length, over all positions at once, never a Python loop over tokens.
"""

from __future__ import annotations

import numpy as np

_NO_DRAFTS = np.empty(0, dtype=np.int64)


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
        num_tokens = len(token_ids)
        if num_drafts <= 0 or num_tokens <= self.min_n:
            return _NO_DRAFTS
        match_len = self._suffix_match_lengths(token_ids)  # [num_tokens - 1]
        longest = int(match_len.max())
        if longest < self.min_n:
            return _NO_DRAFTS
        end = int(np.argmax(match_len == longest))  # the earliest occurrence ends here
        return token_ids[end + 1 : end + 1 + num_drafts].astype(np.int64)

    def _suffix_match_lengths(self, token_ids: np.ndarray) -> np.ndarray:
        """match_len[i] = how many of tokens[i], tokens[i-1], ... equal the last tokens
        tokens[-1], tokens[-2], ... (capped at max_n), for every earlier end position i."""
        num_tokens = len(token_ids)
        candidates = token_ids[:-1]  # [num_tokens - 1]: the suffix itself is not a match
        matching = np.ones(num_tokens - 1, dtype=bool)  # still matching after m tokens
        match_len = np.zeros(num_tokens - 1, dtype=np.int32)
        for m in range(min(self.max_n, num_tokens - 1)):  # loop over n-gram lengths only
            equal = np.zeros(num_tokens - 1, dtype=bool)  # [num_tokens - 1]
            equal[m:] = candidates[: num_tokens - 1 - m] == token_ids[num_tokens - 1 - m]
            matching &= equal
            if not matching.any():
                break
            match_len += matching
        return match_len
