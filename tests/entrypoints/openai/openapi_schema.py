"""Validate response bodies against OpenAI's published OpenAPI document.

    validate(body, "CreateChatCompletionResponse")     # raises AssertionError listing problems

The document is OpenAPI 3.1, but some fields are still marked OpenAPI-3.0 style with
`nullable: true`, which JSON Schema does not know: `to_json_schema` rewrites each such schema S
into `anyOf: [S, {"type": "null"}]`. `$ref`s resolve against the whole (converted) document
through a `referencing` registry.

Two documented differences between OpenAI's real API and its published schema, which the
`relaxed` completion schema allows (use it for what it is for, nothing else):
  - streamed text-completion chunks carry `"finish_reason": null` until the last one;
  - with `echo` and `logprobs`, the first prompt token has no logprob: null in
    `token_logprobs` and `top_logprobs`.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

_REPO = Path(__file__).resolve().parents[3]
# OpenAI's own OpenAPI spec (MIT, see tests/data/openai/LICENSE), kept in the repo so the
# schema tests always run; the shared spec folder beside the checkout is only a fallback.
SPEC_CANDIDATES = [
    _REPO / "tests" / "data" / "openai" / "openapi.json",
    _REPO.parent / "shared" / "spec" / "openai" / "openapi.json",
]
SPEC_URI = "urn:openai:openapi.json"


def spec_path() -> Path | None:
    return next((p for p in SPEC_CANDIDATES if p.is_file()), None)


def to_json_schema(node: Any) -> Any:
    """Rewrite every `nullable: true` (OpenAPI 3.0) as `anyOf [..., null]`, recursively."""
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    nullable = node.get("nullable") is True
    converted = {
        key: to_json_schema(value)
        for key, value in node.items()
        if not (key == "nullable" and isinstance(value, bool))
    }
    return {"anyOf": [converted, {"type": "null"}]} if nullable else converted


@functools.cache
def _document() -> dict:
    path = spec_path()
    if path is None:
        raise FileNotFoundError(f"OpenAI's openapi.json not found in {SPEC_CANDIDATES}")
    with open(path, encoding="utf-8") as f:
        return to_json_schema(json.load(f))


@functools.cache
def _registry() -> Registry:
    return Registry().with_resource(SPEC_URI, Resource(_document(), DRAFT202012))


@functools.cache
def _validator(name: str, relaxed: bool = False) -> jsonschema.Draft202012Validator:
    if relaxed:
        schema = _relaxed_completion_schema(name)
    else:
        if name not in _document()["components"]["schemas"]:
            raise KeyError(f"no schema named {name!r} in the OpenAI document")
        schema = {"$ref": f"{SPEC_URI}#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema, registry=_registry())


def _relaxed_completion_schema(name: str) -> dict:
    if name != "CreateCompletionResponse":
        raise ValueError("only CreateCompletionResponse has a relaxed form")
    schema = copy.deepcopy(_document()["components"]["schemas"][name])
    choice = schema["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    logprobs = choice["logprobs"]["anyOf"][0]["properties"]
    for field in ("token_logprobs", "top_logprobs"):
        items = logprobs[field]["items"]
        logprobs[field]["items"] = {"anyOf": [items, {"type": "null"}]}
    return _rebase_refs(schema)  # its "#/..." refs point into the document


def _rebase_refs(node: Any) -> Any:
    if isinstance(node, list):
        return [_rebase_refs(item) for item in node]
    if isinstance(node, dict):
        return {
            key: (
                SPEC_URI + value if key == "$ref" and value.startswith("#") else _rebase_refs(value)
            )
            for key, value in node.items()
        }
    return node


def validate(body: Any, name: str, relaxed: bool = False) -> None:
    """Assert `body` (decoded JSON) matches the schema `name`; lists every problem."""
    errors = sorted(_validator(name, relaxed).iter_errors(body), key=lambda e: list(e.path))
    if errors:
        lines = [f"  at {'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors[:10]]
        shown = json.dumps(body)[:1500]
        raise AssertionError(f"{name} schema violations:\n" + "\n".join(lines) + f"\nbody: {shown}")
