"""Front-end input processing: validate prompts, tokenize, build EngineCoreRequests."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from lmserve.config import ModelConfig
from lmserve.core.messages import EngineCoreRequest, MultiModalFeature
from lmserve.sampling_params import SamplingParams

PromptType = str | dict[str, Any]


class InputProcessor:
    def __init__(self, model_config: ModelConfig, tokenizer: Any | None) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.eos_token_id, self.extra_eos_ids = _eos_token_ids(model_config, tokenizer)
        self.mm_processor = None  # images -> pixels and placeholders (vision-language models)
        if model_config.is_multimodal:
            from lmserve.engine.mm_processor import MultiModalProcessor

            self.mm_processor = MultiModalProcessor(model_config, tokenizer)

    def process(
        self, request_id: str, prompt: PromptType, params: SamplingParams, priority: int = 0
    ) -> tuple[str | None, EngineCoreRequest]:
        """(prompt text or None, the engine request). Raises ValueError on bad input."""
        text, token_ids = self._tokenize(prompt)
        mm_features = None
        if isinstance(prompt, dict):
            token_ids, mm_features = self._multimodal(prompt, token_ids)
        self._validate_token_ids(token_ids)
        self._validate_params_token_ids(params)
        if params.structured_outputs is not None:
            self._validate_structured_outputs(params)
        if self.extra_eos_ids and not params.ignore_eos:
            stop_ids = list(dict.fromkeys(params.stop_token_ids + self.extra_eos_ids))
            params = dataclasses.replace(params, stop_token_ids=stop_ids)
        request = EngineCoreRequest(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_id=self.eos_token_id,
            arrival_time=time.monotonic(),
            priority=priority,
            cache_salt=prompt.get("cache_salt") if isinstance(prompt, dict) else None,
            mm_features=mm_features,
        )
        return text, request

    def _multimodal(
        self, prompt: dict[str, Any], token_ids: list[int]
    ) -> tuple[list[int], list[MultiModalFeature] | None]:
        """`multi_modal_data` ({"image": image or [images]}): placeholders expanded, images
        preprocessed. `multi_modal_features`: already done (the server does it in a thread)."""
        if "multi_modal_features" in prompt:
            return token_ids, prompt["multi_modal_features"] or None
        data = prompt.get("multi_modal_data")
        if data is None:
            if self.mm_processor is not None:  # image tokens with no image are an error too
                self.mm_processor.process(token_ids, [])
            return token_ids, None
        if not isinstance(data, dict) or set(data) - {"image"}:
            raise ValueError("multi_modal_data must be {'image': image or [images]}")
        images = data.get("image")
        images = [] if images is None else images if isinstance(images, list | tuple) else [images]
        if images and self.mm_processor is None:
            raise ValueError(
                f"model {self.model_config.model!r} is a text-only model: it does not accept images"
            )
        if self.mm_processor is None:
            return token_ids, None
        token_ids, features = self.mm_processor.process(token_ids, list(images))
        return token_ids, features or None

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "a text prompt needs a tokenizer, but skip_tokenizer_init=True: pass "
                    "{'prompt_token_ids': [...]} instead"
                )
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            token_ids = prompt["prompt_token_ids"]
            if not isinstance(token_ids, list | tuple):
                raise ValueError(f"prompt_token_ids must be a list of ints, got {type(token_ids)}")
            return prompt.get("prompt"), list(token_ids)
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self._tokenize(prompt["prompt"])
        raise ValueError(
            "a prompt must be a string, {'prompt': str} or {'prompt_token_ids': [int, ...]}; "
            f"got {type(prompt).__name__}"
        )

    def _validate_structured_outputs(self, params: SamplingParams) -> None:
        from lmserve.structured_output.validate import validate_structured_outputs

        if self.tokenizer is None:
            raise ValueError(
                "SamplingParams.structured_outputs needs a tokenizer, but skip_tokenizer_init=True"
            )
        validate_structured_outputs(
            params.structured_outputs, self.model_config.structured_outputs_backend
        )

    def _validate_params_token_ids(self, params: SamplingParams) -> None:
        vocab_size = self.model_config.vocab_size
        for token_id in params.stop_token_ids:
            _check_vocab("stop_token_ids", token_id, vocab_size)
        for token_id in params.logit_bias or {}:
            _check_vocab("logit_bias", token_id, vocab_size)

    def _validate_token_ids(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty: it must have at least one token")
        vocab_size = self.model_config.vocab_size
        # all plain ints within the vocabulary, checked in C (a burst's prompts pass here on
        # the event loop); only a failure walks the list for the id to name
        if set(map(type, token_ids)) != {int} or not (
            0 <= min(token_ids) and max(token_ids) < vocab_size
        ):
            for t in token_ids:
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
                    raise ValueError(f"prompt token id {t!r} is out of range [0, {vocab_size})")
        max_len = self.model_config.max_model_len
        if len(token_ids) > max_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, more than max_model_len={max_len}"
            )


def _check_vocab(what: str, token_id: int, vocab_size: int) -> None:
    if not 0 <= token_id < vocab_size:
        raise ValueError(f"{what} token id {token_id} is out of range [0, {vocab_size})")


def _eos_token_ids(
    model_config: ModelConfig, tokenizer: Any | None
) -> tuple[int | None, list[int]]:
    """The primary EOS id, plus any further EOS ids the model declares (treated as stop ids)."""
    ids: list[int] = []
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    cfg_eos = getattr(model_config.text_config, "eos_token_id", None)
    for eos in cfg_eos if isinstance(cfg_eos, list) else [cfg_eos]:
        if eos is not None and eos not in ids:
            ids.append(eos)
    return (ids[0] if ids else None), ids[1:]
