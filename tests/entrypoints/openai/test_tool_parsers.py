"""The tool-call parsers on model-written text (Hermes/Qwen and Llama 3 JSON), whole and
streamed, and the streamed-reply state machine that turns text deltas into OpenAI's content
and tool_calls deltas."""

from __future__ import annotations

import json

import pytest

from lmserve.entrypoints.openai.tool_parsers import (
    HermesToolParser,
    Llama3JsonToolParser,
    get_tool_parser,
)
from lmserve.entrypoints.openai.tools import StreamedReply, ToolPlan

WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}


def test_hermes_single_and_parallel_calls():
    parser = HermesToolParser()
    text = f"<tool_call>\n{json.dumps(WEATHER)}\n</tool_call>"
    reply = parser.parse(text)
    assert reply.content is None
    assert [(c.name, json.loads(c.arguments)) for c in reply.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 2})
    ]
    two = "I will look.\n" + text + '\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    reply = parser.parse(two)
    assert reply.content == "I will look."
    assert [c.name for c in reply.tool_calls] == ["get_weather", "get_time"]


def test_hermes_unclosed_last_call_and_malformed_json():
    parser = HermesToolParser()
    assert parser.parse(f"<tool_call>{json.dumps(WEATHER)}").tool_calls[0].name == "get_weather"
    bad = "<tool_call>{not json}</tool_call>"
    reply = parser.parse(bad)
    assert reply.tool_calls == [] and reply.content == bad
    assert parser.parse("just text").content == "just text"


def test_hermes_safe_content_holds_back_a_partial_tag():
    parser = HermesToolParser()
    assert parser.safe_content_length("Hello") == 5
    assert parser.safe_content_length("Hello <tool") == len("Hello ")
    assert parser.safe_content_length("Hello <tool_call>{") == len("Hello ")
    assert parser.safe_content_length("a < b") == 5


def test_llama3_json_calls():
    parser = Llama3JsonToolParser()
    text = json.dumps({"name": "get_weather", "parameters": {"city": "Oslo"}})
    reply = parser.parse(text)
    assert reply.content is None and json.loads(reply.tool_calls[0].arguments) == {"city": "Oslo"}
    several = "<|python_tag|>" + text + "; " + json.dumps({"name": "f", "parameters": {"s": "a;b"}})
    assert [c.name for c in parser.parse(several).tool_calls] == ["get_weather", "f"]
    assert parser.parse("The answer is 4.").content == "The answer is 4."
    assert parser.parse('{"no_name": 1}').tool_calls == []
    assert parser.safe_content_length(' {"na') == 0
    assert parser.safe_content_length("<|pyth") == 0
    assert parser.safe_content_length("Sure") == 4


def test_unknown_parser_is_an_error():
    assert isinstance(get_tool_parser("qwen"), HermesToolParser)
    with pytest.raises(ValueError, match="unknown tool call parser"):
        get_tool_parser("nope")


def feed_all(reply: StreamedReply, pieces: list[str]) -> tuple[str, list[dict]]:
    content, calls = "", []
    for i, piece in enumerate(pieces):
        c, t = reply.feed(piece, finished=i == len(pieces) - 1)
        content += c or ""
        calls += t or []
    return content, calls


def test_streamed_auto_reply_sends_content_then_calls():
    call = f"<tool_call>{json.dumps(WEATHER)}</tool_call>"
    text = "Checking now. " + call
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    reply = StreamedReply(ToolPlan([], "auto"), HermesToolParser())
    content, calls = feed_all(reply, pieces)
    assert content == "Checking now. "
    assert reply.has_tool_calls and calls[0]["function"]["name"] == "get_weather"
    assert calls[0]["index"] == 0 and calls[0]["id"].startswith("call_")


def test_streamed_auto_reply_without_call_is_all_content():
    reply = StreamedReply(ToolPlan([], "auto"), HermesToolParser())
    content, calls = feed_all(reply, ["Hi ", "<tool", " no"])
    assert content == "Hi <tool no" and calls == [] and not reply.has_tool_calls


def test_streamed_named_reply_streams_arguments():
    reply = StreamedReply(ToolPlan([], "named", "get_time"), None)
    first = reply.feed('{"zone"', False)[1]
    second = reply.feed(': "UTC"}', True)[1]
    assert first[0]["function"] == {"name": "get_time", "arguments": '{"zone"'}
    assert second == [{"index": 0, "function": {"arguments": ': "UTC"}'}}]
