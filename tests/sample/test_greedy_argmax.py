"""greedy_argmax: the first maximum, like torch.argmax (a NaN counts as the maximum), also
through its one-launch Triton path on CUDA; run under TRITON_INTERPRET=1, the kernel's tests
run on the CPU too."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from lmserve.sample.sampler import greedy_argmax


def _logits_with_ties(rows: int, vocab: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randint(-50, 50, (rows, vocab), generator=g).float()  # many exact ties
    logits[0, vocab // 3] = logits[0, -1] = 100.0  # the max twice: the first must win
    return logits.to(device)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("vocab", [1000, 49152, 128256, 151936])
@pytest.mark.parametrize("rows", [1, 3, 8, 9])
def test_greedy_argmax_is_the_first_maximum(device, vocab, rows):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for dtype in (torch.float32, torch.bfloat16):
        logits = _logits_with_ties(rows, vocab, device).to(dtype)
        assert torch.equal(greedy_argmax(logits), logits.argmax(dim=-1))
        assert greedy_argmax(logits)[0].item() == vocab // 3


needs_triton_device = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton and CUDA (or TRITON_INTERPRET=1)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton_device
@pytest.mark.parametrize("vocab", [7, 4096, 4097, 151936])
@pytest.mark.parametrize("rows", [1, 5])
def test_triton_argmax_matches_torch_with_ties_nans_and_infinities(rows, vocab):
    from lmserve.sample.triton_argmax import _tickets, triton_argmax

    logits = _logits_with_ties(rows, vocab, DEVICE)
    assert torch.equal(triton_argmax(logits), logits.argmax(dim=-1))
    logits[:, :] = float("-inf")  # every entry -inf: index 0
    logits[-1, vocab // 2] = float("nan")  # a NaN is the maximum
    logits[-1, vocab - 1] = float("nan")  # ... the first one
    assert torch.equal(triton_argmax(logits), logits.argmax(dim=-1))
    assert int(_tickets(logits.device).abs().sum()) == 0  # tickets back at zero


@needs_triton_device
def test_triton_argmax_reads_a_strided_row_view():
    from lmserve.sample.triton_argmax import triton_argmax

    wide = _logits_with_ties(3, 10000, DEVICE)
    view = wide[:, :9000]  # rows 10000 apart
    assert torch.equal(triton_argmax(view), view.argmax(dim=-1))
