r"""The llguidance backend (`--structured-outputs-backend guidance`): grammars compiled by
llguidance (Rust: a lexer over the vocabulary's token trie plus an Earley parser), one
LLMatcher per request, copied from a template matcher made once per grammar.

Differences from the xgrammar backend (lmserve/structured_output/xgrammar_backend.py):
  - `grammar` is Lark syntax (llguidance's dialect: the start rule is `start`, or the text
    begins with `%llguidance`); any other text is read as EBNF/GBNF (xgrammar's and
    llama.cpp's dialect, start rule `root`) and translated to Lark by llguidance's own
    converter (plain GBNF translates; xgrammar's own extensions, e.g. lookahead
    assertions, may not: such a grammar is a 400 naming the field).
  - JSON Schemas: llguidance's own JSON Schema support: keywords it does not implement are
    errors (`not`, `if`/`then`/`else`, `uniqueItems`, `contains`, ...), keywords it does are
    enforced (`multipleOf`, and string `minLength`/`maxLength` directly). As with xgrammar,
    an object that lists `properties` gets no other properties unless the schema says
    `additionalProperties`, and an array with `prefixItems` no other items unless it says
    `items` (OpenAI's `strict: true`).
  - Regexes: Rust's regex syntax, with `\d` and `\w` read as ASCII classes (as xgrammar
    reads them); `\s` and the rest follow Unicode.
  - Whitespace between JSON tokens: free, at most MAX_WHITESPACE characters in a row (as
    with xgrammar); none with `disable_any_whitespace`.

Stop tokens are the request's own (its EOS and stop token ids), as xgrammar's
`override_stop_tokens`: llguidance's matcher knows only the tokenizer's EOS, so this module
allows a request's stop tokens where the grammar may end, and accepts them itself.
"""

from __future__ import annotations

import json
import re
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy as llg_numpy
import numpy as np
from llguidance import LLMatcher
from llguidance.gbnf_to_lark import any_to_lark

from lmserve.sampling_params import StructuredOutputsParams
from lmserve.structured_output.backend import (
    StructuredOutputBackend,
    StructuredOutputGrammar,
    tokenizer_vocab_size,
)

MAX_WHITESPACE = 16  # characters of free whitespace in a row inside JSON (as xgrammar's)
_WHITESPACE = rf"[\x20\x0A\x0D\x09]{{0,{MAX_WHITESPACE}}}"
# Fewer rows than this are filled on the calling thread (one llguidance call each, without
# the GIL); more go to llguidance's thread pool in one call.
MIN_ROWS_FOR_FILL_THREADS = 16


class GuidanceGrammar(StructuredOutputGrammar):
    """One request's matcher. Tokens are tried with `try_consume_tokens`, never
    `consume_token`: a refused token would leave an LLMatcher in its error state for good."""

    __slots__ = ("matcher", "stop_ids", "not_text", "stop_words", "stop_bits", "terminated")

    def __init__(
        self, matcher: LLMatcher, stop_ids: frozenset[int], eos_ids: frozenset[int]
    ) -> None:
        """`stop_ids`: the request's stop tokens; `eos_ids`: the tokenizer's EOS tokens, which
        llguidance would accept as the end where the grammar may end: refused unless they are
        among the request's stop tokens."""
        self.matcher = matcher
        self.stop_ids = stop_ids
        self.not_text = stop_ids | eos_ids  # never passed to the matcher
        ids = np.array(sorted(stop_ids), dtype=np.int64)
        self.stop_words = ids // 32  # where the stop tokens' bits are in a mask row
        self.stop_bits = (1 << (ids % 32)).astype(np.uint32).view(np.int32)
        self.terminated = False  # a stop token was accepted (by us, not by the matcher)

    def accept_tokens(self, token_ids: list[int]) -> bool:
        return self._advance(token_ids) == len(token_ids)

    def validate_tokens(self, token_ids: list[int]) -> list[int]:
        num_ok = self._advance(token_ids)
        self.rollback(num_ok)
        return token_ids[:num_ok]

    def rollback(self, num_tokens: int) -> None:
        if num_tokens and self.terminated:
            self.terminated = False  # the stop token: the matcher never saw it
            num_tokens -= 1
        if num_tokens:
            self.matcher.rollback(num_tokens)

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        llg_numpy.fill_next_token_bitmask(self.matcher, bitmask, row)

    def is_terminated(self) -> bool:
        return self.terminated

    def _advance(self, token_ids: list[int]) -> int:
        """Accept `token_ids` until one is refused or a stop token ends the output: how many
        were accepted."""
        done = 0
        while done < len(token_ids) and not self.terminated:
            token_id = token_ids[done]
            if token_id in self.not_text:
                if token_id not in self.stop_ids or not self.matcher.is_accepting():
                    break
                self.terminated = True
                done += 1
                break
            end = done + 1  # a run of ordinary tokens goes to llguidance in one call
            while end < len(token_ids) and token_ids[end] not in self.not_text:
                end += 1
            run = token_ids[done:end]
            num_ok = self.matcher.try_consume_tokens(run)
            done += num_ok
            if num_ok < len(run):
                break
        return done


class GuidanceBackend(StructuredOutputBackend):
    def __init__(self, tokenizer: Any, vocab_size: int, num_fill_threads: int = 1) -> None:
        """`tokenizer`: the model's HF (fast) tokenizer; `vocab_size`: the logits width.
        Masks cover the tokenizer's ids only (`self.vocab_size`), as with xgrammar: logits
        past it (a model padded beyond its tokenizer) are never allowed."""
        vocab_size = min(vocab_size, tokenizer_vocab_size(tokenizer))
        eos = tokenizer.eos_token_id
        self.ll_tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=eos if eos is not None else 0
        )
        self.vocab_size = self.ll_tokenizer.vocab_size
        # The tokens llguidance allows where the grammar may end; each request's own stop
        # tokens take their place in its mask rows.
        self.eos_ids = frozenset(t for t in self.ll_tokenizer.eos_tokens if t < self.vocab_size)
        self.executor = llguidance.LLExecutor(max(num_fill_threads, 1))

    def compile(self, params: StructuredOutputsParams) -> LLMatcher:
        """A template matcher at the grammar's start (requests get copies of it): building
        it is the compilation (llguidance drops the GIL meanwhile)."""
        matcher = LLMatcher(self.ll_tokenizer, build_grammar(params), log_level=0)
        if matcher.is_error():
            raise ValueError(clean_guidance_error(matcher.get_error()))
        return matcher

    def make_grammar(self, compiled: LLMatcher, stop_token_ids: list[int]) -> GuidanceGrammar:
        stop_ids = frozenset(t for t in stop_token_ids if 0 <= t < self.vocab_size)
        return GuidanceGrammar(compiled.deep_copy(), stop_ids, self.eos_ids)

    def batch_fill_bitmask(
        self, grammars: list[GuidanceGrammar], bitmask: np.ndarray, rows: list[int]
    ) -> None:
        if not grammars:
            return
        if len(grammars) >= MIN_ROWS_FOR_FILL_THREADS:
            pairs = [(g.matcher, row) for g, row in zip(grammars, rows)]
            llg_numpy.fill_next_token_bitmask_par(self.executor, pairs, bitmask)
        else:
            for grammar, row in zip(grammars, rows):
                llg_numpy.fill_next_token_bitmask(grammar.matcher, bitmask, row)
        self._use_request_stop_tokens(grammars, bitmask, rows)

    def _use_request_stop_tokens(
        self, grammars: list[GuidanceGrammar], bitmask: np.ndarray, rows: list[int]
    ) -> None:
        """llguidance sets the tokenizer's EOS bits where the grammar may end: clear them, and
        set the request's own stop tokens instead (none, where it may not end)."""
        if not self.eos_ids:  # no EOS to read: ask each matcher
            ending = [i for i, g in enumerate(grammars) if g.matcher.is_accepting()]
        else:
            row_index = np.asarray(rows)
            ending_mask = np.zeros(len(rows), dtype=bool)
            for eos in sorted(self.eos_ids):
                word, bit = eos // 32, _bit(eos)
                column = bitmask[row_index, word]
                ending_mask |= (column & bit) != 0
                bitmask[row_index, word] = column & ~bit
            ending = np.flatnonzero(ending_mask).tolist()
        for i in ending:
            grammar = grammars[i]
            if grammar.stop_ids and grammar.matcher.is_accepting():
                np.bitwise_or.at(bitmask[rows[i]], grammar.stop_words, grammar.stop_bits)

    def batch_accept_tokens(
        self, grammars: list[GuidanceGrammar], token_ids: list[list[int]]
    ) -> list[int]:
        return [g._advance(tokens) for g, tokens in zip(grammars, token_ids)]


def build_grammar(params: StructuredOutputsParams) -> str:
    """llguidance's grammar text for `params` (no vocabulary). Raises ValueError on a grammar
    that cannot be translated to Lark or a schema llguidance cannot read; whether the result
    is valid is `check_grammar`'s business."""
    kind = params.kind
    if kind in ("json", "json_object"):
        if params.disable_any_whitespace:
            options = {"whitespace_flexible": False}
        else:
            options = {"whitespace_flexible": True, "whitespace_pattern": _WHITESPACE}
        schema = strict_schema(params.json) if kind == "json" else {"type": "object"}
        return LLMatcher.grammar_from_json_schema(schema, overrides=options)
    if kind == "regex":  # \d and \w as ASCII classes, as xgrammar (and JavaScript) read them
        return LLMatcher.grammar_from_lark(
            f"start: /{llguidance.regex_to_lark(params.regex, 'dw')}/"
        )
    if kind == "choice":
        return LLMatcher.grammar_from_lark(choice_lark(params.choice))
    try:
        lark = any_to_lark(params.grammar)
    except Exception as e:  # llguidance's GBNF parser raises plain Exceptions
        raise ValueError(f"cannot translate the EBNF grammar to Lark: {e}") from None
    return LLMatcher.grammar_from_lark(lark)


def check_grammar(params: StructuredOutputsParams) -> None:
    """Raise ValueError (llguidance's message, cleaned) when the grammar is not valid."""
    error = LLMatcher.validate_grammar(build_grammar(params))
    if error:
        raise ValueError(clean_guidance_error(error))


def choice_lark(choices: list[str]) -> str:
    """`start: "a" | "b"`: exactly one of the strings (JSON escapes are Lark escapes)."""
    return "start: " + " | ".join(json.dumps(c) for c in choices)


def strict_schema(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object that lists `properties`
    and says nothing of other properties, and `items: false` on every array with
    `prefixItems` and no `items`: as xgrammar's strict mode (and OpenAI's `strict: true`)."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas"):
            out[key] = (
                {k: strict_schema(v) for k, v in value.items()}
                if isinstance(value, dict)
                else value
            )
        elif key in ("enum", "const", "default", "examples", "required"):
            out[key] = value  # values, not schemas
        else:
            out[key] = strict_schema(value)
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if "prefixItems" in out and "items" not in out:
        out["items"] = False
    return out


def _bit(token_id: int) -> np.int32:
    """Token `token_id`'s bit in its int32 mask word."""
    return np.array(1 << (token_id % 32), dtype=np.uint32).view(np.int32)[()]


_CARET_LINE = re.compile(r"^\s*(\d+\s*\|.*|\^+)?\s*$")


def clean_guidance_error(message: str) -> str:
    """llguidance's message on one line: without the source excerpts and carets it draws
    under the offending text."""
    lines = [line.strip() for line in message.strip().splitlines()]
    kept = [line for line in lines if not _CARET_LINE.match(line)]
    return " ".join(kept)[:500]
