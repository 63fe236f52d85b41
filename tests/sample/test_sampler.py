"""Sampler behaviour: greedy, logit edits, bans, temperature, seeds, mixed batches."""

from __future__ import annotations

import pytest
import torch

from lmserve.sample.sampler import Sampler, SamplerOutput
from tests.sample import ALPHA, DEVICES, chi_square_p_value, make_metadata

VOCAB = 32


def sample(logits: torch.Tensor, rows: list[dict], **kwargs) -> SamplerOutput:
    """Sample on logits' device; metadata goes there too."""
    metadata = make_metadata(logits.shape[-1], rows, device=logits.device, **kwargs)
    return Sampler()(logits, metadata)


def test_greedy_is_argmax_and_leaves_logits_untouched():
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    out = sample(logits, [{}] * 8)
    assert out.logprobs is None
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))
    assert torch.equal(logits, before)


def test_greedy_ignores_truncation_params():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    rows = [{"top_k": 1}, {"top_p": 0.1}, {"min_p": 0.9}, {"temperature": 0.0}]
    assert torch.equal(sample(logits, rows).sampled_token_ids, logits.argmax(dim=-1))


def test_logit_bias_flips_the_greedy_choice():
    logits = torch.zeros(2, VOCAB)
    logits[:, 3] = 5.0
    out = sample(logits, [{"logit_bias": {7: 6.0}}, {"logit_bias": {3: -10.0, 9: 1.0}}])
    assert out.sampled_token_ids.tolist() == [7, 9]


def test_penalties_flip_the_greedy_choice():
    logits = torch.zeros(3, VOCAB)
    logits[:, 4], logits[:, 5] = 2.0, 1.5
    rows = [
        {"repetition": 2.0, "prompt": [4]},  # 2.0 -> 1.0 < 1.5
        {"frequency": 0.2, "output": [4, 4, 4]},  # 2.0 - 0.6 = 1.4 < 1.5
        {"presence": 0.6, "output": [4]},  # 2.0 - 0.6 = 1.4 < 1.5
    ]
    assert sample(logits, rows).sampled_token_ids.tolist() == [5, 5, 5]
    weak = [
        {"repetition": 1.2, "prompt": [4]},
        {"frequency": 0.1, "output": [4, 4]},
        {"presence": 0.4, "output": [4]},
    ]
    assert sample(logits, weak).sampled_token_ids.tolist() == [4, 4, 4]


@pytest.mark.parametrize("device", DEVICES)
def test_banned_tokens_are_never_sampled(device):
    num_rows, banned = 4000, [0, 1, 2]
    logits = torch.zeros(num_rows, 8, device=device)
    logits[:, banned] = 20.0  # the banned ids would win almost always
    rows = [{"temperature": 1.0, "banned": banned}] * (num_rows // 2) + [{"banned": banned}] * (
        num_rows // 2
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sampled = sample(logits, rows).sampled_token_ids
    sampled = sampled.cpu()
    assert not torch.isin(sampled, torch.tensor(banned)).any()
    assert len(set(sampled[: num_rows // 2].tolist())) == 5  # the random rows spread over the rest


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_matches_softmax_of_scaled_logits(temperature, device):
    num_rows, vocab = 20_000, 10
    row_logits = torch.randn(vocab, generator=torch.Generator().manual_seed(2)) * 1.5
    logits = row_logits.expand(num_rows, vocab).contiguous().to(device)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        sampled = sample(logits, [{"temperature": temperature}] * num_rows).sampled_token_ids
    counts = torch.bincount(sampled.cpu(), minlength=vocab)
    expected = torch.softmax(row_logits / temperature, dim=-1)
    assert chi_square_p_value(counts, expected) > ALPHA


def _seeded_sequence(
    row: dict, seed: int, others: list[dict], device: str, steps: int = 10
) -> list[int]:
    """Sample `steps` times with `row` (seeded) at batch position len(others) // 2."""
    generator = torch.Generator(device=device).manual_seed(seed)
    position = len(others) // 2
    batch = others[:position] + [{**row, "generator": generator}] + others[position:]
    logits = torch.zeros(len(batch), VOCAB, device=device)
    tokens = []
    for _ in range(steps):
        tokens.append(int(sample(logits, batch).sampled_token_ids[position]))
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_gives_same_sequence_alone_or_batched(device):
    row = {"temperature": 1.0}
    alone = _seeded_sequence(row, seed=7, others=[], device=device)
    other_generator = torch.Generator(device=device)
    others = [{"temperature": 0.8}, {}, {"temperature": 1.3, "generator": other_generator}] * 3
    assert _seeded_sequence(row, seed=7, others=others, device=device) == alone
    assert _seeded_sequence(row, seed=8, others=[], device=device) != alone


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_with_truncation_is_batch_independent(device):
    row = {"temperature": 1.0, "top_k": 5, "top_p": 0.9}
    alone = _seeded_sequence(row, seed=11, others=[], device=device)
    others = [{"temperature": 1.0, "top_k": VOCAB, "top_p": 1.0}, {"top_k": 2}] * 4
    assert _seeded_sequence(row, seed=11, others=others, device=device) == alone


def _mixed_rows() -> list[dict]:
    return [
        {},  # plain greedy
        {"repetition": 1.5, "frequency": 0.3, "prompt": [1, 2], "output": [3, 3]},  # greedy
        {"temperature": 0.7},
        {"temperature": 1.0, "top_k": 3},
        {"temperature": 1.2, "top_p": 0.8, "min_p": 0.05},
        {"temperature": 0.9, "presence": 0.5, "output": [5, 6, 6, 6, 6]},
        {"logit_bias": {10: 3.0}, "banned": [0]},  # greedy
        {"temperature": 1.0, "top_k": 4, "top_p": 0.7, "banned": [2]},
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_gives_each_row_what_it_gets_alone(device):
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(5)).to(device) * 2
    rows = _mixed_rows()

    def draws(rows: list[dict], logits: torch.Tensor, first_seed: int) -> torch.Tensor:
        """[steps, len(rows)] tokens over 5 steps; random rows seeded first_seed, +1, ..."""
        seeded = [
            {**row, "generator": torch.Generator(device=device).manual_seed(first_seed + i)}
            if "temperature" in row  # random row
            else row
            for i, row in enumerate(rows)
        ]
        return torch.stack([sample(logits, seeded).sampled_token_ids for _ in range(5)]).cpu()

    batched = draws(rows, logits, first_seed=100)
    for i, row in enumerate(rows):
        alone = draws([row], logits[i : i + 1], first_seed=100 + i)
        assert torch.equal(batched[:, i], alone[:, 0]), f"row {i}: {row}"
    greedy_rows = [i for i, row in enumerate(rows) if "temperature" not in row]
    assert batched[:, greedy_rows].unique(dim=0).shape[0] == 1  # greedy rows never vary


def test_empty_batch():
    out = sample(torch.zeros(0, VOCAB), [], max_num_logprobs=2)
    assert out.sampled_token_ids.shape == (0,)
    assert out.logprobs.token_ids.shape == (0, 3)
