"""Profiles: the fit recovers known coefficients; shipped profiles say where each came from."""

from __future__ import annotations

import pytest

from lmserve.sim.profile import (
    BUILTIN_PROFILES,
    StepProfile,
    fit_profile,
    load_profile,
    prefill_pairs,
)


def latency_result(p: StepProfile, batch: int, n_in: int, n_out: int) -> dict:
    """What `bench latency --output-json` reports for an engine that steps as `p` says."""
    return {
        "batch_size": batch, "input_len": n_in, "output_len": n_out,
        "avg_ttft": p.step_time(batch * n_in, 0, batch * n_in, batch * prefill_pairs(n_in)),
        "avg_decode_step_latency": p.step_time(0, batch, batch * (n_in + n_out / 2)),
    }  # fmt: skip


def test_the_fit_recovers_the_coefficients_of_bench_latency_results():
    truth = StepProfile("truth", 0.004, 2e-5, 3e-4, 1e-7)
    grid = [(1, 64, 32), (1, 1024, 32), (8, 256, 64), (32, 128, 128), (4, 2048, 16)]
    fitted = fit_profile([(f"r{i}", latency_result(truth, *g)) for i, g in enumerate(grid)], "fit")
    for name in ("base_s", "per_token_s", "per_row_s", "per_context_token_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-3)
        assert "least-squares fit" in fitted.sources[name]


def test_the_fit_separates_prefill_attention_from_the_per_token_cost():
    """Prompts of 64 to 2,048 tokens: the quadratic attention term is told from the linear
    one; with a narrow range of lengths it is not fitted at all (it would be a guess)."""
    truth = StepProfile("truth", 0.004, 2e-5, 3e-4, 1e-7, per_attention_pair_s=3e-9)
    grid = [(1, 64, 32), (1, 1024, 32), (8, 256, 64), (32, 128, 128), (4, 2048, 16)]
    fitted = fit_profile([(f"r{i}", latency_result(truth, *g)) for i, g in enumerate(grid)], "fit")
    for name in ("base_s", "per_token_s", "per_row_s", "per_context_token_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-3)
    assert fitted.per_attention_pair_s == pytest.approx(3e-9, rel=1e-3)
    assert "least-squares fit" in fitted.sources["per_attention_pair_s"]

    narrow = [(1, 256, 32), (2, 512, 32), (8, 300, 64), (4, 400, 16)]
    fitted = fit_profile([(f"r{i}", latency_result(truth, *g)) for i, g in enumerate(narrow)], "n")
    assert fitted.per_attention_pair_s == 0 and "per_attention_pair_s" not in fitted.sources


def test_the_fit_refuses_too_few_measurements():
    with pytest.raises(ValueError, match="observations"):
        fit_profile([("one", latency_result(StepProfile("t", 0.01, 0, 0, 0), 1, 8, 8))], "x")


@pytest.mark.parametrize("name", BUILTIN_PROFILES)
def test_shipped_profiles_load_and_cite_a_source_for_every_coefficient(name):
    profile = load_profile(name)
    for field in ("base_s", "per_token_s", "per_row_s", "per_context_token_s"):
        assert profile.sources.get(field), field
    assert profile.step_time(512, 8, 4096) > profile.step_time(0, 1, 100) > 0
