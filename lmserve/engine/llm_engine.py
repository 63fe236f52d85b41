"""LLMEngine: the synchronous front-end — tokenize, send to the EngineCore, collect outputs."""

from __future__ import annotations

import dataclasses
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from lmserve.config import EngineConfig
from lmserve.core.messages import EngineCoreRequest, SpecDecodeStats
from lmserve.engine.core_client import EngineCoreClient
from lmserve.engine.input_processor import InputProcessor, PromptType
from lmserve.engine.launcher import EngineLauncher
from lmserve.engine.output_processor import OutputProcessor
from lmserve.outputs import RequestOutput
from lmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, launcher: EngineLauncher | None = None) -> None:
        """`launcher`: an EngineCore process started before the configuration was built."""
        self.config = config
        # The tokenizer loads while the EngineCore process starts (they take seconds each).
        self.engine_core, self.tokenizer = start_engine_and_tokenizer(
            config, functools.partial(EngineCoreClient.make_client, launcher=launcher)
        )
        self.input_processor = InputProcessor(config.model_config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        # Totals since start (speculative decoding only); `LLM.get_spec_decode_stats()`.
        self.spec_decode_stats = SpecDecodeStats()

    def add_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams, priority: int = 0
    ) -> None:
        """Validate and tokenize (raising ValueError before anything is queued), then enqueue."""
        self.add_processed_request(
            *self.input_processor.process(request_id, prompt, params, priority)
        )

    def add_processed_request(self, prompt_text: str | None, request: EngineCoreRequest) -> None:
        """Enqueue an InputProcessor result as its n samples (one engine request each)."""
        children = split_into_samples(request)
        self.output_processor.add_request(
            request.request_id,
            prompt_text,
            request.prompt_token_ids,
            [(child.request_id, child.sampling_params) for child in children],
        )
        for child in children:
            self.engine_core.add_request(child)

    def abort_request(self, request_ids: list[str]) -> None:
        """Abort user requests (all their samples); unknown ids are ignored."""
        engine_ids = self.output_processor.abort_requests(request_ids)
        if engine_ids:
            self.engine_core.abort_requests(engine_ids)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """One engine step; returns the updates it produced (per each request's output_kind)."""
        outputs = self.engine_core.get_output()
        stats = outputs.scheduler_stats
        if stats is not None and stats.spec_decode is not None:
            self.spec_decode_stats.add(stats.spec_decode)
        request_outputs, to_abort = self.output_processor.process_outputs(outputs.outputs)
        if to_abort:  # stop strings found in the front-end: free the engine's requests
            self.engine_core.abort_requests(to_abort)
        return request_outputs

    def shutdown(self) -> None:
        """Stop the EngineCore process (if any). Also runs when the engine is collected."""
        engine_core = getattr(self, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # interpreter teardown: best effort
            pass


def split_into_samples(request: EngineCoreRequest) -> list[EngineCoreRequest]:
    """n > 1: one engine request per sample (ids `{id}#{i}`), sharing the prompt's KV blocks
    through the prefix cache; seeded samples get seed + index so they differ."""
    params = request.sampling_params
    if params.n == 1:
        return [request]
    children = []
    for i in range(params.n):
        seed = None if params.seed is None else params.seed + i
        child_params = dataclasses.replace(params, n=1, seed=seed)
        children.append(
            msgspec.structs.replace(
                request, request_id=f"{request.request_id}#{i}", sampling_params=child_params
            )
        )
    return children


def start_engine_and_tokenizer(config: EngineConfig, make_client):
    """(engine client, tokenizer), the tokenizer loading while the EngineCore starts; if
    either fails, nothing is left running."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        tokenizer = pool.submit(load_tokenizer, config)
        try:
            client = make_client(config)
        except BaseException:
            tokenizer.cancel()
            raise
        try:
            return client, tokenizer.result()
        except BaseException:
            client.shutdown()
            raise


def load_tokenizer(config: EngineConfig) -> Any | None:
    if config.model_config.skip_tokenizer_init:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(config.model_config.tokenizer)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot load a tokenizer from {config.model_config.tokenizer!r} ({e}); pass "
            "tokenizer=... or skip_tokenizer_init=True with prompt_token_ids"
        ) from e
