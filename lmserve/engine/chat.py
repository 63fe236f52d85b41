"""Chat messages → prompt text through the tokenizer's chat template, with validation."""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "tool", "developer")

Conversation = list[dict[str, Any]]


def validate_conversation(messages: Any) -> Conversation:
    """Check roles and contents; returns messages whose content is plain text. Content may be
    a string or a list of {"type": "text", "text": ...} parts (joined with newlines)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation must be a non-empty list of messages")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: role={role!r} is invalid: must be one of {ROLES}")
        result.append({**message, "content": _text_content(i, message.get("content"))})
    return result


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
) -> list[int]:
    """Render and tokenize one validated conversation."""
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer, but skip_tokenizer_init=True")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template; pass chat_template=... (a Jinja template)"
        )
    text = tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )
    # The template already wrote any BOS it wants: don't add special tokens again.
    return tokenizer.encode(text, add_special_tokens=False)
