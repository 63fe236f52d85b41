"""The prompt token ids an engine will see for a request, computed in the router (no torch).

    tokens = PromptTokenizer.load("model-folder" or "tokenizer.json", chat_template=None)
    tokens.for_body(request_json)    completions: encode(prompt) with special tokens;
                                     chat: the chat template over `messages`, then encode
                                     without special tokens (the template wrote them)

It does what the engine's front-end does (lmserve/entrypoints/openai, lmserve/engine/chat.py):
the same conversation check, transformers' own Jinja renderer with the tokenizer's special
tokens, and the Rust `tokenizers` encoder that AutoTokenizer wraps. Equal ids mean equal block
hashes, which is what kv-aware routing scores with.

Encoding is most of the router's time on a long chat, and a conversation resends its history
every round. `tokenizers` cuts the text at added tokens (`<|im_start|>`, ...) before anything
else and encodes the pieces between them independently, so a rendered chat is encoded piece by
piece and each piece's ids are remembered (`SegmentEncoder`): a returning conversation encodes
only its new message. Whether piecewise equals whole is checked, not assumed: on a probe text
at start-up, then on the first requests and one in 64 after; a mismatch turns the pieces off
for good (and a wrong guess could only cost a routing choice, never an engine's output).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from lmserve.engine.chat import validate_conversation

logger = logging.getLogger(__name__)

_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
            "mask_token")  # fmt: skip


class SegmentEncoder:
    """Encodes text without special tokens piece by piece between added tokens, remembering
    the ids of up to `max_pieces` pieces (least recently used out); see the module docstring."""

    def __init__(self, tokenizer: Any, max_pieces: int = 8192, check_every: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_pieces = max_pieces
        self.check_every = check_every
        self.pieces: OrderedDict[tuple[str, bool], list[int]] = OrderedDict()
        self.calls = 0
        self.splitter, self.added = _added_token_splitter(tokenizer)
        if self.splitter is not None and not self._probe_agrees():
            self.splitter = None

    @property
    def enabled(self) -> bool:
        return self.splitter is not None

    def encode(self, text: str) -> list[int]:
        if self.splitter is None:
            return self.whole(text)
        ids = self._by_pieces(text)
        self.calls += 1
        if self.calls <= 8 or self.calls % self.check_every == 0:
            whole = self.whole(text)
            if whole != ids:
                logger.warning("router tokenizer: piecewise encoding differs from whole; off")
                self.splitter = None
                return whole
        return ids

    def whole(self, text: str) -> list[int]:
        """The ids `encode` gives, without computing offsets (half the time on long prompts)."""
        return self.tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids

    def _by_pieces(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(self.splitter.split(text)):
            if i % 2:  # the capture group: an added token
                ids.append(self.added[piece])
            elif piece:
                ids += self._piece(piece, first=i == 0)
        return ids

    def _piece(self, piece: str, first: bool) -> list[int]:
        key = (piece, first)  # a pre-tokenizer may treat the text's start differently
        ids = self.pieces.get(key)
        if ids is not None:
            self.pieces.move_to_end(key)
            return ids
        ids = self.whole(piece)
        self.pieces[key] = ids
        if len(self.pieces) > self.max_pieces:
            self.pieces.popitem(last=False)
        return ids

    def _probe_agrees(self) -> bool:
        tokens = list(self.added)[:4]
        probe = "Hello world. " + " text  in between\n".join(tokens) + " the end\n\n a"
        return self._by_pieces(probe) == self.whole(probe)


def _added_token_splitter(tokenizer: Any) -> tuple[re.Pattern | None, dict[str, int]]:
    """A regex that splits text at the tokenizer's added tokens (kept, as the odd items), and
    their ids; (None, {}) when an added token strips or matches around itself (lstrip, rstrip,
    single_word) or has to be normalized first: then only whole-text encoding is exact."""
    added = {}
    for token_id, token in tokenizer.get_added_tokens_decoder().items():
        if token.lstrip or token.rstrip or token.single_word or token.normalized:
            return None, {}
        added[token.content] = token_id
    if not added or getattr(tokenizer, "encode_special_tokens", False):
        return None, {}
    alternatives = sorted(added, key=len, reverse=True)  # the longest match first
    return re.compile("(" + "|".join(map(re.escape, alternatives)) + ")"), added


@dataclass
class PromptTokenizer:
    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: str | None
    special_tokens: dict[str, str]
    segments: SegmentEncoder | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.segments is None:
            self.segments = SegmentEncoder(self.tokenizer)

    @classmethod
    def load(cls, path: str, chat_template: str | None = None) -> PromptTokenizer:
        """From a model folder (tokenizer.json + tokenizer_config.json), a tokenizer.json
        (whose folder may hold the config) or the .gguf file the engines serve (its tokenizer
        metadata, built as the engine's converter builds it). `chat_template`: a file or the
        template itself, as the engine's --chat-template."""
        from tokenizers import Tokenizer

        if path.lower().endswith(".gguf") and os.path.isfile(path):
            return cls._load_gguf(path, chat_template)
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

    @classmethod
    def _load_gguf(cls, path: str, chat_template: str | None) -> PromptTokenizer:
        from lmserve.gguf_tokenizer import gguf_tokenizer_folder

        try:
            folder = gguf_tokenizer_folder(path)
        except Exception as e:  # not a GGUF, truncated, no tokenizer metadata
            raise ValueError(
                f"--tokenizer {path!r}: cannot read a tokenizer from this GGUF file "
                f"({type(e).__name__}: {e})"
            ) from e
        try:
            return cls.load(folder, chat_template)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

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
        text = self._render(messages, add_generation_prompt)
        return None if text is None else self._encode(text, add_special_tokens=False)

    def render_chat(self, body: dict[str, Any]) -> str | None:
        """The chat template's text for a chat body (None as in `chat`)."""
        return self._render(body["messages"], bool(body.get("add_generation_prompt", True)))

    def _render(self, messages: Any, add_generation_prompt: bool) -> str | None:
        """The chat template's text, or None (no template, or a conversation the engine will
        refuse with its own 400)."""
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
        return rendered[0]

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """The ids `encode` gives, without computing offsets (half the time on long prompts)."""
        if not add_special_tokens:
            return self.segments.encode(text)
        batch = self.tokenizer.encode_batch_fast([text], add_special_tokens=True)
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
