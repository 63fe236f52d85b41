"""Chat requests' structured outputs and tool calling, OpenAI's way:

    response_format  {"type": "json_object"}                    -> any JSON object
                     {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    structured_outputs (vLLM's extra body field)                -> as SamplingParams spells it
    tools + tool_choice
        "none"       tools are not offered (nor rendered into the prompt)
        "auto"       tools are rendered; the reply is parsed by --tool-call-parser
        "required"   the output is constrained to a JSON list of >= 1 calls
                     [{"name": ..., "parameters": {...}}] whose parameters match each
                     function's JSON Schema
        {"type": "function", "function": {"name": N}}
                     the output is constrained to N's arguments object
    functions + function_call (OpenAI's deprecated forms of tools + tool_choice)
                     `functions: [F]` is `tools: [{"type": "function", "function": F}]`;
                     `function_call` "none" / "auto" / {"name": N} is tool_choice "none" /
                     "auto" / N; the reply then carries the legacy `function_call` (the first
                     call) and finish_reason "function_call" instead of `tool_calls`

Every problem is a 400 naming the field (`response_format`, `tools`, `tool_choice`,
`functions`, `function_call`, `structured_outputs`); the schema checks are
lmserve/structured_output/validate.py's.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from lmserve.entrypoints.openai.errors import invalid_request
from lmserve.entrypoints.openai.tool_parsers import ParsedReply, ParsedToolCall, ToolParser
from lmserve.sampling_params import StructuredOutputsParams
from lmserve.structured_output.validate import validate_structured_outputs


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a chat request does with tools."""

    tools: list[dict[str, Any]] | None  # rendered into the prompt (None: not offered)
    mode: str  # "none" | "auto" | "required" | "named"
    named: str | None = None  # the forced function's name (mode "named")
    legacy: bool = False  # asked with `functions`: reply with `function_call`


@dataclass(frozen=True, slots=True)
class ToolFields:
    """A chat request's tool fields, in their current form whichever form it used."""

    tools: list[dict[str, Any]] | None
    tool_choice: Any
    legacy: bool = False  # given as `functions` / `function_call`

    @property
    def names(self) -> tuple[str, str]:  # the request's own field names, for errors
        return ("functions", "function_call") if self.legacy else ("tools", "tool_choice")


def tool_fields(tools: Any, tool_choice: Any, functions: Any, function_call: Any) -> ToolFields:
    """`tools` / `tool_choice`, or OpenAI's deprecated `functions` / `function_call` mapped
    onto them (OpenAI documents each as the other's deprecated equivalent). Mixing the two
    forms is a 400."""
    if functions is None:
        if function_call not in (None, "none"):
            raise invalid_request("function_call needs functions", "function_call")
        return ToolFields(tools, tool_choice)
    if tools is not None:
        raise invalid_request(
            "functions is the deprecated form of tools: send one or the other", "functions"
        )
    if tool_choice is not None:
        raise invalid_request(
            "function_call (the deprecated form of tool_choice) goes with functions, "
            "tool_choice with tools: send one form",
            "function_call" if function_call is not None else "tool_choice",
        )
    if not isinstance(functions, list) or not all(isinstance(f, dict) for f in functions):
        raise invalid_request("functions must be a list of function objects", "functions")
    if function_call is None or function_call in ("none", "auto"):
        choice = function_call
    elif isinstance(function_call, dict) and isinstance(function_call.get("name"), str):
        choice = {"type": "function", "function": {"name": function_call["name"]}}
    else:
        raise invalid_request(
            "function_call must be 'none', 'auto' or {\"name\": ...}", "function_call"
        )
    return ToolFields([{"type": "function", "function": f} for f in functions], choice, True)


def structured_outputs_for(
    response_format: dict[str, Any] | None,
    extra: dict[str, Any] | None,
    plan: ToolPlan | None = None,
    backend: str = "xgrammar",
) -> StructuredOutputsParams | None:
    """The request's constraint (at most one source may set one), checked for `backend`
    (the engine's structured-outputs backend)."""
    sources = []
    if plan is not None and plan.mode in ("required", "named"):
        sources.append(("tool_choice", _tool_choice_constraint(plan)))
    if response_format is not None:
        params = _from_response_format(response_format)
        if params is not None:
            sources.append(("response_format", params))
    if extra is not None:
        sources.append(("structured_outputs", _build(extra, "structured_outputs")))
    if len(sources) > 1:
        names = " and ".join(name for name, _ in sources)
        raise invalid_request(f"{names} both constrain the output: use one", sources[-1][0])
    if not sources:
        return None
    field, params = sources[0]
    check(params, field, backend)
    return params


def check(params: StructuredOutputsParams, field: str, backend: str = "xgrammar") -> None:
    try:
        validate_structured_outputs(params, backend)
    except ValueError as e:
        raise invalid_request(f"{field}: {e}", field) from None


def _build(fields: dict[str, Any], param: str) -> StructuredOutputsParams:
    if not isinstance(fields, dict):
        raise invalid_request(f"{param} must be an object", param)
    try:
        return StructuredOutputsParams(**fields)
    except TypeError as e:
        raise invalid_request(f"{param}: {e}", param) from None
    except ValueError as e:
        raise invalid_request(f"{param}: {e}", param) from None


def _from_response_format(fmt: dict[str, Any]) -> StructuredOutputsParams | None:
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise invalid_request(
            f"response_format type {kind!r} is invalid: must be 'text', 'json_object' or "
            "'json_schema'",
            "response_format",
        )
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise invalid_request(
            "response_format.json_schema must be an object with a 'schema' object",
            "response_format",
        )
    schema = spec.get("schema") or {"type": "object"}
    return _build({"json": schema}, "response_format")


# ---- tools ---------------------------------------------------------------------------------
def plan_tools(
    tools: list[dict[str, Any]] | ToolFields | None,
    tool_choice: Any = None,
    parser: ToolParser | None = None,
    backend: str = "xgrammar",
) -> ToolPlan | None:
    """Validate `tools` and `tool_choice` (or a request's ToolFields); None when the request
    has no tools. Errors name the fields the request used."""
    fields = tools if isinstance(tools, ToolFields) else ToolFields(tools, tool_choice)
    tools, tool_choice, legacy = fields.tools, fields.tool_choice, fields.legacy
    tools_field, choice_field = fields.names
    if not tools:
        if tool_choice not in (None, "none"):
            raise invalid_request(f"{choice_field} needs {tools_field}", choice_field)
        return None
    names = [_check_tool(i, tool, tools_field, backend) for i, tool in enumerate(tools)]
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan(None, "none", legacy=legacy)
    if choice == "auto":
        if parser is None:
            raise invalid_request(
                f'{choice_field} "auto" needs the server started with --tool-call-parser '
                '(hermes, llama3_json); use "required" or a named function instead',
                choice_field,
            )
        return ToolPlan(tools, "auto", legacy=legacy)
    if choice == "required":
        return ToolPlan(tools, "required", legacy=legacy)
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise invalid_request(
                f"{choice_field} names function {name!r}, which is not among {tools_field} {names}",
                choice_field,
            )
        return ToolPlan(tools, "named", name, legacy=legacy)
    raise invalid_request(
        "tool_choice must be 'none', 'auto', 'required' or "
        '{"type": "function", "function": {"name": ...}}',
        "tool_choice",
    )


def _check_tool(i: int, tool: Any, field: str = "tools", backend: str = "xgrammar") -> str:
    """`field`: "functions" when the request used the deprecated form (errors then name
    `functions[i]`, whose entries are the function objects themselves)."""
    where = f"{field}[{i}]" if field == "functions" else f"{field}[{i}].function"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise invalid_request(
            f"{field}[{i}] must be {{'type': 'function', 'function': ...}}", field
        )
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise invalid_request(f"{where} needs a string 'name'", field)
    parameters = function.get("parameters", {"type": "object"})
    if not isinstance(parameters, dict):
        raise invalid_request(f"{where}.parameters must be a JSON Schema", field)
    try:
        validate_structured_outputs(
            StructuredOutputsParams(json=parameters or {"type": "object"}), backend
        )
    except ValueError as e:
        raise invalid_request(f"{where}.parameters: {e}", field) from None
    return function["name"]


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object"}


def _tool_choice_constraint(plan: ToolPlan) -> StructuredOutputsParams:
    if plan.mode == "named":
        tool = next(t for t in plan.tools if t["function"]["name"] == plan.named)
        return StructuredOutputsParams(json=_parameters(tool))
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t["function"]["name"]]},
                "parameters": _parameters(t),
            },
            "required": ["name", "parameters"],
        }
        for t in plan.tools
    ]
    return StructuredOutputsParams(json={"type": "array", "minItems": 1, "items": {"anyOf": calls}})


def parse_reply(text: str, plan: ToolPlan | None, parser: ToolParser | None) -> ParsedReply:
    """The finished reply as content and tool calls."""
    if plan is None or plan.mode == "none":
        return ParsedReply(text, [])
    if plan.mode == "named":
        return ParsedReply(None, [ParsedToolCall(plan.named, text)])
    if plan.mode == "required":
        try:
            calls = json.loads(text)
            return ParsedReply(
                None,
                [
                    ParsedToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
                    for c in calls
                ],
            )
        except (ValueError, TypeError, KeyError):
            return ParsedReply(text, [])  # cut short by max_tokens: not a complete call list
    return parser.parse(text)


def tool_call_dicts(calls: list[ParsedToolCall]) -> list[dict[str, Any]]:
    """OpenAI's `tool_calls` entries, with fresh ids."""
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for call in calls
    ]


def legacy_function_call(calls: list[ParsedToolCall]) -> dict[str, str]:
    """The deprecated `message.function_call` for a reply's calls: the first one (the legacy
    API calls one function per reply)."""
    return {"name": calls[0].name, "arguments": calls[0].arguments}


def legacy_function_call_delta(entries: list[dict] | None) -> dict[str, str] | None:
    """The deprecated `delta.function_call` for streamed tool_calls entries: call 0's name
    and arguments pieces (no id, no type); None when the entries carry nothing of call 0."""
    for entry in entries or []:
        if entry["index"] == 0:
            return {k: v for k, v in entry["function"].items() if k in ("name", "arguments")}
    return None


class StreamedReply:
    """One streamed choice: content as it comes; tool calls as OpenAI streams them. A named
    function's arguments stream as they are generated; calls that must be parsed ("auto",
    "required") are sent whole when the reply ends, while "auto" streams the content that
    cannot be part of a call."""

    def __init__(self, plan: ToolPlan | None, parser: ToolParser | None) -> None:
        self.mode = plan.mode if plan is not None else "none"
        self.plan, self.parser = plan, parser
        self.text = ""  # everything generated so far
        self.sent = 0  # characters of `text` sent as content
        self.call_id: str | None = None  # the named function's call, once started
        self.has_tool_calls = False

    def feed(self, new_text: str, finished: bool) -> tuple[str | None, list[dict] | None]:
        """(content delta, tool_calls delta entries) for the newly generated text."""
        self.text += new_text
        if self.mode == "none":
            return new_text or None, None
        if self.mode == "named":
            return None, self._named_delta(new_text)
        if not finished:
            if self.mode == "auto":
                return self._content_up_to(self.parser.safe_content_length(self.text)), None
            return None, None
        reply = parse_reply(self.text, self.plan, self.parser)
        if not reply.tool_calls:
            return self._content_up_to(len(self.text)), None
        self.has_tool_calls = True
        content = None
        if self.mode == "auto":
            content = self._content_up_to(self.parser.safe_content_length(self.text))
        entries = [{"index": i, **call} for i, call in enumerate(tool_call_dicts(reply.tool_calls))]
        return content, entries

    def _named_delta(self, new_text: str) -> list[dict] | None:
        if not new_text:
            return None
        self.has_tool_calls = True
        if self.call_id is None:
            self.call_id = f"call_{uuid.uuid4().hex[:24]}"
            function = {"name": self.plan.named, "arguments": new_text}
            return [{"index": 0, "id": self.call_id, "type": "function", "function": function}]
        return [{"index": 0, "function": {"arguments": new_text}}]

    def _content_up_to(self, end: int) -> str | None:
        if end <= self.sent:
            return None
        chunk, self.sent = self.text[self.sent : end], end
        return chunk
