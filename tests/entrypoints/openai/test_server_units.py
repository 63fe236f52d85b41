"""Pieces of the server that need no running engine: CLI flags, request parsing, error
mapping, the schema helper."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from lmserve.entrypoints.cli import build_parser, main
from lmserve.entrypoints.openai.errors import from_validation_error, param_from_message
from lmserve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from lmserve.entrypoints.openai.server import served_model_names
from tests.entrypoints.openai.openapi_schema import to_json_schema


def test_serve_help_groups_server_and_engine_flags(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    server_part = out[out.index("server:") : out.index("engine:")]
    for flag in ("--host", "--port", "--api-key", "--served-model-name", "--shutdown-timeout"):
        assert flag in server_part
    assert "--max-num-seqs" in out[out.index("engine:") :]


def test_serve_model_is_optional_and_names_default():
    args = build_parser().parse_args(["serve"])
    assert args.model is None
    assert served_model_names(args) == ["SmolLM2-135M-Instruct"]
    args = build_parser().parse_args(["serve", "/m", "--served-model-name", "a", "b"])
    assert served_model_names(args) == ["a", "b"]
    args = build_parser().parse_args(["serve", "/m", "--max-num-seqs", "3", "--port", "1"])
    assert (args.model, args.max_num_seqs, args.port) == ("/m", 3, 1)


def test_serve_with_a_bad_model_exits_2(capsys, tmp_path):
    rc = main(["serve", str(tmp_path / "missing"), "--device", "cpu"])
    assert rc == 2
    assert "missing" in capsys.readouterr().err


def test_serve_with_a_bad_model_stops_the_engine_process_started_early(
    capsys, tmp_path, monkeypatch
):
    """With multiprocessing, `serve` starts the EngineCore before it has a configuration; when
    the configuration fails, that process is told so and exits: no orphan is left."""
    import psutil

    monkeypatch.setenv("LMSERVE_ENABLE_MULTIPROCESSING", "1")
    before = {c.pid for c in psutil.Process().children(recursive=True)}  # other tests' servers
    rc = main(["serve", str(tmp_path / "missing"), "--device", "cpu"])
    assert rc == 2
    assert "missing" in capsys.readouterr().err
    alive = [
        " ".join(c.cmdline())
        for c in psutil.Process().children(recursive=True)
        if c.pid not in before and c.is_running() and c.status() != psutil.STATUS_ZOMBIE
    ]
    # multiprocessing's own resource tracker may stay; no spawned engine may.
    assert not [cmd for cmd in alive if "resource_tracker" not in cmd], alive


def test_an_engine_launcher_without_a_configuration_exits_cleanly():
    from lmserve.engine.launcher import EngineLauncher

    launcher = EngineLauncher()
    assert launcher.proc.is_alive() and not launcher.launched
    assert os.path.isdir(launcher.rpc_dir)  # the sockets' folder exists before any client
    launcher.cancel()
    assert launcher.proc.exitcode == 0
    assert not os.path.exists(launcher.rpc_dir)


def test_a_launched_engine_that_no_client_adopts_is_stopped_and_its_sockets_removed(
    tiny_model_dir,
):
    """`serve` sends the configuration early; if it fails before its engine client exists,
    cancel() stops the engine being built and removes the socket folder."""
    from lmserve.config import EngineConfig
    from lmserve.engine.launcher import EngineLauncher

    config = EngineConfig.from_kwargs(tiny_model_dir("llama"), device="cpu")
    launcher = EngineLauncher()
    launcher.launch(config)
    launcher.cancel()
    assert not launcher.proc.is_alive()
    assert not os.path.exists(launcher.rpc_dir)
    adopted = EngineLauncher()
    adopted.adopt()
    adopted.cancel()  # the client owns it now: cancel leaves it alone
    assert adopted.proc.is_alive() and os.path.isdir(adopted.rpc_dir)
    adopted.adopted = False
    adopted.cancel()
    assert adopted.proc.exitcode == 0


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "a", "n": "2"},  # no coercion of strings
        {"prompt": "a", "max_tokens": 1.0},  # nor of floats to ints
        {"prompt": "a", "echo": 1},
        {"prompt": [[1, 2], "x"]},
        {"prompt": [True, 2]},
        {"prompt": None},
    ],
)
def test_completion_request_rejects_wrong_types(body):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(body)


def test_requests_ignore_unknown_fields_and_accept_openai_ones():
    request = CompletionRequest.model_validate(
        {"prompt": [1, 2], "some_future_field": {"x": 1}, "user": "u", "best_of": 1}
    )
    assert request.prompt == [1, 2] and request.max_tokens == 16
    chat = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "store": False,
            "metadata": {"k": "v"},
            "parallel_tool_calls": False,
            "stream_options": {"include_usage": True, "include_obfuscation": False},
        }
    )
    assert chat.max_completion_tokens is None and chat.stream_options.include_usage


def test_validation_error_names_the_field():
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user"}], "n": "3"})
    error = from_validation_error(info.value)
    assert error.status_code == 400 and error.param == "n"
    assert "'3'" in error.message


@pytest.mark.parametrize(
    "message, param",
    [
        ("SamplingParams.top_p=2 is invalid: must be in (0, 1]", "top_p"),
        ("logit_bias token id 99999 is out of range [0, 512)", "logit_bias"),
        ("min_tokens=5 must be <= max_tokens=2", "min_tokens"),
        ("prompt token id -1 is out of range [0, 512)", "prompt"),
        ("the prompt is empty: it must have at least one token", "prompt"),
        ("something else", None),
    ],
)
def test_param_from_engine_messages(message, param):
    assert param_from_message(message) == param


def test_nullable_becomes_any_of_null():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string", "nullable": True},
            "nullable": {"type": "boolean"},  # a property named so is kept
            "b": {"$ref": "#/x", "nullable": True},
        },
    }
    converted = to_json_schema(schema)
    assert converted["properties"]["a"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert converted["properties"]["nullable"] == {"type": "boolean"}
    assert converted["properties"]["b"] == {"anyOf": [{"$ref": "#/x"}, {"type": "null"}]}


def test_chat_template_flag_takes_a_file_or_the_template(tmp_path):
    from lmserve.entrypoints.openai.server import _load_chat_template

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = tmp_path / "template.jinja"
    path.write_text(template)
    assert _load_chat_template(str(path)) == template
    assert _load_chat_template(template) == template
    assert _load_chat_template(None) is None
