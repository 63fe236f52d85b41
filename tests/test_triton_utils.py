"""lmserve.triton_utils: when Triton kernels launch with programmatic dependent launch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lmserve import triton_utils


def _cuda_like(index: int = 0):
    """Stands in for a CUDA tensor: pdl_enabled reads only `.is_cuda` and `.device`."""
    return SimpleNamespace(is_cuda=True, device=torch.device("cuda", index))


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(triton_utils, "_supports_pdl", lambda index: True)
    monkeypatch.delenv("LMSERVE_DISABLE_PDL", raising=False)


def test_cpu_tensors_never_launch_with_pdl(hopper):
    assert not triton_utils.pdl_enabled(torch.zeros(1))
    assert triton_utils.pdl_launch_options(torch.zeros(1)) == {"USE_PDL": False}


def test_a_gpu_that_supports_it_launches_with_pdl(hopper):
    assert triton_utils.pdl_launch_options(_cuda_like()) == {"USE_PDL": True, "launch_pdl": True}


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_the_environment_switch_turns_it_off(hopper, monkeypatch, value):
    monkeypatch.setenv("LMSERVE_DISABLE_PDL", value)
    assert triton_utils.pdl_launch_options(_cuda_like()) == {"USE_PDL": False}


def test_older_gpus_launch_without_it(monkeypatch):
    monkeypatch.setattr(triton_utils, "_supports_pdl", lambda index: False)
    assert triton_utils.pdl_launch_options(_cuda_like()) == {"USE_PDL": False}
