"""The interface a structured-output backend implements: xgrammar_backend.py (the default) and
llguidance_backend.py (`--structured-outputs-backend guidance`) are its two implementations.

A bitmask row has `ceil(backend.vocab_size / 32)` int32 words; bit `t % 32` of word `t // 32` is
1 when token t is allowed, and tokens past the row (logits padded beyond the tokenizer's
vocabulary) are never allowed. Rows for one step are laid out by the manager
(lmserve/core/structured_output.py) and applied on the device by lmserve/sample/grammar.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from lmserve.sampling_params import StructuredOutputsParams


def num_bitmask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """1 + the largest id of the tokenizer's vocabulary, added tokens included."""
    vocab = tokenizer.get_vocab()
    return max(len(vocab), max(vocab.values()) + 1)


class StructuredOutputGrammar(ABC):
    """One request's matcher: the grammar state after the tokens it has accepted.

    Owned by the scheduler's thread (never shared between requests). Every token the request
    outputs is accepted exactly once, in order; drafts are accepted only transiently (for the
    bitmask rows behind them, or to validate them) and rolled back at once."""

    @abstractmethod
    def accept_tokens(self, token_ids: list[int]) -> bool:
        """Advance over `token_ids`; False (and no tokens accepted after the first bad one)
        when one is not allowed."""

    @abstractmethod
    def validate_tokens(self, token_ids: list[int]) -> list[int]:
        """The longest prefix of `token_ids` the grammar allows next; the state is unchanged."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens."""

    @abstractmethod
    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` ([num_rows, num_words] int32)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """The grammar has accepted a stop token: nothing more may follow."""


class StructuredOutputBackend(ABC):
    """Compiles grammars for one vocabulary. `compile` runs in the manager's thread pool and
    may be called from several threads at once."""

    vocab_size: int  # tokens a mask row covers: the tokenizer's, at most the logits width

    @abstractmethod
    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar (backend-specific, immutable, shared by requests)."""

    @abstractmethod
    def make_grammar(self, compiled: Any, stop_token_ids: list[int]) -> StructuredOutputGrammar:
        """A fresh matcher at the start of `compiled`; `stop_token_ids` end the output once the
        grammar is complete (the request's EOS and stop token ids)."""

    def batch_fill_bitmask(
        self, grammars: list[StructuredOutputGrammar], bitmask: np.ndarray, rows: list[int]
    ) -> None:
        """`grammars[i].fill_bitmask(bitmask, rows[i])` for every i (none terminated); a backend
        may do it in one call over several threads. Rows not listed are left as they are."""
        for grammar, row in zip(grammars, rows):
            grammar.fill_bitmask(bitmask, row)

    def batch_accept_tokens(
        self, grammars: list[StructuredOutputGrammar], token_ids: list[list[int]]
    ) -> list[int]:
        """`grammars[i]` advances over `token_ids[i]` (distinct grammars) until a token it
        refuses or a stop token: how many tokens each accepted. A backend may batch it."""
        return [num_accepted(g, tokens) for g, tokens in zip(grammars, token_ids)]


def num_accepted(grammar: StructuredOutputGrammar, token_ids: list[int]) -> int:
    """`grammar` advances over `token_ids` until one is refused or it has accepted a stop
    token: how many it accepted."""
    for i, token_id in enumerate(token_ids):
        if grammar.is_terminated() or not grammar.accept_tokens([token_id]):
            return i
    return len(token_ids)
