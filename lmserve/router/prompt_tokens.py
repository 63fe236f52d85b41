"""The prompt token ids an engine will see for a request, computed in the router (no torch).

    tokens = PromptTokenizer.load("model-folder" or "tokenizer.json", chat_template=None)
    tokens.for_body(request_json)    completions: encode(prompt) with special tokens;
                                     chat: the chat template over `messages`, then encode
                                     without special tokens (the template wrote them)

It does what the engine's front-end does (lmserve/entrypoints/openai, lmserve/engine/chat.py):
the same conversation check, transformers' own Jinja renderer with the tokenizer's special
tokens, and the Rust `tokenizers` encoder that AutoTokenizer wraps. Equal ids mean equal block
hashes, which is what kv-aware routing scores with.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from lmserve.engine.chat import validate_conversation

_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
            "mask_token")  # fmt: skip


@dataclass
class PromptTokenizer:
    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: str | None
    special_tokens: dict[str, str]

    @classmethod
    def load(cls, path: str, chat_template: str | None = None) -> PromptTokenizer:
        """From a model folder (tokenizer.json + tokenizer_config.json) or a tokenizer.json
        (whose folder may hold the config). `chat_template`: a file or the template itself,
        as the engine's --chat-template."""
        from tokenizers import Tokenizer

        folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ValueError(f"--tokenizer {path!r}: no tokenizer.json there")
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        special = _special_tokens(config)
        for key, value in _special_tokens(
            _read_json(os.path.join(folder, "special_tokens_map.json"))
        ).items():
            special.setdefault(key, value)
        template = _template_text(chat_template) or _config_template(config, folder)
        if template is not None:
            _renderer()  # import it now (0.6 s), not on the first chat request
        return cls(Tokenizer.from_file(file), template, special)

    def for_body(self, body: dict[str, Any]) -> list[int] | None:
        """The prompt ids of a completions or chat body; None when it has no single prompt the
        router can tokenize (a batch of several, or a malformed body: the engine will say)."""
        messages = body.get("messages")
        if messages is not None:
            return self.chat(messages, bool(body.get("add_generation_prompt", True)))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self._encode(prompt, add_special_tokens=True)
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            return prompt
        return None

    def chat(self, messages: Any, add_generation_prompt: bool = True) -> list[int] | None:
        if self.chat_template is None:
            return None
        try:
            conversation = validate_conversation(messages)
            conversation = [{k: v for k, v in m.items() if v is not None} for m in conversation]
            rendered, _ = _renderer()(
                conversations=[conversation],
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except Exception:  # the engine answers a bad conversation with its own 400
            return None
        return self._encode(rendered[0], add_special_tokens=False)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """The ids `encode` gives, without computing offsets (half the time on long prompts)."""
        batch = self.tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)
        return batch[0].ids


def _renderer():
    """transformers' own chat-template renderer (its jinja environment, filters and globals);
    this module of transformers imports neither torch nor a model."""
    from transformers.utils.chat_template_utils import render_jinja_template

    return render_jinja_template


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    found = {}
    for key in _SPECIAL:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            found[key] = value
    return found


def _template_text(value: str | None) -> str | None:
    if value is None or not os.path.isfile(value):
        return value
    with open(value, encoding="utf-8") as f:
        return f.read()


def _config_template(config: dict[str, Any], folder: str) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    return (
        _template_text(os.path.join(folder, "chat_template.jinja"))
        if os.path.isfile(os.path.join(folder, "chat_template.jinja"))
        else None
    )
