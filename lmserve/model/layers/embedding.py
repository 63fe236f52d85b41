"""Token embedding and the output projection to vocabulary logits, both split by vocabulary
rows across the tensor-parallel ranks (each rank holds a contiguous range of token ids).
Either may hold its table packed as int8 rows (`self.packed`, set by lmserve/model/quantize.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.distributed.parallel_state import get_tp_group
from lmserve.model.layers.gemv import linear
from lmserve.model.layers.quantization import Int8Weight
from lmserve.model.layers.utils import default_weight_loader, make_param


class VocabPartition:
    """This rank's rows [start, end) of a [vocab_size, hidden] table, padded so every rank
    holds `rows` rows (padding rows are zero)."""

    def __init__(self, vocab_size: int) -> None:
        self.tp = get_tp_group()
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // self.tp.world_size)
        self.start = self.tp.rank * self.rows
        self.end = min(self.start + self.rows, vocab_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None):
        if self.tp.world_size == 1:
            default_weight_loader(param, loaded_weight, shard_id)
            return
        mine = self.end - self.start
        with torch.no_grad():
            param[mine:].zero_()
        default_weight_loader(param.narrow(0, 0, mine), loaded_weight[self.start : self.end])


class VocabEmbedding(nn.Module):
    """Token id -> vector. Each rank looks up the ids it holds; the sum over ranks is the
    embedding (exactly one rank contributes each row)."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.partition = VocabPartition(vocab_size)
        self.weight = make_param(
            self.partition.rows, hidden_size, weight_loader=self.partition.weight_loader
        )
        self.packed: Int8Weight | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [n] -> [n, hidden_size]
        part = self.partition
        if part.tp.world_size == 1:
            return self._lookup(input_ids)
        mine = (input_ids >= part.start) & (input_ids < part.end)  # [n]
        local_ids = torch.where(mine, input_ids - part.start, 0)
        out = self._lookup(local_ids) * mine[:, None].to(self.weight.dtype)
        return part.tp.all_reduce(out)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:  # [n] -> [n, hidden_size]
        if self.packed is None:
            return F.embedding(ids, self.weight)
        return self.packed.embed(ids, self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.partition.vocab_size}, {self.weight.shape[1]}, tp={self.partition.tp.world_size}"


class LMHead(nn.Module):
    """hidden -> vocabulary logits: each rank computes its rows' logits, then all ranks gather.
    With tied embeddings it reuses the embedding's parameter (the same `nn.Parameter`, split
    the same way, so loading the embedding loads both)."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None):
        super().__init__()
        self.partition = VocabPartition(vocab_size)
        # The embedding it shares a table with, kept out of the module tree (not a submodule).
        object.__setattr__(self, "tied_to", tied_to)
        self.packed: Int8Weight | None = None
        if tied_to is not None:
            self.weight = tied_to.weight  # [rows, hidden_size], shared
        else:
            self.weight = make_param(
                self.partition.rows, hidden_size, weight_loader=self.partition.weight_loader
            )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab]
        if self.packed is None:
            logits = linear(hidden_states, self.weight)
        else:  # float32, its best logits exact (see Int8Weight.logits)
            logits = self.packed.logits(hidden_states)
        tp = self.partition.tp
        if tp.world_size == 1:
            return logits
        return tp.all_gather(logits, dim=-1)[..., : self.partition.vocab_size]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.partition.vocab_size}"
