"""greedy_argmax: the first maximum, like torch.argmax, also through its chunked CUDA path."""

from __future__ import annotations

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
