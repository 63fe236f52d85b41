"""What the completion and chat endpoints share: model names, tokenization and context-length
checks, SamplingParams from a request, and running engine requests so that a client that goes
away aborts them.

Request lifecycle (one HTTP request, k prompts):

    handler ──▶ generate(): one producer task per prompt, each `async for` over
                AsyncLLM.generate, all feeding one queue; the handler reads the queue.
    client disconnects / handler cancelled / stream closed
            ──▶ the generator's finally cancels the producers; each producer's
                AsyncLLM.generate then runs its own finally, which aborts the request.

NOTE the producers run in their own tasks on purpose: Starlette ends a stream by cancelling
an anyio scope, and inside a cancelled scope every await is cancelled again, so an abort
awaited there might never reach the engine. A plainly cancelled asyncio task is cancelled
once, and its cleanup awaits run to completion.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from lmserve.engine.core_client import EngineDeadError
from lmserve.entrypoints.openai.batched_encoder import BatchedEncoder
from lmserve.entrypoints.openai.errors import (
    SERVER_ERROR,
    OpenAIError,
    engine_dead,
    from_value_error,
    invalid_request,
)
from lmserve.entrypoints.openai.protocol import MAX_N, SamplingFields
from lmserve.outputs import Logprob, RequestOutput
from lmserve.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
EnginePrompt = dict[str, Any]  # {"prompt_token_ids": [...], "prompt": text or absent}
_DONE = object()
_WORST_LOGPROB = -9999.0  # OpenAI's value for "very unlikely"; JSON has no -inf


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


class OpenAIServing:
    def __init__(self, engine: Any, served_model_names: list[str]) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        # prompts are tokenized on a worker thread, in batches (see batched_encoder)
        self.encoder = BatchedEncoder(self.tokenizer) if self.tokenizer is not None else None
        self.max_model_len: int = engine.model_config.max_model_len
        # whose parser checks structured-output constraints (ModelConfig's, resolved)
        self.structured_outputs_backend: str = getattr(
            engine.model_config, "structured_outputs_backend", "xgrammar"
        )
        self.served_model_names = served_model_names
        self.producers: set[asyncio.Task] = set()  # strong references while they run

    # ---- model names -------------------------------------------------------------------------
    def resolve_model(self, requested: str | None) -> str:
        """The name to report; the first served name when the request names none."""
        if requested is None or requested in self.served_model_names:
            return requested or self.served_model_names[0]
        raise OpenAIError(
            f"The model `{requested}` does not exist. Served: {self.served_model_names}",
            status_code=404,
            param="model",
            code="model_not_found",
        )

    # ---- tokens ------------------------------------------------------------------------------
    def require_tokenizer(self, what: str, param: str) -> Any:
        if self.tokenizer is None:
            raise invalid_request(
                f"{what} needs a tokenizer, but the server runs with --skip-tokenizer-init; "
                "send token ids instead",
                param,
            )
        return self.tokenizer

    async def encode(
        self, text: str, add_special_tokens: bool = True, param: str = "prompt"
    ) -> list[int]:
        self.require_tokenizer("a text prompt", param)
        return await self.encoder.encode(text, add_special_tokens)

    def decode_token(self, token_id: int, logprob: Logprob | None = None) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def check_context(
        self,
        num_prompt_tokens: int,
        max_tokens: int | None,
        max_tokens_param: str,
        prompt_param: str,
    ) -> int:
        """max_tokens to use: as requested, or all the room left in the context when None.
        A prompt that fills the context, or prompt + max_tokens beyond it, is a 400 stating
        both numbers."""
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise invalid_request(
                f"This model's maximum context length is {limit} tokens, but the prompt has "
                f"{num_prompt_tokens} tokens, which leaves no room for output. "
                "Please shorten the prompt.",
                prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return limit - num_prompt_tokens
        if num_prompt_tokens + max_tokens > limit:
            raise invalid_request(
                f"This model's maximum context length is {limit} tokens, but "
                f"{num_prompt_tokens + max_tokens} tokens were requested ({num_prompt_tokens} in "
                f"the prompt + {max_tokens_param}={max_tokens}). Please reduce the prompt or "
                f"{max_tokens_param}.",
                max_tokens_param,
                code="context_length_exceeded",
            )
        return max_tokens

    # ---- sampling ----------------------------------------------------------------------------
    def sampling_params(
        self,
        request: SamplingFields,
        *,
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        stream: bool,
        structured_outputs: StructuredOutputsParams | None = None,
    ) -> SamplingParams:
        """OpenAI's defaults for absent (or null) fields; range errors come from SamplingParams."""
        n = 1 if request.n is None else request.n
        if n > MAX_N:
            raise invalid_request(f"n={n} is invalid: must be in [1, {MAX_N}]", "n")
        top_k = -1 if request.top_k in (None, 0) else request.top_k  # vLLM: 0 also means off
        try:
            return SamplingParams(
                n=n,
                temperature=_or(request.temperature, 1.0),
                top_p=_or(request.top_p, 1.0),
                top_k=top_k,
                min_p=_or(request.min_p, 0.0),
                seed=request.seed,
                presence_penalty=_or(request.presence_penalty, 0.0),
                frequency_penalty=_or(request.frequency_penalty, 0.0),
                repetition_penalty=_or(request.repetition_penalty, 1.0),
                logit_bias=_parse_logit_bias(request.logit_bias),
                stop=request.stop,
                stop_token_ids=request.stop_token_ids,
                ignore_eos=request.ignore_eos,
                max_tokens=max_tokens,
                min_tokens=request.min_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=request.skip_special_tokens,
                spaces_between_special_tokens=request.spaces_between_special_tokens,
                include_stop_str_in_output=request.include_stop_str_in_output,
                output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
                structured_outputs=structured_outputs,
            )
        except ValueError as e:
            raise from_value_error(e) from None

    # ---- running requests --------------------------------------------------------------------
    async def generate(
        self,
        prompts: list[tuple[EnginePrompt, SamplingParams]],
        request_id: str,
        priority: int = 0,
    ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """Yields (prompt index, RequestOutput) for every prompt as outputs arrive. Raises the
        first error any prompt raised (ValueError on bad input, EngineDeadError). Closing the
        generator, or cancelling the task that iterates it, aborts the unfinished requests."""
        queue: asyncio.Queue = asyncio.Queue()

        async def produce(index: int, prompt: EnginePrompt, params: SamplingParams) -> None:
            engine_id = request_id if len(prompts) == 1 else f"{request_id}-{index}"
            try:
                async for out in self.engine.generate(prompt, params, engine_id, priority=priority):
                    queue.put_nowait((index, out))
            except Exception as e:
                queue.put_nowait((index, e))
            finally:
                queue.put_nowait((index, _DONE))

        tasks = [asyncio.create_task(produce(i, p, sp)) for i, (p, sp) in enumerate(prompts)]
        for task in tasks:
            self.producers.add(task)
            task.add_done_callback(self.producers.discard)
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()  # no-op for finished ones; the rest abort in their own task

    async def until_disconnect(self, request: Request, awaitable: Awaitable[T]) -> T:
        """Await `awaitable` unless the client disconnects first; then cancel it and raise
        ClientDisconnected. Waits on the ASGI receive channel: no polling."""
        work = asyncio.ensure_future(awaitable)
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finished = work.done()
        finally:
            watcher.cancel()
            if not work.done():
                work.cancel()
        if not finished:
            raise ClientDisconnected()
        return work.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body is already read, so receive() now blocks until the client goes away (or the
    # response completes, which also reads as a disconnect; by then nobody waits for us).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(
    generator: AsyncGenerator[tuple[int, RequestOutput], None],
) -> dict[int, RequestOutput]:
    """The last RequestOutput of each prompt (with FINAL_ONLY, the only one)."""
    final: dict[int, RequestOutput] = {}
    async for index, out in generator:
        final[index] = out
    return final


def finish_reason(reason: str | None, detail: Any = None) -> str | None:
    """OpenAI's finish reasons are "stop" and "length"; an engine-side abort (shutdown, a
    request the engine could not keep) is an error for the client, not a finish, and so is
    "error" (the request could not run: its grammar failed to compile or timed out; `detail`
    says why), a 400."""
    if reason in (None, "stop", "length"):
        return reason
    if reason == "error":
        raise invalid_request(str(detail or "the request failed"), "response_format")
    raise OpenAIError(f"the engine ended the request early ({reason})", 503, SERVER_ERROR)


def error_from_exception(e: Exception, prompt_param: str = "prompt") -> OpenAIError:
    """What a request failure (after validation) looks like to the client."""
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, ValueError):
        return from_value_error(e, prompt_param)
    if isinstance(e, EngineDeadError):
        return engine_dead(e)
    logger.exception("request failed", exc_info=e)
    return OpenAIError(f"internal server error: {type(e).__name__}", 500, SERVER_ERROR)


# ---- server-sent events ----------------------------------------------------------------------
def sse_data(payload: BaseModel | dict | str, exclude: set[str] | None = None) -> str:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump_json(exclude=exclude)
    elif isinstance(payload, dict):
        payload = json.dumps(payload)
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def json_response(body: BaseModel, status_code: int = 200) -> Response:
    return Response(body.model_dump_json(), status_code, media_type="application/json")


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its body generator when the response
    ends, however it ends (done, client gone, server shutting down): closing it is what
    aborts the engine requests behind it."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncGenerator[str, None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def prepend(first: T, rest: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    """`first`, then everything `rest` yields; closing this closes `rest`."""
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


def clamp_logprob(value: float) -> float:
    return value if math.isfinite(value) and value > _WORST_LOGPROB else _WORST_LOGPROB


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


def _parse_logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    parsed = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise invalid_request(
                f"logit_bias keys must be token ids (integers, as strings); got {key!r}",
                "logit_bias",
            ) from None
        if not math.isfinite(value):
            raise invalid_request(f"logit_bias[{key}]={value} is not a finite number", "logit_bias")
        parsed[token_id] = value
    return parsed
