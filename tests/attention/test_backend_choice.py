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


def _metadata(q_lens: list[int]):
    from lmserve.attention.backend import AttentionMetadata

    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    return AttentionMetadata(
        num_reqs=len(q_lens), num_tokens=starts[-1], max_query_len=max(q_lens),
        max_seq_len=0, slot_mapping=None, query_start_loc=None, seq_lens=None,
        block_tables=None, query_start_loc_cpu=starts, seq_lens_cpu=[],
    )  # fmt: skip


def test_long_prompts_take_the_long_tile_and_their_decode_rows_a_launch_of_their_own():
    import torch

    from lmserve.attention.triton_backend import LONG_QUERY_LEN, LONG_TILE, _launches

    mixed = _metadata([LONG_QUERY_LEN, 1, 3, 40, 1])
    (long, lo, hi), (short, s_lo, s_hi) = _launches(mixed, 4, 128, torch.bfloat16, None)
    assert long == LONG_TILE and (lo, s_hi) == (5, 4) and short[0] == 16  # <= 4 tokens: 16 rows
    assert hi > LONG_QUERY_LEN and s_lo == 0
    assert mixed.backend_state == 3  # counted once, for every layer of the forward
    # no decode rows, a forced tile, float32 or short prompts: one launch
    assert len(_launches(_metadata([LONG_QUERY_LEN, 40]), 4, 128, torch.bfloat16, None)) == 1
    assert len(_launches(_metadata([LONG_QUERY_LEN, 1]), 4, 128, torch.bfloat16, LONG_TILE)) == 1
    assert len(_launches(_metadata([LONG_QUERY_LEN, 1]), 4, 128, torch.float32, None)) == 1
    assert len(_launches(_metadata([LONG_QUERY_LEN - 1, 1]), 4, 128, torch.bfloat16, None)) == 1
