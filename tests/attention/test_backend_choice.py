"""Which attention backend `get_attention_backend` picks (runs anywhere; no GPU needed)."""

from __future__ import annotations

import importlib.util

import pytest

from lmserve.attention import get_attention_backend


def test_cpu_defaults_to_the_torch_reference(monkeypatch):
    monkeypatch.delenv("LMSERVE_ATTENTION_BACKEND", raising=False)
    assert get_attention_backend("cpu").name == "torch"


def test_cuda_defaults_to_triton_when_it_is_installed(monkeypatch):
    monkeypatch.delenv("LMSERVE_ATTENTION_BACKEND", raising=False)
    expected = "triton" if importlib.util.find_spec("triton") is not None else "torch"
    assert get_attention_backend("cuda").name == expected


def test_env_forces_torch_on_cuda(monkeypatch):
    monkeypatch.setenv("LMSERVE_ATTENTION_BACKEND", "torch")
    assert get_attention_backend("cuda").name == "torch"


def test_env_triton_on_cpu_is_refused(monkeypatch):
    monkeypatch.setenv("LMSERVE_ATTENTION_BACKEND", "triton")
    with pytest.raises(ValueError, match="needs device 'cuda'"):
        get_attention_backend("cpu")


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("LMSERVE_ATTENTION_BACKEND", "flashinfer")
    with pytest.raises(ValueError, match="choose one of torch, triton"):
        get_attention_backend("cuda")
