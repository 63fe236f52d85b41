"""POST /v1/completions: prompts (text or token ids, one or many) → completions.

With k prompts and n samples each there are k * n choices; choice `i * n + j` is sample j of
prompt i. `echo` puts the prompt in front of each choice's text (and, with `logprobs`, the
prompt tokens' logprobs in front of the completion's; the first prompt token has none: null).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from lmserve.entrypoints.openai.errors import invalid_request
from lmserve.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
    UsageInfo,
)
from lmserve.entrypoints.openai.serving_engine import (
    SSE_DONE,
    EnginePrompt,
    OpenAIServing,
    SSEResponse,
    clamp_logprob,
    collect,
    error_from_exception,
    finish_reason,
    json_response,
    prepend,
    sse_data,
)
from lmserve.entrypoints.openai.tools import structured_outputs_for
from lmserve.outputs import Logprob, PromptLogprobs, RequestOutput
from lmserve.sampling_params import SamplingParams


@dataclass
class _Prompt:
    text: str | None  # None for token-id prompts (decoded on demand for echo)
    token_ids: list[int]


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        model = self.resolve_model(request.model)
        _reject_unsupported(request)
        stream = bool(request.stream)
        prompts = await self._prompts(request)
        echo_logprobs = request.logprobs if request.echo else None
        constraint = structured_outputs_for(
            request.response_format, request.structured_outputs,
            backend=self.structured_outputs_backend,
        )  # fmt: skip
        inputs: list[tuple[EnginePrompt, SamplingParams]] = []
        for prompt in prompts:
            max_tokens = self.check_context(
                len(prompt.token_ids), request.max_tokens, "max_tokens", "prompt"
            )
            params = self.sampling_params(
                request,
                max_tokens=max_tokens,
                logprobs=request.logprobs,
                prompt_logprobs=echo_logprobs,
                stream=stream,
                structured_outputs=constraint,
            )
            engine_prompt: EnginePrompt = {"prompt_token_ids": prompt.token_ids}
            if prompt.text is not None:
                engine_prompt["prompt"] = prompt.text
            inputs.append((engine_prompt, params))
        n = inputs[0][1].n
        request_id = f"cmpl-{uuid.uuid4().hex}"
        generator = self.generate(inputs, request_id, request.priority)
        try:
            if stream:
                first = await self.until_disconnect(raw_request, anext(generator))
            else:
                finals = await self.until_disconnect(raw_request, collect(generator))
        except ValueError as e:
            raise error_from_exception(e) from None
        if stream:
            body = self._stream(prepend(first, generator), request, model, request_id, prompts, n)
            return SSEResponse(body)
        response = self._response(finals, request, model, request_id, prompts, n)
        return json_response(response)

    # ---- prompts -----------------------------------------------------------------------------
    async def _prompts(self, request: CompletionRequest) -> list[_Prompt]:
        prompt = request.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = prompt
        result = []
        for item in items:
            if isinstance(item, str):
                ids = await self.encode(item, request.add_special_tokens)
                result.append(_Prompt(item, ids))
            else:
                result.append(_Prompt(None, list(item)))
        return result

    def _prompt_text(self, prompt: _Prompt) -> str:
        if prompt.text is None:
            prompt.text = self.tokenizer.decode(prompt.token_ids) if self.tokenizer else ""
        return prompt.text

    # ---- non-streaming -----------------------------------------------------------------------
    def _response(
        self,
        finals: dict[int, RequestOutput],
        request: CompletionRequest,
        model: str,
        request_id: str,
        prompts: list[_Prompt],
        n: int,
    ) -> CompletionResponse:
        choices = []
        usage = UsageInfo(prompt_tokens_details=PromptTokensDetails())
        for i, prompt in enumerate(prompts):
            out = finals[i]
            usage.prompt_tokens += len(prompt.token_ids)
            usage.prompt_tokens_details.cached_tokens += out.num_cached_tokens
            for sample in out.outputs:
                text, logprobs = sample.text, None
                if request.logprobs is not None:
                    logprobs = CompletionLogprobs()
                if request.echo:
                    text = self._prompt_text(prompt) + text
                    if logprobs is not None:
                        self._add_logprobs(
                            logprobs, prompt.token_ids, out.prompt_logprobs, request.logprobs
                        )
                if logprobs is not None:
                    self._add_logprobs(
                        logprobs, sample.token_ids, sample.logprobs, request.logprobs
                    )
                usage.completion_tokens += len(sample.token_ids)
                choices.append(
                    CompletionChoice(
                        index=i * n + sample.index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=finish_reason(sample.finish_reason, sample.stop_reason),
                        stop_reason=sample.stop_reason,
                    )
                )
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage)

    # ---- streaming ---------------------------------------------------------------------------
    async def _stream(
        self,
        outputs: AsyncGenerator[tuple[int, RequestOutput], None],
        request: CompletionRequest,
        model: str,
        request_id: str,
        prompts: list[_Prompt],
        n: int,
    ) -> AsyncGenerator[str, None]:
        """One chunk per choice with news; a last chunk with usage if asked; [DONE]."""
        chunk = CompletionResponse(id=request_id, model=model, choices=[])
        usage = UsageInfo(
            prompt_tokens=sum(len(p.token_ids) for p in prompts),
            prompt_tokens_details=PromptTokensDetails(),
        )
        cached_tokens: dict[int, int] = {}  # per prompt
        prompt_logprobs: dict[int, PromptLogprobs] = {}  # per prompt; they come once
        started: set[int] = set()
        finished: set[int] = set()
        offsets: dict[int, int] = {}  # text_offset of the next token, per choice
        try:
            async for i, out in outputs:
                prompt = prompts[i]
                cached_tokens[i] = out.num_cached_tokens
                if out.prompt_logprobs is not None:
                    prompt_logprobs[i] = out.prompt_logprobs
                for sample in out.outputs:
                    index = i * n + sample.index
                    if index in finished:
                        continue
                    text, logprobs = sample.text, None
                    if request.logprobs is not None:
                        logprobs = CompletionLogprobs()
                    if request.echo and index not in started:
                        text = self._prompt_text(prompt) + text
                        if logprobs is not None:
                            offsets[index] = self._add_logprobs(
                                logprobs, prompt.token_ids, prompt_logprobs.get(i), request.logprobs
                            )
                    if logprobs is not None and sample.token_ids:
                        offsets[index] = self._add_logprobs(
                            logprobs,
                            sample.token_ids,
                            sample.logprobs,
                            request.logprobs,
                            offsets.get(index, 0),
                        )
                    if not text and not sample.token_ids and sample.finish_reason is None:
                        continue
                    started.add(index)
                    usage.completion_tokens += len(sample.token_ids)
                    if sample.finish_reason is not None:
                        finished.add(index)
                    chunk.choices = [
                        CompletionChoice(
                            index=index,
                            text=text,
                            logprobs=logprobs,
                            finish_reason=finish_reason(sample.finish_reason, sample.stop_reason),
                            stop_reason=sample.stop_reason,
                        )
                    ]
                    yield sse_data(chunk)
            if request.stream_options and request.stream_options.include_usage:
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                usage.prompt_tokens_details.cached_tokens = sum(cached_tokens.values())
                chunk.choices, chunk.usage = [], usage
                yield sse_data(chunk)
        except Exception as e:
            yield sse_data(error_from_exception(e).to_dict())
        finally:
            await outputs.aclose()
        yield SSE_DONE

    # ---- logprobs ----------------------------------------------------------------------------
    def _add_logprobs(
        self,
        into: CompletionLogprobs,
        token_ids: list[int],
        logprobs: list[dict[int, Logprob] | None] | None,
        num_top: int,
        offset: int | None = None,
    ) -> int:
        """Append one entry per token to `into` (OpenAI's legacy layout); returns the text
        offset after the last token. A position without logprobs (the first prompt token)
        gets null."""
        if offset is None:
            offset = into.text_offset[-1] + len(into.tokens[-1]) if into.tokens else 0
        logprobs = logprobs or []
        for pos, token_id in enumerate(token_ids):
            position = logprobs[pos] if pos < len(logprobs) else None
            own = position.get(token_id) if position else None
            token = self.decode_token(token_id, own)
            into.tokens.append(token)
            into.text_offset.append(offset)
            offset += len(token)
            if position is None:
                into.token_logprobs.append(None)
                into.top_logprobs.append(None)
                continue
            into.token_logprobs.append(clamp_logprob(own.logprob) if own else None)
            top: dict[str, float] = {}
            for tid, lp in sorted(position.items(), key=lambda kv: kv[1].rank or 0):
                if tid == token_id or (lp.rank is not None and lp.rank <= num_top):
                    top[self.decode_token(tid, lp)] = clamp_logprob(lp.logprob)
            into.top_logprobs.append(top)
        return offset


def _reject_unsupported(request: CompletionRequest) -> None:
    if request.suffix:
        raise invalid_request("suffix is not supported", "suffix")
    n = 1 if request.n is None else request.n
    if request.best_of is not None and request.best_of != n:
        raise invalid_request(
            f"best_of={request.best_of} is not supported: only best_of == n ({n})", "best_of"
        )
    if request.stream_options is not None and not request.stream:
        raise invalid_request("stream_options is only allowed with stream=true", "stream_options")
