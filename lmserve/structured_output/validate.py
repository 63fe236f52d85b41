"""Front-end checks of a structured-output request, before it reaches the engine: the JSON
Schema, regex or grammar must parse and use only features the backend enforces. No tokenizer,
no compilation (that happens in the EngineCore's pool): a few milliseconds at most.

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


def validate_structured_outputs(params: StructuredOutputsParams) -> None:
    """Raise ValueError naming the field when the constraint cannot be enforced."""
    key = params.key()
    if key in _valid_keys:
        _valid_keys.move_to_end(key)
        return
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
        raise ValueError(f"{field} is not {what}: {clean_backend_error(e)}") from None


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
