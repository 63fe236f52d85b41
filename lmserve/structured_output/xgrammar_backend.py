"""The xgrammar backend: grammars compiled against the model's vocabulary (a token-mask cache
per grammar state), matchers that fill bitmask rows in a few microseconds per state.

JSON Schemas compile in xgrammar's strict mode (no properties or items beyond those the schema
lists, as OpenAI's `strict: true`); `json_object` allows any object. Whitespace between JSON
tokens is free unless `disable_any_whitespace`, but at most MAX_WHITESPACE characters in a
row, so a weak model cannot loop on whitespace until max_tokens.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import xgrammar as xgr

from lmserve.sampling_params import StructuredOutputsParams
from lmserve.structured_output.backend import (
    StructuredOutputBackend,
    StructuredOutputGrammar,
    tokenizer_vocab_size,
)

MAX_WHITESPACE = 16  # characters of free whitespace in a row inside JSON
# Fewer rows than this are filled on the calling thread: waking xgrammar's fill threads costs
# ~0.05-0.4 ms a call, about what 16 rows take alone (~25 us each).
MIN_ROWS_FOR_FILL_THREADS = 16
# One JSON string character: anything but '"', '\\' and control characters, or an escape.
_JSON_CHAR = r'([^"\\\x00-\x1f]|\\(["\\/bfnrt]|u[0-9a-fA-F]{4}))'


class XgrammarGrammar(StructuredOutputGrammar):
    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self.matcher = matcher

    def accept_tokens(self, token_ids: list[int]) -> bool:
        return all(self.matcher.accept_token(t) for t in token_ids)

    def validate_tokens(self, token_ids: list[int]) -> list[int]:
        num_ok = 0
        for token_id in token_ids:
            if self.matcher.is_terminated() or not self.matcher.accept_token(token_id):
                break
            num_ok += 1
        if num_ok:
            self.matcher.rollback(num_ok)
        return token_ids[:num_ok]

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.matcher.rollback(num_tokens)

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class XgrammarBackend(StructuredOutputBackend):
    def __init__(
        self, tokenizer: Any, vocab_size: int, num_threads: int = 2, num_fill_threads: int = 1
    ) -> None:
        """`tokenizer`: the model's HF tokenizer; `vocab_size`: the logits width;
        `num_fill_threads`: threads that fill one step's bitmask rows together (xgrammar's
        BatchGrammarMatcher).

        Masks cover the tokenizer's ids only (`self.vocab_size`): logits past it (a model
        padded beyond its tokenizer's vocabulary) have no token and are never allowed. Given
        the logits width instead, xgrammar would take each padding id for a special token,
        which costs it time on every token a matcher accepts (~25 us at 79k padding ids)."""
        self.vocab_size = min(vocab_size, tokenizer_vocab_size(tokenizer))
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
        # xgrammar's own cache is keyed by grammar text too; the manager's cache sits above it.
        self.compiler = xgr.GrammarCompiler(info, max_threads=num_threads)
        self.batch_matcher = xgr.BatchGrammarMatcher(max(num_fill_threads, 1))
        self.inline_matcher = xgr.BatchGrammarMatcher(1)  # no threads: few rows

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        return self.compiler.compile_grammar(build_grammar(params))

    def make_grammar(self, compiled: Any, stop_token_ids: list[int]) -> XgrammarGrammar:
        # Rollback is unlimited in xgrammar >= 0.2 (drafts are rolled back right away).
        stop_token_ids = [t for t in stop_token_ids if t < self.vocab_size]  # others: no token
        matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids or None)
        return XgrammarGrammar(matcher)

    def batch_fill_bitmask(
        self, grammars: list[XgrammarGrammar], bitmask: np.ndarray, rows: list[int]
    ) -> None:
        """One call into xgrammar for all rows, spread over its threads (C++, no GIL) when
        there are many."""
        if grammars:
            matchers = [g.matcher for g in grammars]
            many = len(matchers) >= MIN_ROWS_FOR_FILL_THREADS
            batch = self.batch_matcher if many else self.inline_matcher
            batch.batch_fill_next_token_bitmask(matchers, bitmask, list(rows))

    def batch_accept_tokens(
        self, grammars: list[XgrammarGrammar], token_ids: list[list[int]]
    ) -> list[int]:
        """One xgrammar call per token depth (one, without drafts), on this thread: an
        accepted token costs a matcher ~2-5 us, less than a hand-off to another thread."""
        matchers = [g.matcher for g in grammars]
        counts = [0] * len(matchers)
        active = [i for i, tokens in enumerate(token_ids) if tokens]
        depth = 0
        while active:
            accepted = xgr.BatchGrammarMatcher.batch_accept_token(
                [matchers[i] for i in active], [token_ids[i][depth] for i in active]
            )
            depth += 1
            still = []
            for i, ok in zip(active, accepted):
                if ok:
                    counts[i] += 1
                    if depth < len(token_ids[i]) and not matchers[i].is_terminated():
                        still.append(i)
            active = still
        return counts


def choice_ebnf(choices: list[str]) -> str:
    """`root ::= "a" | "b"`: exactly one of the strings (JSON escapes are EBNF escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def build_grammar(params: StructuredOutputsParams) -> xgr.Grammar:
    """The grammar without a vocabulary: parses and converts only (what the front-end checks).
    Raises RuntimeError (xgrammar's) on a schema, regex or grammar it cannot take."""
    whitespace = dict(
        any_whitespace=not params.disable_any_whitespace, max_whitespace_cnt=MAX_WHITESPACE
    )
    kind = params.kind
    if kind == "json":
        schema = json.dumps(with_length_patterns(params.json))
        return xgr.Grammar.from_json_schema(schema, **whitespace)
    if kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}', strict_mode=False, **whitespace)
    if kind == "regex":
        return xgr.Grammar.from_regex(params.regex)
    if kind == "choice":
        return xgr.Grammar.from_ebnf(choice_ebnf(params.choice))
    return xgr.Grammar.from_ebnf(params.grammar)


def with_length_patterns(schema: Any) -> Any:
    """`schema` with every string's minLength/maxLength (and no pattern or format) turned into
    an equivalent `pattern`. NOTE: xgrammar 0.2.9 lets raw control characters into strings with
    a length bound (invalid JSON), while its patterns follow JSON's string rules. Also NOTE:
    xgrammar matches UTF-8 loosely at the byte level: a model that emits an invalid multi-byte
    sequence (random models do; trained ones practically never) gets U+FFFD characters that
    can break a length bound."""
    if isinstance(schema, list):
        return [with_length_patterns(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: with_length_patterns(v) for k, v in schema.items()}
    types = out.get("type")
    is_string = types == "string" or (isinstance(types, list) and "string" in types)
    bounded = "minLength" in out or "maxLength" in out
    if is_string and bounded and not {"pattern", "format", "enum", "const"} & out.keys():
        lo, hi = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^{_JSON_CHAR}{{{lo},{hi}}}$"
    return out
