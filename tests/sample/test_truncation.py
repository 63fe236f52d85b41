"""Top-k / top-p / min-p: the kept sets, and sampled frequencies within them."""

from __future__ import annotations

import pytest
import torch

from lmserve.sample.sampler import Sampler
from lmserve.sample.truncation import apply_min_p, apply_top_k_top_p
from tests.sample import ALPHA, DEVICES, chi_square_p_value, make_metadata

INF = float("inf")


def reference_kept(
    probs: list[float], temperature: float, top_k: int, top_p: float, min_p: float
) -> list[float]:
    """Plain-Python truncation of one row; returns the renormalised distribution after it."""
    weights = [p ** (1 / temperature) for p in probs]
    total = sum(weights)
    scaled = [w / total for w in weights]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    kept = [i for i in order if scaled[i] >= min_p * scaled[order[0]]][:top_k]
    mass = sum(scaled[i] for i in kept)
    nucleus, cumulative = [], 0.0
    for i in kept:
        nucleus.append(i)
        cumulative += scaled[i] / mass
        if cumulative >= top_p:
            break
    nucleus_mass = sum(scaled[i] for i in nucleus)
    return [scaled[i] / nucleus_mass if i in nucleus else 0.0 for i in range(len(scaled))]


# (probs, temperature, top_k, top_p, min_p, the ids that must survive)
CASES = [
    ([0.05, 0.3, 0.1, 0.25, 0.2, 0.1], 1.0, 3, 1.0, 0.0, {1, 3, 4}),
    ([0.1, 0.4, 0.03, 0.3, 0.15, 0.02], 1.0, 6, 0.8, 0.0, {1, 3, 4}),
    ([0.5, 0.2, 0.1, 0.09, 0.06, 0.05], 1.0, 6, 1.0, 0.15, {0, 1, 2, 3}),
    # top-p applies to the top-k-renormalised mass: {0, 1} has 0.75 of it (only 0.6 of the raw)
    ([0.35, 0.25, 0.2, 0.1, 0.06, 0.04], 1.0, 3, 0.7, 0.0, {0, 1}),
    # truncation sees temperature-scaled probabilities (T = 2 flattens, so top-p keeps more)
    ([0.1, 0.4, 0.03, 0.3, 0.15, 0.02], 2.0, 6, 0.8, 0.0, {0, 1, 3, 4}),
    ([0.5, 0.2, 0.1, 0.09, 0.06, 0.05], 0.5, 6, 1.0, 0.15, {0, 1}),
    ([0.3, 0.3, 0.2, 0.1, 0.05, 0.05], 1.0, 4, 0.9, 0.1, {0, 1, 2, 3}),
]


def test_reference_agrees_with_the_hand_computed_sets():
    for probs, temperature, top_k, top_p, min_p, allowed in CASES:
        kept = reference_kept(probs, temperature, top_k, top_p, min_p)
        assert {i for i, p in enumerate(kept) if p > 0} == allowed


def _sample_cases(cases: list[tuple], rows_per_case: int, seed: int, device: str) -> torch.Tensor:
    """One batched call: rows_per_case rows of each case, one after another."""
    logits = torch.cat([torch.tensor(probs).log().expand(rows_per_case, -1) for probs, *_ in cases])
    logits = logits.to(device)
    rows = []
    for _, temperature, top_k, top_p, min_p, _ in cases:
        row = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
        rows += [row] * rows_per_case
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        metadata = make_metadata(logits.shape[-1], rows, device=device)
        sampled = Sampler()(logits, metadata).sampled_token_ids
    return sampled.view(len(cases), rows_per_case).cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_truncated_sampling_stays_in_set_and_matches_renormalised_distribution(device):
    sampled = _sample_cases(
        CASES, rows_per_case=4000, seed=0, device=device
    )  # 28k rows in one call
    for (probs, temperature, top_k, top_p, min_p, allowed), draws in zip(CASES, sampled):
        assert set(draws.tolist()) == allowed
        expected = torch.tensor(reference_kept(probs, temperature, top_k, top_p, min_p))
        counts = torch.bincount(draws, minlength=len(probs))
        assert chi_square_p_value(counts, expected) > ALPHA, (probs, top_k, top_p, min_p)


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_alone_uses_its_own_path_with_same_distribution(device):
    cases = [c for c in CASES if c[3] == 1.0 and c[4] == 0.0]  # top-k only: the topk() path
    cases += [([0.3, 0.1, 0.2, 0.15, 0.05, 0.2], 1.0, 6, 1.0, 0.0, set(range(6)))]  # k off
    sampled = _sample_cases(cases, rows_per_case=10_000, seed=1, device=device)
    for (probs, temperature, top_k, top_p, min_p, allowed), draws in zip(cases, sampled):
        assert set(draws.tolist()) == allowed
        expected = torch.tensor(reference_kept(probs, temperature, top_k, top_p, min_p))
        counts = torch.bincount(draws, minlength=len(probs))
        assert chi_square_p_value(counts, expected) > ALPHA


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_only_and_sorted_paths_keep_the_same_tokens(device):
    generator = torch.Generator().manual_seed(2)
    vocab = 100
    logits = torch.randn(64, vocab, generator=generator).to(device)
    top_k = torch.randint(1, vocab + 1, (64,), generator=generator).to(device)
    top_k[::7] = vocab  # off
    via_topk, via_sort = logits.clone(), logits.clone()
    apply_top_k_top_p(via_topk, top_k, None)
    apply_top_k_top_p(via_sort, top_k, torch.ones(64, device=device))
    assert torch.equal(via_topk, via_sort)
    assert torch.equal(torch.isfinite(via_topk).sum(dim=-1), top_k)


def test_ties_at_the_cut_off_are_all_kept():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0], [3.0, 2.0, 2.0, 1.0]])
    apply_top_k_top_p(logits, torch.tensor([2, 2]), torch.tensor([1.0, 0.5]))
    assert logits.tolist() == [[3.0, 2.0, 2.0, -INF], [3.0, -INF, -INF, -INF]]
    only_k = torch.tensor([[3.0, 2.0, 2.0, 1.0]])
    apply_top_k_top_p(only_k, torch.tensor([2]), None)
    assert only_k.tolist() == [[3.0, 2.0, 2.0, -INF]]


def test_top_token_always_survives_extreme_values():
    logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, 2.0, -1.0]])
    apply_min_p(logits, torch.tensor([1.0, 1.0]))
    apply_top_k_top_p(logits, torch.tensor([1, 1]), torch.tensor([0.0, 1e-9]))
    assert torch.isfinite(logits).tolist() == [[False, True, False], [True, True, False]]


@pytest.mark.parametrize("min_p", [0.0, 0.3])
def test_min_p_threshold_in_logit_space_matches_probability_rule(min_p):
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(3)) * 2
    probs = logits.softmax(dim=-1)
    expected_kept = probs >= min_p * probs.amax(dim=-1, keepdim=True)
    masked = logits.clone()
    apply_min_p(masked, torch.full((16,), min_p))
    assert torch.equal(torch.isfinite(masked), expected_kept)
    assert torch.equal(masked[expected_kept], logits[expected_kept])  # kept logits untouched


def test_top_p_over_row_chunks_equals_one_sort_of_the_whole_batch(monkeypatch):
    """Top-k/top-p sorts TOP_P_ROWS rows at a time (memory); the kept tokens must be those of
    one sort over every row, including the rows of a short last chunk."""
    from lmserve.sample import truncation

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(37, 500, generator=gen) * 3
    top_k = torch.randint(0, 600, (37,), generator=gen)
    top_p = torch.rand(37, generator=gen).clamp(min=0.05)
    whole, chunked = logits.clone(), logits.clone()
    monkeypatch.setattr(truncation, "TOP_P_ROWS", 1000)
    apply_top_k_top_p(whole, top_k, top_p)
    monkeypatch.setattr(truncation, "TOP_P_ROWS", 8)
    apply_top_k_top_p(chunked, top_k, top_p)
    assert torch.equal(whole, chunked)
    assert (whole == float("-inf")).any()  # something was truncated
