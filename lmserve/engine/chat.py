"""Chat messages → prompt text through the tokenizer's chat template, with validation."""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool", "developer", "function")  # last: deprecated

Conversation = list[dict[str, Any]]


def validate_conversation(messages: Any) -> Conversation:
    """Check roles and contents; returns messages whose content is plain text. Content may be
    a string or a list of {"type": "text", "text": ...} parts (joined with newlines).
    OpenAI's deprecated function-calling turns become the tool turns they stand for: an
    assistant's `function_call` a one-call `tool_calls`, a `role: "function"` message (its
    `name` and result) a `role: "tool"` message answering that call."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation must be a non-empty list of messages")
    result = []
    last_legacy_call = None  # the id given to the latest assistant `function_call`
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: role={role!r} is invalid: must be one of {ROLES}")
        if role == "assistant" and message.get("function_call") and not message.get("tool_calls"):
            last_legacy_call = f"call_{i}"
            call = {
                "id": last_legacy_call,
                "type": "function",
                "function": message["function_call"],
            }
            message = {k: v for k, v in message.items() if k != "function_call"}
            message["tool_calls"] = [call]
        elif role == "function":
            if not isinstance(message.get("name"), str):
                raise ValueError(f"message {i}: a function message needs a string 'name'")
            message = {**message, "role": "tool", "tool_call_id": last_legacy_call or f"call_{i}"}
            role = "tool"
        content = message.get("content")
        if content is None and (role == "assistant" and message.get("tool_calls")):
            content = ""  # an assistant turn that only called tools
        converted = {**message, "content": _text_content(i, content)}
        if role == "assistant" and message.get("tool_calls"):
            converted["tool_calls"] = _template_tool_calls(i, message["tool_calls"])
        if role == "tool" and not isinstance(message.get("tool_call_id", ""), str):
            raise ValueError(f"message {i}: tool_call_id must be a string")
        result.append(converted)
    return result


def _template_tool_calls(i: int, tool_calls: Any) -> list[dict[str, Any]]:
    """OpenAI's tool calls with `arguments` parsed: chat templates render them as objects
    (`arguments | tojson`), while OpenAI sends them as JSON text (vLLM does the same)."""
    if not isinstance(tool_calls, list):
        raise ValueError(f"message {i}: tool_calls must be a list")
    calls = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"message {i}: each tool call needs a function with a name")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError:
                raise ValueError(f"message {i}: tool call arguments must be JSON text") from None
        calls.append({**call, "function": {**function, "arguments": arguments}})
    return calls


def _text_content(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError(f"message {i}: only text content parts are supported")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"message {i}: a text part needs a string 'text'")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(
        f"message {i}: content must be a string or a list of text parts, got {type(content).__name__}"
    )


def apply_chat_template(
    tokenizer: Any,
    messages: Conversation,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Render and tokenize one validated conversation; `tools` (OpenAI's function
    definitions) go to the template, which renders them its own way (or ignores them)."""
    text = render_chat_text(tokenizer, messages, chat_template, add_generation_prompt, tools)
    # The template already wrote any BOS it wants: don't add special tokens again.
    return tokenizer.encode(text, add_special_tokens=False)


def render_chat_text(
    tokenizer: Any,
    messages: Conversation,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The prompt text of one validated conversation; encode it without special tokens."""
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer, but skip_tokenizer_init=True")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template; pass chat_template=... (a Jinja template)"
        )
    return tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        tools=tools,
    )
