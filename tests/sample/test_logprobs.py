"""Logprobs: raw-distribution values, top-N ids, sampled token in column 0, ranks."""

from __future__ import annotations

import pytest
import torch

import lmserve.sample.logprobs as logprobs_module
from lmserve.sample.logprobs import LogprobsTensors, compute_logprobs_tensors
from lmserve.sample.sampler import Sampler
from tests.sample import DEVICES, make_metadata

VOCAB = 40


def _logits(num_rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _check_layout(out, logits: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int) -> None:
    raw = torch.log_softmax(logits.cpu(), dim=-1)
    out = LogprobsTensors(out.token_ids.cpu(), out.logprobs.cpu(), out.ranks.cpu())
    token_ids = token_ids.cpu()
    assert out.token_ids.shape == out.logprobs.shape == (logits.shape[0], num_logprobs + 1)
    assert out.token_ids.dtype == out.ranks.dtype == torch.int64
    assert out.logprobs.dtype == torch.float32
    assert torch.equal(out.token_ids[:, 0], token_ids)
    # Every reported value is the raw log_softmax at that id.
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids), rtol=0, atol=1e-6)
    # Columns 1..N are the N largest, in descending order.
    top_values = raw.topk(num_logprobs, dim=-1).values
    torch.testing.assert_close(out.logprobs[:, 1:], top_values, rtol=0, atol=1e-6)
    expected_ranks = (raw > raw.gather(1, token_ids[:, None])).sum(dim=-1) + 1
    assert torch.equal(out.ranks, expected_ranks)


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_come_from_raw_logits_not_the_processed_ones(device):
    logits = _logits(6).to(device)
    rows = [
        {"temperature": 0.5, "top_k": 2, "generator": torch.Generator(device).manual_seed(1)},
        {"logit_bias": {0: 50.0}},  # greedy picks 0; its logprob is still the raw one
        {"repetition": 3.0, "prompt": [1, 2, 3], "frequency": 1.0, "output": [4, 4]},
        {"temperature": 1.0, "min_p": 0.5, "top_p": 0.3},
        {"banned": [int(logits[4].argmax())]},  # greedy picks the raw second best: rank 2
        {},
    ]
    out = Sampler()(logits, make_metadata(VOCAB, rows, max_num_logprobs=5, device=device))
    assert int(out.sampled_token_ids[1]) == 0
    assert int(out.logprobs.ranks[4]) == 2
    assert int(out.logprobs.ranks[5]) == 1
    _check_layout(out.logprobs, logits, out.sampled_token_ids, num_logprobs=5)


def test_zero_logprobs_returns_only_the_sampled_column():
    logits = _logits(3, seed=1)
    out = Sampler()(logits, make_metadata(VOCAB, [{}] * 3, max_num_logprobs=0))
    _check_layout(out.logprobs, logits, out.sampled_token_ids, num_logprobs=0)
    assert out.logprobs.ranks.tolist() == [1, 1, 1]


def test_rank_counts_strictly_greater_so_ties_share_the_best_rank():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    out = compute_logprobs_tensors(logits, torch.tensor([2, 0, 3]), num_logprobs=2)
    assert out.ranks.tolist() == [1, 3, 1]
    assert set(out.token_ids[0, 1:].tolist()) == {1, 2}  # tied for first: both listed


@pytest.mark.parametrize("device", DEVICES)
def test_compute_logprobs_tensors_for_given_tokens(device):
    logits = _logits(9, seed=2).to(device)
    token_ids = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(3))
    token_ids = token_ids.to(device)
    out = compute_logprobs_tensors(logits, token_ids, num_logprobs=4)
    _check_layout(out, logits, token_ids, num_logprobs=4)


def test_compute_logprobs_tensors_in_chunks_matches_one_pass(monkeypatch):
    logits = _logits(10, seed=4)
    token_ids = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(5))
    whole = compute_logprobs_tensors(logits, token_ids, num_logprobs=3)
    monkeypatch.setattr(logprobs_module, "_MAX_CHUNK_ELEMENTS", 3 * VOCAB)  # 4 chunks
    chunked = compute_logprobs_tensors(logits, token_ids, num_logprobs=3)
    assert torch.equal(chunked.token_ids, whole.token_ids)
    assert torch.equal(chunked.logprobs, whole.logprobs)
    assert torch.equal(chunked.ranks, whole.ranks)


def test_more_logprobs_than_vocab_is_clamped():
    logits = torch.randn(2, 5)
    out = compute_logprobs_tensors(logits, torch.tensor([0, 1]), num_logprobs=20)
    assert out.token_ids.shape == (2, 6)
