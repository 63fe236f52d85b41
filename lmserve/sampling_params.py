"""SamplingParams: how to sample one request, with vLLM's field names.

Validated at construction: a bad value raises ValueError naming the field, the value and what
is allowed, before the request reaches the engine.
"""

from __future__ import annotations

import enum
import json as _json
from dataclasses import dataclass
from typing import Any

_GREEDY_EPS = 1e-5  # temperature below this is treated as greedy (argmax)


class RequestOutputKind(enum.IntEnum):
    CUMULATIVE = 0  # every update carries everything generated so far
    DELTA = 1  # every update carries only what is new (streaming)
    FINAL_ONLY = 2  # one output, when the request finishes (LLM.generate)


@dataclass
class StructuredOutputsParams:
    """Constrain the output to exactly one of (vLLM's names):

    json          a JSON Schema (a dict, or its JSON text): the output is one JSON value of it
    regex         a regular expression the whole output matches
    choice        one of these strings, exactly
    grammar       an EBNF grammar (xgrammar's dialect, GBNF-like; the start rule is `root`);
                  with the guidance backend also Lark (llguidance's; start rule `start`)
    json_object   True: any JSON object (OpenAI's `response_format: {"type": "json_object"}`)

    Shape is checked here; whether a schema, regex or grammar compiles is checked by the
    front-end (lmserve/structured_output/validate.py) before the request reaches the engine.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # vLLM's: True keeps JSON compact (no whitespace between tokens of the JSON syntax).
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        set_fields = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(set_fields) != 1:
            raise ValueError(
                "SamplingParams.structured_outputs is invalid: set exactly one of "
                f"{', '.join(_CONSTRAINTS)} (got {set_fields or 'none'})"
            )
        if isinstance(self.json, str):
            try:
                self.json = _json.loads(self.json)
            except ValueError as e:
                raise ValueError(
                    f"SamplingParams.structured_outputs.json is not valid JSON: {e}"
                ) from None
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError(
                "SamplingParams.structured_outputs.json is invalid: must be a JSON Schema "
                f"object, got {type(self.json).__name__}"
            )
        _check_str_field("regex", self.regex)
        _check_str_field("grammar", self.grammar)
        if self.choice is not None and (
            not isinstance(self.choice, list)
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError(
                f"SamplingParams.structured_outputs.choice={self.choice!r} is invalid: must be "
                "a non-empty list of non-empty strings"
            )

    @property
    def kind(self) -> str:
        """One of "json", "regex", "choice", "grammar", "json_object"."""
        return next(name for name in _CONSTRAINTS if getattr(self, name) not in (None, False))

    def key(self) -> tuple[str, str, bool]:
        """(kind, text, disable_any_whitespace): what a compiled grammar is cached by."""
        kind = self.kind
        if kind == "json":
            text = _json.dumps(self.json, sort_keys=True)
        elif kind == "choice":
            text = _json.dumps(self.choice)
        elif kind == "json_object":
            text = ""
        else:
            text = getattr(self, kind)
        return kind, text, self.disable_any_whitespace


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


def _check_str_field(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(
            f"SamplingParams.structured_outputs.{name}={value!r} is invalid: must be a "
            "non-empty string"
        )


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = -1  # -1 = all tokens
    min_p: float = 0.0  # drop tokens with p < min_p * p_max
    seed: int | None = None  # per-request generator; same seed, same output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    stop: str | list[str] | None = None  # stop strings (matched on text)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None = up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = None  # top-N logprobs per generated token
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Constrained decoding (JSON Schema, regex, choice, grammar); None = unconstrained.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        _check_int("n", self.n, lo=1)
        _check("temperature", self.temperature, self.temperature >= 0, ">= 0")
        _check("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]")
        _check_int("top_k", self.top_k)
        _check("top_k", self.top_k, self.top_k == -1 or self.top_k >= 1, "-1 (off) or >= 1")
        _check("min_p", self.min_p, 0 <= self.min_p <= 1, "in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(name, value, -2 <= value <= 2, "in [-2, 2]")
        _check("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0, "> 0")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lo=1)
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens} must be <= max_tokens={self.max_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, lo=0, hi=20)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=-(2**63), hi=2**64 - 1)
        for s in self.stop:
            _check("stop", s, isinstance(s, str) and s != "", "non-empty strings")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, lo=0)
        for token_id, bias in (self.logit_bias or {}).items():
            _check_int("logit_bias key", token_id, lo=0)
            _check(f"logit_bias[{token_id}]", bias, -100 <= bias <= 100, "in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


def _check(name: str, value: object, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: must be {allowed}")


def _check_int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: must be an integer")
    if lo is not None and value < lo or hi is not None and value > hi:
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: must be {bounds}")
