"""AsyncLLM: the asyncio front-end the API server uses.

Validation, tokenization, detokenization and streaming run here, in the server's process; the
EngineCore runs in its own process and talks over ZMQ. One background task reads engine
outputs, turns them into RequestOutputs and hands each to its request's queue.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator

from lmserve.config import EngineConfig
from lmserve.engine.core_client import EngineCoreClient, EngineDeadError
from lmserve.engine.input_processor import InputProcessor, PromptType
from lmserve.engine.launcher import EngineLauncher
from lmserve.engine.llm_engine import split_into_samples, start_engine_and_tokenizer
from lmserve.engine.output_processor import OutputProcessor
from lmserve.metrics.stats import StatsRecorder
from lmserve.outputs import RequestOutput
from lmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "EngineDeadError"]


class AsyncLLM:
    """Usage (inside a running event loop):

    engine = AsyncLLM(config)                       # starts the EngineCore process
    async for out in engine.generate(prompt, params, request_id="r1"):
        ...                                         # per params.output_kind
    await engine.abort("r1")                        # e.g. the client went away
    engine.shutdown()
    """

    def __init__(
        self,
        config: EngineConfig,
        stats: StatsRecorder | None = None,
        launcher: EngineLauncher | None = None,
    ) -> None:
        """`launcher`: an EngineCore process started before the configuration was built."""
        self.config = config
        self.model_config = config.model_config
        self.engine_core, self.tokenizer = start_engine_and_tokenizer(
            config, functools.partial(EngineCoreClient.make_async_mp_client, launcher=launcher)
        )
        self.input_processor = InputProcessor(config.model_config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stats = stats or StatsRecorder(model_name=str(config.model_config.model))
        self.stats.describe_engine(config, lambda: not self.engine_core.is_dead)
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._output_task: asyncio.Task | None = None

    # ---- health -------------------------------------------------------------------------------
    @property
    def is_dead(self) -> bool:
        return self.engine_core.is_dead

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self.engine_core.dead_error

    async def check_health(self) -> None:
        """Raises EngineDeadError when the EngineCore process is gone."""
        if self.engine_core.is_dead:
            raise self.engine_core.dead_error

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._queues)

    # ---- requests ------------------------------------------------------------------------------
    def process_inputs(
        self, request_id: str, prompt: PromptType, params: SamplingParams, priority: int = 0
    ):
        """Validate and tokenize; raises ValueError (a 400 for the server) on bad input."""
        return self.input_processor.process(request_id, prompt, params, priority)

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs for one request (as its output_kind says). Raises ValueError
        before anything is queued on bad input, EngineDeadError if the engine dies. Closing
        the iterator early (client disconnect, cancellation) aborts the request."""
        await self.check_health()
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, request = self.process_inputs(request_id, prompt, sampling_params, priority)
        self._ensure_output_task()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        children = split_into_samples(request)
        self.output_processor.add_request(
            request_id,
            text,
            request.prompt_token_ids,
            [(child.request_id, child.sampling_params) for child in children],
        )
        self.stats.on_request_added(
            request_id,
            len(request.prompt_token_ids),
            [c.request_id for c in children],
            request.sampling_params.max_tokens,
        )
        finished = False
        try:
            for child in children:
                await self.engine_core.add_request_async(child)
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a request (all its samples) in the engine; unknown ids are ignored."""
        engine_ids = self.output_processor.abort_requests([request_id])
        self.stats.on_request_aborted(request_id)
        if engine_ids and not self.engine_core.is_dead:
            await self.engine_core.abort_requests_async(engine_ids)

    # ---- the output loop -------------------------------------------------------------------
    def _ensure_output_task(self) -> None:
        if self._output_task is None or self._output_task.done():
            self._output_task = asyncio.get_running_loop().create_task(self._output_loop())

    async def _output_loop(self) -> None:
        try:
            while True:
                outputs = await self.engine_core.get_output_async()
                if outputs.scheduler_stats is not None:
                    self.stats.on_scheduler_stats(outputs.scheduler_stats)
                request_outputs, to_abort = self.output_processor.process_outputs(outputs.outputs)
                self.stats.on_engine_outputs(outputs.outputs, request_outputs)
                for out in request_outputs:
                    queue = self._queues.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
                if to_abort:
                    await self.engine_core.abort_requests_async(to_abort)
        except EngineDeadError as e:
            logger.error("EngineCore died: %s", e)
            for queue in self._queues.values():
                queue.put_nowait(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here must not leave requests hanging
            logger.exception("output loop failed")
            for queue in self._queues.values():
                queue.put_nowait(e)
            raise

    # ---- utilities -----------------------------------------------------------------------------
    async def reset_prefix_cache(self) -> bool:
        self._ensure_output_task()  # it delivers the answer
        return await self.engine_core.call_utility_async("reset_prefix_cache")

    def shutdown(self) -> None:
        if self._output_task is not None:
            self._output_task.cancel()
        self.engine_core.shutdown()

    def __del__(self) -> None:  # best effort: never leave an orphan EngineCore
        try:
            self.engine_core.shutdown()
        except Exception:
            pass
