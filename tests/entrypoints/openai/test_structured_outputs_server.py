"""Structured outputs and tool calling through a real `lmserve serve` (a tiny random Llama on
the CPU, started with --tool-call-parser hermes), with the OpenAI client and raw HTTP:
response_format json_schema / json_object, `chat.completions.parse` with a pydantic model,
vLLM's `structured_outputs` on both endpoints, tool_choice required / named / auto (streamed and
not), tool messages going back into the template, and every bad input a 400 naming its field
while the server keeps serving.

What the "auto" tests prove: a random model never writes a tool call by itself, so its output
is forced to the Hermes syntax with a regex (`structured_outputs`); the server then parses
that text into `tool_calls` exactly as it would a real model's reply. The parser on other
texts is tested in test_tool_parsers.py."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.entrypoints.openai.conftest import start_server
from tests.structured_output.schemas import SCHEMAS
from tests.structured_output.test_engine import ascii_only_bias

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_PARAMS = SCHEMAS["tool_arguments"]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": WEATHER_PARAMS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                "required": ["zone"],
            },
        },
    },
]
SCHEMA_BY_NAME = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
HERMES_CALL = '<tool_call>{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}</tool_call>'  # fmt: skip


@pytest.fixture(scope="module")
def so_server(tiny_llama, tmp_path_factory):
    server = start_server(
        tiny_llama, "--tool-call-parser", "hermes", log_dir=tmp_path_factory.mktemp("so")
    )
    yield server
    server.stop()


def regex_escape(text: str) -> str:
    import re

    return re.escape(text)


def ascii_bias() -> dict[str, float]:
    """Keep the random model to ASCII tokens (see tests/structured_output/test_engine.py)."""
    return {str(t): b for t, b in ascii_only_bias().items()}


def chat(server, **body) -> dict:
    body = {"model": server.model, "messages": MESSAGES, "max_tokens": 200, "logit_bias": ascii_bias(), **body}  # fmt: skip
    response = server.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream_chat(server, **body) -> list[dict]:
    body = {"model": server.model, "messages": MESSAGES, "max_tokens": 200, "stream": True, "logit_bias": ascii_bias(), **body}  # fmt: skip
    chunks = []
    with server.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def streamed_tool_calls(chunks: list[dict]) -> tuple[list[dict], str | None]:
    """Tool calls assembled from deltas as OpenAI's client does, and the finish reason."""
    calls: dict[int, dict] = {}
    reason = None
    for chunk in chunks:
        for choice in chunk["choices"]:
            reason = choice["finish_reason"] or reason
            for delta in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(delta["index"], {"function": {"arguments": ""}})
                for key in ("id", "type"):
                    if key in delta:
                        call[key] = delta[key]
                function = delta["function"]
                if "name" in function:
                    call["function"]["name"] = function["name"]
                call["function"]["arguments"] += function.get("arguments", "")
    return [calls[i] for i in sorted(calls)], reason


def assert_valid_calls(calls: list[dict]) -> None:
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        name = call["function"]["name"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMA_BY_NAME[name])


# ---- response_format -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nested_object", "ref_defs", "array_of_objects", "enum_string"])
def test_response_format_json_schema(so_server, name):
    body = chat(
        so_server,
        temperature=0,
        max_tokens=320,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True},
        },  # fmt: skip
    )
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMAS[name])


def test_response_format_json_object_streamed(so_server):
    chunks = stream_chat(
        so_server,
        temperature=0,
        max_tokens=320,
        response_format={"type": "json_object"},
        structured_outputs=None,
    )
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.startswith("{")


class Weather(BaseModel):
    city: str = Field(max_length=8)
    celsius: int = Field(ge=-30, le=45)
    sky: Literal["clear", "cloudy", "rain"]


def test_openai_client_parse_with_pydantic_model(so_server):
    client = so_server.client()
    completion = client.chat.completions.parse(
        model=so_server.model,
        messages=MESSAGES,
        response_format=Weather,
        max_tokens=320,
        temperature=0,
        logit_bias=ascii_bias(),
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Weather)
    assert -30 <= parsed.celsius <= 45 and len(parsed.city) <= 8


def test_structured_outputs_extra_body_on_both_endpoints(so_server):
    client = so_server.client()
    reply = client.chat.completions.create(
        model=so_server.model, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=1,
        extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}},
    )  # fmt: skip
    assert reply.choices[0].message.content in ("sunny", "rainy")
    completion = client.completions.create(
        model=so_server.model, prompt="The phone number is", max_tokens=16, temperature=0,
        extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}},
    )  # fmt: skip
    assert len(completion.choices[0].text) == 8 and completion.choices[0].text[3] == "-"
    completion = client.completions.create(
        model=so_server.model, prompt="JSON:", max_tokens=320, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS["matrix"]}}},
    )  # fmt: skip
    jsonschema.validate(json.loads(completion.choices[0].text), SCHEMAS["matrix"])


# ---- tools ---------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tool_choice_required(so_server, temperature):
    body = chat(
        so_server, tools=TOOLS, tool_choice="required", temperature=temperature, seed=2,
        max_tokens=400,
    )  # fmt: skip
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert_valid_calls(choice["message"]["tool_calls"])


def test_tool_choice_required_streamed(so_server):
    chunks = stream_chat(
        so_server, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=400
    )
    calls, reason = streamed_tool_calls(chunks)
    assert reason == "tool_calls"
    assert_valid_calls(calls)
    assert not any(c["choices"][0]["delta"].get("content") for c in chunks if c["choices"])


def test_named_tool_choice_streams_arguments(so_server):
    choice = {"type": "function", "function": {"name": "get_time"}}
    chunks = stream_chat(so_server, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=200)
    calls, reason = streamed_tool_calls(chunks)
    assert reason == "tool_calls" and len(calls) == 1
    assert calls[0]["function"]["name"] == "get_time"
    assert_valid_calls(calls)
    argument_deltas = [
        d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls") or []
    ]
    assert len(argument_deltas) > 1  # arguments arrive as they are generated


def test_openai_client_named_tool_non_streamed(so_server):
    client = so_server.client()
    reply = client.chat.completions.create(
        model=so_server.model, messages=MESSAGES, tools=TOOLS, max_tokens=300, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)


@pytest.mark.parametrize("prefix", ["", "Let me check. "])
def test_auto_parses_a_hermes_tool_call(so_server, prefix):
    forced = {"regex": regex_escape(prefix + HERMES_CALL)}
    body = chat(
        so_server, tools=TOOLS, tool_choice="auto", temperature=0, structured_outputs=forced
    )
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == (prefix.strip() or None)
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"location": "Paris", "unit": "celsius"}


def test_auto_streamed_sends_content_then_the_call(so_server):
    forced = {"regex": regex_escape("Let me check. " + HERMES_CALL)}
    chunks = stream_chat(so_server, tools=TOOLS, temperature=0, structured_outputs=forced)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == "Let me check. "
    calls, reason = streamed_tool_calls(chunks)
    assert reason == "tool_calls"
    assert [c["function"]["name"] for c in calls] == ["get_weather"]


def test_auto_without_a_call_is_plain_content(so_server):
    body = chat(so_server, tools=TOOLS, temperature=0, max_tokens=8)
    message = body["choices"][0]["message"]
    assert "tool_calls" not in message and isinstance(message["content"], str)


def test_tool_results_go_back_into_the_conversation(so_server):
    messages = MESSAGES + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"location": "Paris", "unit": "celsius"}',
                    },
                }
            ],  # fmt: skip
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
    ]
    body = chat(so_server, messages=messages, tools=TOOLS, max_tokens=8, temperature=0)
    assert body["choices"][0]["message"]["content"] is not None


# ---- OpenAI's deprecated functions / function_call ----------------------------------------
FUNCTIONS = [t["function"] for t in TOOLS]


def test_legacy_fields_map_onto_tools_and_tool_choice():
    from lmserve.entrypoints.openai.tools import plan_tools, tool_fields

    named = tool_fields(None, None, FUNCTIONS, {"name": "get_time"})
    assert named.tools == TOOLS and named.legacy
    assert named.tool_choice == {"type": "function", "function": {"name": "get_time"}}
    plan = plan_tools(named)
    assert (plan.mode, plan.named, plan.legacy) == ("named", "get_time", True)
    assert plan_tools(tool_fields(None, None, FUNCTIONS, "none")).mode == "none"
    assert plan_tools(tool_fields(None, None, FUNCTIONS, None), parser=object()).mode == "auto"
    current = tool_fields(TOOLS, "required", None, None)
    assert (current.tools, current.tool_choice, current.legacy) == (TOOLS, "required", False)


def test_legacy_named_function_call(so_server):
    from tests.entrypoints.openai.openapi_schema import validate

    body = chat(
        so_server, functions=FUNCTIONS, function_call={"name": "get_time"}, temperature=0,
    )  # fmt: skip
    validate(body, "CreateChatCompletionResponse")
    choice = body["choices"][0]
    assert choice["finish_reason"] == "function_call"
    message = choice["message"]
    assert "tool_calls" not in message and message["content"] is None
    assert message["function_call"]["name"] == "get_time"
    jsonschema.validate(json.loads(message["function_call"]["arguments"]), SCHEMA_BY_NAME["get_time"])  # fmt: skip


def test_legacy_named_function_call_streamed(so_server):
    from tests.entrypoints.openai.openapi_schema import validate

    chunks = stream_chat(
        so_server, functions=FUNCTIONS, function_call={"name": "get_weather"}, temperature=0,
        max_tokens=300,
    )  # fmt: skip
    name, arguments, reason = None, "", None
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
        for choice in chunk["choices"]:
            assert "tool_calls" not in choice["delta"]
            reason = choice["finish_reason"] or reason
            function_call = choice["delta"].get("function_call") or {}
            name = function_call.get("name", name)
            arguments += function_call.get("arguments", "")
    assert reason == "function_call" and name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMS)


def test_legacy_auto_parses_a_hermes_tool_call_with_the_openai_client(so_server):
    client = so_server.client()
    reply = client.chat.completions.create(
        model=so_server.model, messages=MESSAGES, functions=FUNCTIONS, function_call="auto",
        max_tokens=200, temperature=0,
        extra_body={"structured_outputs": {"regex": regex_escape(HERMES_CALL)}},
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "function_call" and not choice.message.tool_calls
    assert choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"location": "Paris", "unit": "celsius"}  # fmt: skip


def test_legacy_function_call_none_and_legacy_turns_in_the_conversation(so_server):
    messages = MESSAGES + [
        {
            "role": "assistant",
            "content": None,
            "function_call": {
                "name": "get_weather",
                "arguments": '{"location": "Paris", "unit": "celsius"}',
            },
        },  # fmt: skip
        {"role": "function", "name": "get_weather", "content": '{"celsius": 21}'},
    ]
    body = chat(so_server, messages=messages, functions=FUNCTIONS, function_call="none", max_tokens=8, temperature=0)  # fmt: skip
    choice = body["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert (
        isinstance(choice["message"]["content"], str) and "function_call" not in choice["message"]
    )


def test_legacy_function_turns_render_as_tool_turns():
    from lmserve.engine.chat import validate_conversation

    converted = validate_conversation(
        [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "f", "arguments": '{"a": 1}'},
            },  # fmt: skip
            {"role": "function", "name": "f", "content": "sunny"},
        ]
    )
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
    assert converted[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert converted[2] == {"role": "tool", "name": "f", "content": "sunny", "tool_call_id": "call_1"}  # fmt: skip


LEGACY_BAD_REQUESTS = [
    ({"functions": FUNCTIONS, "tools": TOOLS}, "functions"),
    ({"function_call": {"name": "get_time"}}, "function_call"),
    ({"function_call": "auto", "tools": TOOLS, "tool_choice": "required"}, "function_call"),
    ({"functions": FUNCTIONS, "function_call": {"name": "nope"}}, "function_call"),
    ({"functions": FUNCTIONS, "function_call": "sometimes"}, "function_call"),
    ({"functions": FUNCTIONS, "function_call": "required"}, "function_call"),
    (
        {"functions": [{"name": "f", "parameters": {"type": 5}}], "function_call": {"name": "f"}},
        "functions",
    ),  # fmt: skip
    ({"functions": [{"parameters": {}}], "function_call": "none"}, "functions"),
]


@pytest.mark.parametrize("extra, param", LEGACY_BAD_REQUESTS)
def test_bad_legacy_function_fields_are_400_naming_the_field(so_server, extra, param):
    body = {"model": so_server.model, "messages": MESSAGES, "max_tokens": 4, **extra}
    response = so_server.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()


# ---- bad input -----------------------------------------------------------------------------
BAD_REQUESTS = [
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "objekt"}},
            }
        },
        "response_format",
    ),  # fmt: skip
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"not": {}}},
            }
        },
        "response_format",
    ),  # fmt: skip
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"structured_outputs": {"regex": "a(("}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= nowhere"}}, "structured_outputs"),
    ({"structured_outputs": {"colour": "red"}}, "structured_outputs"),
    ({"structured_outputs": {"json": {"$ref": "#/$defs/none"}}}, "structured_outputs"),
    (
        {
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
            "tool_choice": "required",
        },
        "tools",
    ),  # fmt: skip
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools"),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),  # fmt: skip
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    (
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        "response_format",
    ),  # fmt: skip
]


@pytest.mark.parametrize("extra, param", BAD_REQUESTS)
def test_bad_structured_inputs_are_400_naming_the_field(so_server, extra, param):
    body = {"model": so_server.model, "messages": MESSAGES, "max_tokens": 4, **extra}
    response = so_server.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert chat(so_server, max_tokens=2)["choices"][0]["message"]["content"] is not None


def test_auto_needs_a_tool_call_parser(server):
    body = {"model": server.model, "messages": MESSAGES, "max_tokens": 4, "tools": TOOLS}
    response = server.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"
    body["tool_choice"] = "none"
    assert server.post("/v1/chat/completions", json=body).status_code == 200
