"""LLM: offline batched generation, vLLM's interface."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from lmserve.config import EngineConfig
from lmserve.core.messages import SpecDecodeStats
from lmserve.engine.chat import apply_chat_template, validate_conversation
from lmserve.engine.input_processor import PromptType
from lmserve.engine.launcher import start_launcher
from lmserve.engine.llm_engine import LLMEngine
from lmserve.engine.media import MediaConfig, load_images_sync
from lmserve.engine.mm_processor import has_image_parts, render_chat
from lmserve.outputs import RequestOutput
from lmserve.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """Generate from a batch of prompts with one engine.

        llm = LLM(model="path/or/hub-id", max_num_seqs=64)
        outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))

    Keyword arguments are vLLM's engine arguments (see `EngineConfig.from_kwargs`).
    """

    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        # The EngineCore process starts first: its imports overlap building the config.
        launcher = start_launcher()
        try:
            self.config = EngineConfig.from_kwargs(model, **engine_kwargs)
            self.llm_engine = LLMEngine(self.config, launcher)
        finally:
            if launcher is not None:
                launcher.cancel()  # no-op once the engine client took it
        self._request_counter = itertools.count()

    def shutdown(self) -> None:
        """Stop the engine (its EngineCore process, if any) now rather than at exit."""
        self.llm_engine.shutdown()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_spec_decode_stats(self) -> SpecDecodeStats | None:
        """Speculative decoding totals since the engine started (draft tokens, accepted
        tokens, acceptance rate overall and by position); None without speculative decoding."""
        if self.config.speculative_config is None:
            return None
        return self.llm_engine.spec_decode_stats

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; results come back in the order of `prompts`. All prompts
        are validated before any is queued, so a bad one raises and nothing is lost."""
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        prompts = list(prompts)
        params = [
            dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
            for p in _broadcast(
                "sampling_params", sampling_params or SamplingParams(), len(prompts)
            )
        ]
        priorities = _broadcast("priority", priority if priority is not None else 0, len(prompts))
        request_ids = [str(next(self._request_counter)) for _ in prompts]
        engine = self.llm_engine
        processed = [  # validate and tokenize every prompt before queueing any
            engine.input_processor.process(req_id, prompt, p, prio)
            for req_id, prompt, p, prio in zip(request_ids, prompts, params, priorities)
        ]
        for prompt_text, request in processed:
            engine.add_processed_request(prompt_text, request)
        return self._run_engine(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} messages) or to
        a list of conversations, rendered with the tokenizer's chat template."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        tokenizer = self.llm_engine.tokenizer
        prompts = []
        for conversation in conversations:
            if has_image_parts(conversation) and self.llm_engine.input_processor.mm_processor:
                prompts.append(
                    self._chat_prompt_with_images(
                        conversation, chat_template, add_generation_prompt
                    )
                )
                continue
            validated = validate_conversation(conversation)
            token_ids = apply_chat_template(
                tokenizer, validated, chat_template, add_generation_prompt
            )
            prompts.append({"prompt_token_ids": token_ids, "prompt": tokenizer.decode(token_ids)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _chat_prompt_with_images(
        self,
        conversation: list[dict[str, Any]],
        chat_template: str | None,
        add_generation_prompt: bool,
    ) -> dict[str, Any]:
        """A conversation with image parts (data: URLs, allowed http(s) URLs, PIL images) ->
        a prompt with its images, which `generate` expands and preprocesses."""
        mm = self.llm_engine.input_processor.mm_processor
        if mm is None:
            raise ValueError(f"model {self.config.model_config.model!r} does not accept images")
        tokenizer = self.llm_engine.tokenizer
        token_ids, refs = render_chat(
            tokenizer, conversation, chat_template, add_generation_prompt, mm.image_placeholder
        )
        mm.check_count(len(refs))
        media = MediaConfig.from_env(self.config.model_config.allowed_media_domains)
        images = load_images_sync(refs, media)
        return {
            "prompt_token_ids": token_ids,
            "prompt": tokenizer.decode(token_ids),
            "multi_modal_data": {"image": images},
        }

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        results: dict[str, RequestOutput] = {}
        with tqdm(
            total=len(request_ids),
            desc="Processed prompts",
            disable=not use_tqdm,
            dynamic_ncols=True,
        ) as bar:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        bar.update(1)
        return [results[r] for r in request_ids]


def _broadcast(name: str, value: Any, n: int) -> list[Any]:
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but there are {n} prompts")
        return list(value)
    return [value] * n
