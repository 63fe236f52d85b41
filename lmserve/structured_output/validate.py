"""Front-end checks of a structured-output request, before it reaches the engine: the JSON
Schema, regex or grammar must parse and use only features the backend enforces. No tokenizer,
no compilation (that happens in the EngineCore's pool): a few milliseconds at most. Each
backend checks with its own parser ("xgrammar", the default, or "guidance": llguidance): a
grammar in Lark syntax is valid for guidance only.

Errors are ValueErrors whose message names the field ("SamplingParams.structured_outputs.json
..."), which the server turns into a 400 with `param` set.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

from lmserve.sampling_params import StructuredOutputsParams

# JSON Schema keywords xgrammar parses but does not enforce: a schema using them would get
# output that does not validate, so it is refused (vLLM refuses the same).
UNSUPPORTED_JSON_KEYWORDS = frozenset(
    {
        "not",
        "if",
        "then",
        "else",
        "dependentSchemas",
        "dependentRequired",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "multipleOf",
        "propertyNames",
        "unevaluatedProperties",
        "unevaluatedItems",
    }
)
_XGRAMMAR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # "[10:00:22] /path/x.cc:94: "
# Constraints found valid (their `key()`, LRU): the same schema sent again skips the parse
# (~0.2 ms a request for the test schemas; clients tend to repeat one schema).
MAX_REMEMBERED_VALID = 512
_valid_keys: OrderedDict[tuple, None] = OrderedDict()
# A grammar in llguidance's Lark syntax (its start rule is `start`), as llguidance tells.
_LARK_SYNTAX = re.compile(r"(?m)^\s*(%llguidance\b|start\s*:)")
_GUIDANCE_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \["([^"]+)"')


def validate_structured_outputs(params: StructuredOutputsParams, backend: str = "xgrammar") -> None:
    """Raise ValueError naming the field when the constraint cannot be enforced by `backend`
    (ModelConfig.structured_outputs_backend)."""
    key = (backend, *params.key())
    if key in _valid_keys:
        _valid_keys.move_to_end(key)
        return
    if backend == "guidance":
        _validate_guidance(params)
    else:
        _validate(params)
    _valid_keys[key] = None
    if len(_valid_keys) > MAX_REMEMBERED_VALID:
        _valid_keys.popitem(last=False)


def _validate(params: StructuredOutputsParams) -> None:
    field = f"SamplingParams.structured_outputs.{params.kind}"
    if params.kind == "json":
        keyword = find_unsupported_keyword(params.json)
        if keyword is not None:
            raise ValueError(
                f"{field} uses the JSON Schema keyword {keyword!r}, which structured outputs "
                "do not support"
            )
    from lmserve.structured_output.xgrammar_backend import build_grammar

    try:
        build_grammar(params)
    except RuntimeError as e:  # xgrammar's parse and conversion errors
        what = {"json": "a supported JSON Schema", "regex": "a valid regular expression"}.get(
            params.kind, "a valid grammar"
        )
        hint = ""
        if params.kind == "grammar" and _LARK_SYNTAX.search(params.grammar):
            hint = (
                " (this looks like a Lark grammar: the xgrammar backend takes EBNF with a "
                "`root` rule; Lark needs --structured-outputs-backend guidance)"
            )
        raise ValueError(f"{field} is not {what}: {clean_backend_error(e)}{hint}") from None


def _validate_guidance(params: StructuredOutputsParams) -> None:
    """llguidance's own checks: it refuses the JSON Schema keywords it does not implement."""
    from lmserve.structured_output.llguidance_backend import check_grammar

    field = f"SamplingParams.structured_outputs.{params.kind}"
    try:
        check_grammar(params)
    except ValueError as e:
        unimplemented = _GUIDANCE_UNIMPLEMENTED.search(str(e))
        if unimplemented:
            raise ValueError(
                f"{field} uses the JSON Schema keyword {unimplemented[1]!r}, which the guidance "
                "backend does not support"
            ) from None
        what = {
            "json": "a supported JSON Schema",
            "json_object": "a supported JSON Schema",
            "regex": "a valid regular expression",
        }.get(params.kind, "a valid grammar (Lark, or EBNF that translates to Lark)")
        raise ValueError(f"{field} is not {what}: {e}") from None


def find_unsupported_keyword(schema: Any) -> str | None:
    """The first keyword of UNSUPPORTED_JSON_KEYWORDS anywhere in `schema` (property names
    themselves are not keywords), or None."""
    if isinstance(schema, list):
        return next((k for s in schema if (k := find_unsupported_keyword(s))), None)
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        if key in UNSUPPORTED_JSON_KEYWORDS:
            return key
        if key in ("properties", "$defs", "definitions", "patternProperties"):
            if isinstance(value, dict):
                found = find_unsupported_keyword(list(value.values()))
                if found:
                    return found
            continue
        if key in ("enum", "const", "default", "examples", "required"):
            continue  # values, not schemas
        found = find_unsupported_keyword(value)
        if found:
            return found
    return None


def clean_backend_error(e: BaseException) -> str:
    """xgrammar's message without its timestamp and C++ source location."""
    return _XGRAMMAR_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip() else "")
