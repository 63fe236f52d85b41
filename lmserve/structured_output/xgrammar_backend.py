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
from lmserve.structured_output.backend import StructuredOutputBackend, StructuredOutputGrammar

MAX_WHITESPACE = 16  # characters of free whitespace in a row inside JSON
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
        """`tokenizer`: the model's HF tokenizer; `vocab_size`: the logits width (tokens
        past the tokenizer's vocabulary are never allowed); `num_fill_threads`: threads that
        fill one step's bitmask rows together (xgrammar's BatchGrammarMatcher)."""
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        # xgrammar's own cache is keyed by grammar text too; the manager's cache sits above it.
        self.compiler = xgr.GrammarCompiler(info, max_threads=num_threads)
        self.batch_matcher = xgr.BatchGrammarMatcher(max(num_fill_threads, 1))

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        return self.compiler.compile_grammar(build_grammar(params))

    def make_grammar(self, compiled: Any, stop_token_ids: list[int]) -> XgrammarGrammar:
        # Rollback is unlimited in xgrammar >= 0.2 (drafts are rolled back right away).
        matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids or None)
        return XgrammarGrammar(matcher)

    def batch_fill_bitmask(
        self, grammars: list[XgrammarGrammar], bitmask: np.ndarray, rows: list[int]
    ) -> None:
        """One call into xgrammar for all rows, spread over its threads (C++, no GIL)."""
        if grammars:
            matchers = [g.matcher for g in grammars]
            self.batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask, list(rows))


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
