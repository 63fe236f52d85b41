"""Parsers of the tool calls a model writes in its own syntax (`tool_choice: "auto"`), chosen by
`lmserve serve --tool-call-parser NAME` as in vLLM:

    hermes       Hermes / Qwen2.5 / Qwen3:  <tool_call>{"name": ..., "arguments": {...}}</tool_call>
                 (any number of them; text before the first is the message content)
    llama3_json  Llama 3.x: the whole reply is {"name": ..., "parameters": {...}} (optionally
                 after <|python_tag|>; several calls separated by ";")

A parser sees the generated text, never token ids. While streaming, `safe_content_length`
says how much of the text so far is surely content (not the start of a tool call), so the
server can stream content and hold back only what may become a call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    name: str
    arguments: str  # JSON text of the arguments object


@dataclass(frozen=True, slots=True)
class ParsedReply:
    content: str | None  # text outside the calls (None when empty)
    tool_calls: list[ParsedToolCall]


class ToolParser:
    name = ""

    def parse(self, text: str) -> ParsedReply:
        """The calls in a finished reply; a reply without (well-formed) calls is content."""
        raise NotImplementedError

    def safe_content_length(self, text: str) -> int:
        """How many leading characters of a partial reply are content for sure."""
        raise NotImplementedError


class HermesToolParser(ToolParser):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> ParsedReply:
        start = text.find(self.START)
        if start < 0:
            return ParsedReply(text or None, [])
        calls = []
        for body in self._CALL.findall(text[start:]):
            call = _call_from_json(body, ("arguments", "parameters"))
            if call is None:
                return ParsedReply(text, [])  # malformed: hand back the text as it is
            calls.append(call)
        return ParsedReply(text[:start].strip() or None, calls)

    def safe_content_length(self, text: str) -> int:
        start = text.find(self.START)
        if start >= 0:
            return start
        return len(text) - _partial_suffix(text, self.START)


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"

    def parse(self, text: str) -> ParsedReply:
        body = text.strip().removeprefix(self.PYTHON_TAG).strip()
        if not body.startswith("{"):
            return ParsedReply(text or None, [])
        calls = []
        for part in _split_json_objects(body):
            call = _call_from_json(part, ("parameters", "arguments"))
            if call is None:
                return ParsedReply(text, [])
            calls.append(call)
        return ParsedReply(None, calls) if calls else ParsedReply(text or None, [])

    def safe_content_length(self, text: str) -> int:
        body = text.lstrip()
        if not body or body.startswith(("{", self.PYTHON_TAG)) or self.PYTHON_TAG.startswith(body):
            return 0  # may become a call: hold everything
        return len(text)


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    HermesToolParser.name: HermesToolParser,
    "qwen": HermesToolParser,  # Qwen2.5 / Qwen3 write the Hermes format
    Llama3JsonToolParser.name: Llama3JsonToolParser,
}


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}: choose one of {sorted(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()


def _call_from_json(body: str, argument_keys: tuple[str, ...]) -> ParsedToolCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments: Any = next((value[k] for k in argument_keys if k in value), {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        return ParsedToolCall(value["name"], arguments)
    return ParsedToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _split_json_objects(text: str) -> list[str]:
    """`{...}; {...}` -> the objects' texts (a decoder walk, so ';' inside strings is safe)."""
    decoder, parts, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        try:
            _, end = decoder.raw_decode(text, pos)
        except ValueError:
            return [text]  # not a sequence of objects: let the caller reject it
        parts.append(text[pos:end])
        pos = end
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
    return parts


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
