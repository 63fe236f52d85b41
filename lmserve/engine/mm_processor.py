"""Front-end image processing for vision-language models: images -> pixel arrays through the
model's own HF image processor, a content hash per image, and the prompt's image placeholders
expanded to one token per image embedding (as the model's HF processor does).

    "USER: <image>\\nWhat is this?"  ->  [..., <image> x 576, ..., ]   + 1 MultiModalFeature

Chat: image parts of messages (`{"type": "image_url", "image_url": {"url": ...}}`, vLLM's
`{"type": "image_pil", "image_pil": img}`) become the model's `<image>` placeholder where they
stand, and the images are loaded in order (lmserve/engine/media.py).
"""

from __future__ import annotations

import hashlib
import re
import threading
from typing import Any

import numpy as np

from lmserve.config import ModelConfig
from lmserve.core.messages import MultiModalFeature
from lmserve.engine.media import MediaError, to_image

IMAGE_PART_TYPES = ("image_url", "image_pil", "image")
# A chat template that loops over a message's content parts (HF's LLaVA templates) wants the
# parts themselves; others get the placeholder in the text.
_ITERATES_CONTENT = re.compile(
    r"for \w+ in (message|m)\[['\"]content['\"]\]|\[['\"]content['\"]\]\s*\|\s*selectattr"
)


class MultiModalProcessor:
    """Images of one prompt -> (expanded token ids, features). Thread-safe (the server runs
    it in a worker thread)."""

    def __init__(self, model_config: ModelConfig, tokenizer: Any | None) -> None:
        from lmserve.model.models.llava import image_token_id

        self.model_config = model_config
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id(model_config.hf_config)
        self.limit = model_config.limit_mm_per_prompt["image"]
        self._image_processor = None
        self._lock = threading.Lock()

    @property
    def image_placeholder(self) -> str:
        """The placeholder text the tokenizer turns into the image token."""
        if self.tokenizer is None:
            return "<image>"
        return self.tokenizer.convert_ids_to_tokens(self.image_token_id)

    def image_processor(self) -> Any:
        with self._lock:
            if self._image_processor is None:
                from transformers import AutoImageProcessor

                path = self.model_config.model_path or self.model_config.model
                self._image_processor = AutoImageProcessor.from_pretrained(path)
            return self._image_processor

    def check_count(self, num_images: int) -> None:
        if num_images > self.limit:
            raise MediaError(
                f"the prompt has {num_images} images, more than this server allows "
                f"(--limit-mm-per-prompt image={self.limit})"
            )

    def process(
        self, token_ids: list[int], images: list[Any]
    ) -> tuple[list[int], list[MultiModalFeature]]:
        """Expand each image placeholder of `token_ids` (one `<image>` token, or an already
        expanded run) and preprocess the images; ValueError on any mismatch."""
        self.check_count(len(images))
        runs = _placeholder_runs(token_ids, self.image_token_id)
        if len(runs) != len(images):
            raise ValueError(
                f"the prompt has {len(runs)} image placeholders ({self.image_placeholder}) "
                f"but {len(images)} images were given"
            )
        if not images:
            return token_ids, []
        pixels = self._preprocess([to_image(image) for image in images])  # [n, C, H, W]
        tokens_per_image = self.model_config.max_tokens_per_image
        expanded: list[int] = []
        features: list[MultiModalFeature] = []
        last = 0
        for (start, length), pixel_values in zip(runs, pixels):
            if length not in (1, tokens_per_image):
                raise ValueError(
                    f"an image placeholder run of {length} tokens: give one {self.image_placeholder}"
                    f" per image (or exactly {tokens_per_image})"
                )
            expanded += token_ids[last:start]
            features.append(
                MultiModalFeature(
                    identifier=_content_hash(pixel_values),
                    offset=len(expanded),
                    length=tokens_per_image,
                    pixel_values=pixel_values,
                )
            )
            expanded += [self.image_token_id] * tokens_per_image
            last = start + length
        expanded += token_ids[last:]
        return expanded, features

    def _preprocess(self, images: list[Any]) -> np.ndarray:
        try:
            out = self.image_processor()(images=images, return_tensors="np")
        except (ValueError, OSError, TypeError) as e:
            raise MediaError(f"the image processor rejected an image: {e}") from None
        pixels = np.ascontiguousarray(out["pixel_values"], dtype=np.float32)  # [n, C, H, W]
        return pixels


def _placeholder_runs(token_ids: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """(start, length) of every run of consecutive image tokens."""
    runs: list[tuple[int, int]] = []
    i, n = 0, len(token_ids)
    while i < n:
        if token_ids[i] == image_token_id:
            j = i
            while j < n and token_ids[j] == image_token_id:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def _content_hash(pixel_values: np.ndarray) -> str:
    """sha256 of the preprocessed pixels and their shape: equal images, equal hash."""
    digest = hashlib.sha256(repr(pixel_values.shape).encode())
    digest.update(memoryview(pixel_values).cast("B"))
    return digest.hexdigest()


# ---- chat ----------------------------------------------------------------------------------
def has_image_parts(messages: Any) -> bool:
    if not isinstance(messages, list):
        return False
    return any(
        isinstance(m, dict)
        and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES for p in m["content"])
        for m in messages
    )


def extract_images(
    messages: list[dict[str, Any]], placeholder: str, as_parts: bool
) -> tuple[list[dict[str, Any]], list[Any]]:
    """(messages with each image part replaced by the placeholder, the images in order: URL
    strings or PIL images). `as_parts`: keep list contents, images as {"type": "image"} (for
    templates that loop over parts); else the placeholder becomes a text part."""
    images: list[Any] = []
    result = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            result.append(message)
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in IMAGE_PART_TYPES:
                parts.append(part)
                continue
            images.append(_image_of_part(i, part))
            parts.append({"type": "image"} if as_parts else {"type": "text", "text": placeholder})
        result.append({**message, "content": parts})
    return result, images


def _image_of_part(i: int, part: dict[str, Any]) -> Any:
    kind = part["type"]
    if kind == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url:
            raise MediaError(f"message {i}: an image_url part needs image_url.url (a string)")
        return url
    value = part.get(kind)
    if value is None:
        raise MediaError(f"message {i}: an {kind} part needs its {kind!r} field")
    return value


def template_iterates_content(tokenizer: Any, chat_template: str | None) -> bool:
    template = chat_template or getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and bool(_ITERATES_CONTENT.search(template))


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    chat_template: str | None,
    add_generation_prompt: bool,
    placeholder: str,
) -> tuple[list[int], list[Any]]:
    """A conversation with image parts -> (prompt token ids with one placeholder per image,
    the images in order as URLs or PIL images). Raises ValueError on a bad conversation."""
    from lmserve.engine.chat import ROLES, apply_chat_template, validate_conversation

    as_parts = template_iterates_content(tokenizer, chat_template)
    rendered, images = extract_images(messages, placeholder, as_parts)
    if not as_parts:
        return apply_chat_template(
            tokenizer, validate_conversation(rendered), chat_template, add_generation_prompt
        ), images
    for i, message in enumerate(rendered):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"message {i}: role must be one of {ROLES}")
    return apply_chat_template(tokenizer, rendered, chat_template, add_generation_prompt), images
