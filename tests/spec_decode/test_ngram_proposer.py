"""N-gram prompt lookup: the longest suffix n-gram within [min, max], its earliest occurrence,
the tokens after it, capped at the number of drafts wanted."""

from __future__ import annotations

import numpy as np
import pytest

from lmserve.spec_decode.ngram_proposer import NgramProposer


def propose(tokens: list[int], lo: int, hi: int, k: int) -> list[int]:
    return NgramProposer(lo, hi).propose(np.array(tokens, dtype=np.int32), k).tolist()


def test_proposes_what_followed_the_suffix():
    assert propose([1, 2, 3, 4, 1, 2, 3], 2, 2, 2) == [4, 1]


def test_longest_match_wins_over_a_shorter_one():
    # suffix "5 6 7": n=3 matches at the end of 5 6 7 (-> 8); n=1 "7" also matches 7 9
    assert propose([7, 9, 5, 6, 7, 8, 0, 5, 6, 7], 1, 3, 2) == [8, 0]


def test_earliest_occurrence_of_the_longest_match():
    assert propose([1, 2, 10, 1, 2, 20, 1, 2], 2, 2, 1) == [10]


def test_no_match_below_prompt_lookup_min_proposes_nothing():
    assert propose([1, 2, 3, 4, 1, 2, 3, 5, 6], 2, 2, 2) == []
    assert propose([1, 2, 3, 9, 3], 2, 3, 2) == []  # only a 1-gram matches
    assert propose([1, 2, 3, 9, 3], 1, 3, 2) == [9, 3]


def test_drafts_are_capped_and_may_run_into_the_suffix():
    assert propose([4, 4, 4, 4], 1, 2, 8) == [4, 4]  # matches end at 1: two tokens follow
    assert propose([1, 2, 3, 1, 2, 3, 1], 1, 1, 10) == [2, 3, 1, 2, 3, 1]
    assert propose([1, 2, 3, 1, 2, 3, 1], 1, 1, 0) == []


@pytest.mark.parametrize("seed", range(20))
def test_matches_a_brute_force_search(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 4, size=int(rng.integers(2, 40))).tolist()
    lo, hi, k = 1, int(rng.integers(1, 5)), int(rng.integers(1, 6))
    expected: list[int] = []
    for n in range(min(hi, len(tokens) - 1), lo - 1, -1):
        suffix = tokens[-n:]
        starts = [i for i in range(len(tokens) - n) if tokens[i : i + n] == suffix]
        if starts:
            expected = tokens[starts[0] + n : starts[0] + n + k]
            break
    assert propose(tokens, lo, hi, k) == expected


def test_a_batch_proposes_what_each_request_proposes_alone():
    """One pass over a batch of requests of different lengths (stale tokens past each length,
    as in the persistent batch) gives every request its own proposal."""
    rng = np.random.default_rng(7)
    proposer = NgramProposer(1, 4)
    lengths = rng.integers(1, 60, size=32)
    tokens = rng.integers(0, 5, size=(32, 64)).astype(np.int32)  # junk past each length
    num_drafts = rng.integers(0, 6, size=32)
    batch = proposer.propose_batch(tokens, lengths, num_drafts)
    for r in range(32):
        alone = proposer.propose(tokens[r, : lengths[r]].copy(), int(num_drafts[r]))
        assert batch[r].tolist() == alone.tolist()
    assert any(len(d) for d in batch) and not all(len(d) for d in batch)
