"""Token embedding and the output projection to vocabulary logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.model.layers.utils import make_param


class VocabEmbedding(nn.Module):
    """Token id -> vector. (Vocab-parallel later: each rank holds a range of rows.)"""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = make_param(vocab_size, hidden_size)  # [vocab_size, hidden_size]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [n] -> [n, hidden_size]
        return F.embedding(input_ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"


class LMHead(nn.Module):
    """hidden -> vocabulary logits. With tied embeddings it reuses the embedding's parameter
    (the same `nn.Parameter` object, so loading the embedding loads both)."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        if tied_to is not None:
            self.weight = tied_to.weight  # [vocab_size, hidden_size], shared
        else:
            self.weight = make_param(vocab_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab]
        return F.linear(hidden_states, self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}"
