"""Choosing the structured-outputs backend: `--structured-outputs-backend` / `LLM(
structured_outputs_backend=...)`; auto is xgrammar; an unknown name or a backend whose package
is missing fails when the config is built, naming the field; the server checks a request's
constraint with the engine's backend (a 400 naming the request's field otherwise)."""

from __future__ import annotations

import argparse
import importlib.util

import pytest

from lmserve.config import ConfigError, EngineConfig
from lmserve.engine.arg_utils import add_engine_args, engine_kwargs
from lmserve.entrypoints.openai.errors import OpenAIError
from lmserve.entrypoints.openai.tools import plan_tools, structured_outputs_for

LARK = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9][0-9]?/'


def backend_of(model_dir: str, **kwargs) -> str:
    config = EngineConfig.from_kwargs(model_dir, device="cpu", **kwargs)
    return config.model_config.structured_outputs_backend


def test_auto_is_xgrammar_and_guidance_is_kept(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    assert backend_of(model_dir) == "xgrammar"
    assert backend_of(model_dir, structured_outputs_backend="auto") == "xgrammar"
    assert backend_of(model_dir, structured_outputs_backend="guidance") == "guidance"


def test_unknown_backend_is_a_config_error(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"ModelConfig\.structured_outputs_backend='outlines'"):
        backend_of(tiny_model_dir("llama"), structured_outputs_backend="outlines")


def test_backend_without_its_package_is_a_config_error(tiny_model_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llguidance" else real(name, *a),
    )
    with pytest.raises(ConfigError, match=r"structured_outputs_backend='guidance'.*'llguidance'"):
        backend_of(tiny_model_dir("llama"), structured_outputs_backend="guidance")


def test_the_flag_reaches_the_engine_keywords():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_kwargs(parser.parse_args([]))["structured_outputs_backend"] == "auto"
    args = parser.parse_args(["--structured-outputs-backend", "guidance"])
    assert engine_kwargs(args)["structured_outputs_backend"] == "guidance"


def test_server_checks_constraints_with_the_engines_backend():
    extra = {"grammar": LARK}
    assert structured_outputs_for(None, extra, backend="guidance").grammar == LARK
    with pytest.raises(OpenAIError) as info:
        structured_outputs_for(None, extra, backend="xgrammar")
    assert info.value.status_code == 400 and info.value.param == "structured_outputs"
    # a tool's parameters: multipleOf is enforced by guidance, refused by xgrammar
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 5}}}}}]  # fmt: skip
    assert plan_tools(tools, "required", backend="guidance").mode == "required"
    with pytest.raises(OpenAIError, match=r"tools\[0\]\.function\.parameters.*multipleOf"):
        plan_tools(tools, "required", backend="xgrammar")
