"""Penalties, logit bias and bans as exact logit edits."""

from __future__ import annotations

import pytest
import torch

from lmserve.sample.penalties import (
    apply_banned_tokens,
    apply_logit_bias,
    apply_penalties,
    token_counts,
)
from tests.sample import make_metadata


def test_token_counts_drop_padding():
    ids = torch.tensor([[1, 1, 3, 5], [2, 5, 5, 5]])  # 5 = vocab_size = padding
    counts = token_counts(ids, vocab_size=5)
    assert counts.tolist() == [[0, 2, 0, 1, 0], [0, 0, 1, 0, 0]]


def test_repetition_penalty_matches_hf():
    transformers = pytest.importorskip("transformers")
    vocab, penalty = 50, 1.7
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, vocab, generator=generator) * 3
    logits[0, 4] = 0.0  # the rule's boundary: 0 stays 0 either way
    prompts = [[4, 7, 7, 9], [1, 2], [30, 31, 32, 33, 34]]
    outputs = [[11, 4], [2, 2, 2, 40], []]
    rows = [{"repetition": penalty, "prompt": p, "output": o} for p, o in zip(prompts, outputs)]
    ours = logits.clone()
    apply_penalties(ours, make_metadata(vocab, rows))

    hf = transformers.RepetitionPenaltyLogitsProcessor(penalty=penalty)
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        input_ids = torch.tensor([prompt + output])
        expected = hf(input_ids, logits[i : i + 1].clone())[0]
        torch.testing.assert_close(ours[i], expected, rtol=0, atol=0)


def test_repetition_penalty_per_row_values_and_off_rows():
    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    rows = [
        {"repetition": 2.0, "prompt": [0], "output": [1]},
        {"repetition": 4.0, "prompt": [0, 1]},
        {"repetition": 1.0, "prompt": [0, 1, 2]},  # 1 = off
    ]
    apply_penalties(logits, make_metadata(3, rows))
    assert logits.tolist() == [[1.0, -4.0, 1.0], [0.5, -8.0, 1.0], [2.0, -2.0, 1.0]]


def test_frequency_and_presence_penalties_exact_values():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    rows = [
        # token 0 three times, token 2 once; token 3 only in the prompt (not penalised)
        {"frequency": 0.5, "presence": 0.25, "prompt": [3], "output": [0, 2, 0, 0]},
        {"frequency": -1.0, "output": [1, 1]},  # negative frequency encourages repeats
    ]
    apply_penalties(logits, make_metadata(4, rows))
    assert logits.tolist() == [
        [1.0 - 1.5 - 0.25, 1.0, 1.0 - 0.5 - 0.25, 1.0],
        [0.0, 2.0, 0.0, 0.0],
    ]


def test_logit_bias_and_bans_at_coordinates():
    logits = torch.zeros(2, 5)
    metadata = make_metadata(
        5, [{"logit_bias": {1: 2.5, 4: -1.0}, "banned": [0]}, {"banned": [3, 4]}]
    )
    apply_logit_bias(logits, metadata.logit_bias)
    apply_banned_tokens(logits, metadata.banned_tokens)
    inf = float("inf")
    assert logits.tolist() == [[-inf, 2.5, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, -inf, -inf]]
