"""Pearson's chi-square goodness-of-fit test without scipy (the survival function of the
chi-square distribution is the regularised upper incomplete gamma function)."""

from __future__ import annotations

import torch


def chi_square_p_value(observed: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0):
    """P-value of `observed` counts [n] under cell probabilities `probs` [n] (summing to 1).

    Cells whose expected count is below `min_expected` are pooled into one cell (the usual rule
    that keeps the chi-square approximation valid); a cell of probability 0 must be empty.
    Returns (p_value, statistic, degrees_of_freedom)."""
    observed = observed.double()
    probs = probs.double()
    assert abs(float(probs.sum()) - 1.0) < 1e-5
    probs = probs / probs.sum()  # float32 inputs: remove the rounding
    assert float(observed[probs == 0].sum()) == 0, "a count in a cell of probability 0"
    expected = probs * observed.sum()
    small = expected < min_expected
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    statistic = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(statistic / 2)))
    return p_value, statistic, dof
