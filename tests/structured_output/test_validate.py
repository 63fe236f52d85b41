"""Front-end checks of structured-output constraints: a constraint found valid is remembered
(by its backend and key), so the same schema sent again is not parsed again; invalid ones
always raise; each backend checks with its own parser (a Lark grammar or `multipleOf` is valid
for guidance only; an EBNF grammar for both)."""

from __future__ import annotations

import pytest

from lmserve.sampling_params import StructuredOutputsParams
from lmserve.structured_output import validate


def test_a_valid_constraint_is_parsed_once(monkeypatch):
    calls = []
    real = validate._validate
    monkeypatch.setattr(validate, "_valid_keys", validate.OrderedDict())
    monkeypatch.setattr(validate, "_validate", lambda p: calls.append(p) or real(p))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for _ in range(3):
        validate.validate_structured_outputs(StructuredOutputsParams(json=dict(schema)))
    assert len(calls) == 1
    validate.validate_structured_outputs(StructuredOutputsParams(json=schema, disable_any_whitespace=True))  # fmt: skip
    assert len(calls) == 2  # another key: parsed


def test_an_invalid_constraint_raises_every_time(monkeypatch):
    monkeypatch.setattr(validate, "_valid_keys", validate.OrderedDict())
    for _ in range(2):
        with pytest.raises(ValueError, match="regex"):
            validate.validate_structured_outputs(StructuredOutputsParams(regex="(unclosed"))
    assert not validate._valid_keys


def test_remembered_constraints_are_bounded(monkeypatch):
    monkeypatch.setattr(validate, "_valid_keys", validate.OrderedDict())
    monkeypatch.setattr(validate, "MAX_REMEMBERED_VALID", 2)
    for regex in ("a", "b", "c"):
        validate.validate_structured_outputs(StructuredOutputsParams(regex=regex))
    assert [k[2] for k in validate._valid_keys] == ["b", "c"]


def test_each_backend_parses_a_constraint_once(monkeypatch):
    monkeypatch.setattr(validate, "_valid_keys", validate.OrderedDict())
    params = StructuredOutputsParams(regex="[a-z]+")
    for backend in ("xgrammar", "guidance", "guidance"):
        validate.validate_structured_outputs(params, backend)
    assert [k[0] for k in validate._valid_keys] == ["xgrammar", "guidance"]


LARK = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9][0-9]?/'
EBNF = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'


def test_lark_grammars_are_for_guidance_and_ebnf_for_both():
    validate.validate_structured_outputs(StructuredOutputsParams(grammar=LARK), "guidance")
    validate.validate_structured_outputs(StructuredOutputsParams(grammar=EBNF), "guidance")
    validate.validate_structured_outputs(StructuredOutputsParams(grammar=EBNF), "xgrammar")
    with pytest.raises(
        ValueError, match=r"structured_outputs\.grammar .*looks like a Lark grammar"
    ):
        validate.validate_structured_outputs(StructuredOutputsParams(grammar=LARK), "xgrammar")


@pytest.mark.parametrize(
    "constraint, match",
    [
        (
            {"grammar": "root ::= undefined_rule"},
            r"grammar is not a valid grammar .*Lark.*undefined_rule",
        ),  # fmt: skip
        ({"grammar": "start: foo"}, r"grammar is not a valid grammar .*unknown name"),
        ({"regex": "a(("}, r"regex is not a valid regular expression: .*unclosed group"),
        ({"json": {"type": "objekt"}}, r"json is not a supported JSON Schema: Invalid type"),
        ({"json": {"uniqueItems": True}}, r"json uses the JSON Schema keyword 'uniqueItems'"),
    ],
)
def test_guidance_errors_name_the_field(constraint, match):
    with pytest.raises(ValueError, match=r"SamplingParams\.structured_outputs\." + match):
        validate.validate_structured_outputs(StructuredOutputsParams(**constraint), "guidance")


def test_multiple_of_is_enforced_by_guidance_and_refused_by_xgrammar():
    params = StructuredOutputsParams(json={"type": "integer", "multipleOf": 5})
    validate.validate_structured_outputs(params, "guidance")
    with pytest.raises(ValueError, match="keyword 'multipleOf'"):
        validate.validate_structured_outputs(params, "xgrammar")
