"""Front-end checks of structured-output constraints: a constraint found valid is remembered
(by its key), so the same schema sent again is not parsed again; invalid ones always raise."""

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
    assert [k[1] for k in validate._valid_keys] == ["b", "c"]
