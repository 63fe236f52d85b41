"""POST /v1/chat/completions: a conversation → n assistant replies.

The conversation is checked and rendered by lmserve.engine.chat (the tokenizer's chat template,
or --chat-template). Streaming follows OpenAI: a first chunk per choice carries
`{"role": "assistant", "content": ""}`, then content deltas, then a chunk with the
finish_reason (its delta may be empty), then, with stream_options.include_usage, one chunk
with no choices and the usage; every earlier chunk then has `"usage": null`.

Structured outputs (`response_format`, vLLM's `structured_outputs`) and tools (`tools`,
`tool_choice`, the replies' `tool_calls`; OpenAI's deprecated `functions` / `function_call`
as their equivalents) are planned by lmserve.entrypoints.openai.tools.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from jinja2 import TemplateError
from starlette.requests import Request
from starlette.responses import Response

from lmserve.engine.chat import render_chat_text, validate_conversation
from lmserve.engine.media import MediaConfig, load_images
from lmserve.engine.mm_processor import has_image_parts, render_chat
from lmserve.entrypoints.openai.errors import invalid_request
from lmserve.entrypoints.openai.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    ChatTopLogprob,
    DeltaFunctionCall,
    DeltaMessage,
    FunctionCall,
    PromptTokensDetails,
    ToolCall,
    UsageInfo,
)
from lmserve.entrypoints.openai.serving_engine import (
    SSE_DONE,
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
from lmserve.entrypoints.openai.tool_parsers import ToolParser
from lmserve.entrypoints.openai.tools import (
    StreamedReply,
    ToolPlan,
    legacy_function_call,
    legacy_function_call_delta,
    parse_reply,
    plan_tools,
    structured_outputs_for,
    tool_call_dicts,
    tool_fields,
)
from lmserve.outputs import Logprob, RequestOutput

MAX_TOP_LOGPROBS = 20


class OpenAIServingChat(OpenAIServing):
    def __init__(
        self,
        engine: Any,
        served_model_names: list[str],
        chat_template: str | None,
        tool_parser: ToolParser | None = None,
    ):
        super().__init__(engine, served_model_names)
        self.chat_template = chat_template
        self.tool_parser = tool_parser  # --tool-call-parser: enables tool_choice "auto"
        self.media_config = MediaConfig.from_env(engine.model_config.allowed_media_domains)

    async def create_chat_completion(
        self, request: ChatCompletionRequest, raw_request: Request
    ) -> Response:
        model = self.resolve_model(request.model)
        _reject_unsupported(request)
        stream = bool(request.stream)
        fields = tool_fields(
            request.tools, request.tool_choice, request.functions, request.function_call
        )
        backend = self.structured_outputs_backend
        plan = plan_tools(fields, parser=self.tool_parser, backend=backend)
        constraint = structured_outputs_for(
            request.response_format, request.structured_outputs, plan, backend
        )
        tools = plan.tools if plan is not None else None
        if has_image_parts(request.messages):
            token_ids, prompt = await self.render_with_images(
                request.messages, request.add_generation_prompt
            )
        else:
            token_ids = await self.render(request.messages, request.add_generation_prompt, tools)
            prompt = {"prompt_token_ids": token_ids}
        if request.max_completion_tokens is not None:
            max_tokens_param, requested = "max_completion_tokens", request.max_completion_tokens
        else:
            max_tokens_param, requested = "max_tokens", request.max_tokens
        max_tokens = self.check_context(len(token_ids), requested, max_tokens_param, "messages")
        params = self.sampling_params(
            request,
            max_tokens=max_tokens,
            logprobs=(request.top_logprobs or 0) if request.logprobs else None,
            stream=stream,
            structured_outputs=constraint,
        )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        generator = self.generate([(prompt, params)], request_id, request.priority)
        try:
            if stream:
                first = await self.until_disconnect(raw_request, anext(generator))
            else:
                finals = await self.until_disconnect(raw_request, collect(generator))
        except ValueError as e:
            raise error_from_exception(e, prompt_param="messages") from None
        if stream:
            outputs = prepend(first, generator)
            return SSEResponse(
                self._stream(outputs, request, model, request_id, len(token_ids), plan)
            )
        return json_response(self._response(finals[0], request, model, request_id, plan))

    async def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Conversation → prompt token ids; a bad conversation or template failure is a 400."""
        try:
            conversation = validate_conversation(messages)
            text = render_chat_text(
                self.tokenizer, conversation, self.chat_template, add_generation_prompt, tools
            )
        except (ValueError, TypeError, TemplateError) as e:
            raise invalid_request(f"invalid messages: {e}", "messages") from None
        # the template already wrote any BOS it wants: no special tokens added again
        return await self.encoder.encode(text, add_special_tokens=False)

    async def render_with_images(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool
    ) -> tuple[list[int], dict[str, Any]]:
        """A conversation with image parts -> (prompt token ids, placeholders expanded; the
        engine prompt with the preprocessed images). Bad images, URLs or counts are a 400."""
        mm = self.engine.input_processor.mm_processor
        if mm is None:
            raise invalid_request(
                "this model is text-only: it does not accept images (image_url parts)",
                "messages",
            )
        try:
            token_ids, refs = render_chat(
                self.require_tokenizer("chat", "messages"),
                messages,
                self.chat_template,
                add_generation_prompt,
                mm.image_placeholder,
            )
            mm.check_count(len(refs))  # before fetching anything
            images = await load_images(refs, self.media_config)
            token_ids, features = await asyncio.to_thread(mm.process, token_ids, images)
        except (ValueError, TypeError, TemplateError) as e:
            raise invalid_request(f"invalid messages: {e}", "messages") from None
        return token_ids, {"prompt_token_ids": token_ids, "multi_modal_features": features}

    # ---- non-streaming -----------------------------------------------------------------------
    def _response(
        self,
        out: RequestOutput,
        request: ChatCompletionRequest,
        model: str,
        request_id: str,
        plan: ToolPlan | None = None,
    ) -> ChatCompletionResponse:
        choices = []
        for sample in out.outputs:
            logprobs = None
            if request.logprobs:
                logprobs = self._logprobs(
                    sample.token_ids, sample.logprobs, request.top_logprobs or 0
                )
            reason = finish_reason(sample.finish_reason, sample.stop_reason)
            reply = parse_reply(sample.text, plan, self.tool_parser)
            message = ChatMessage(content=reply.content)
            if reply.tool_calls and plan.legacy:  # asked with `functions`: OpenAI's old form
                message.function_call = FunctionCall(**legacy_function_call(reply.tool_calls))
                reason = "function_call" if reason == "stop" else reason
            elif reply.tool_calls:
                message.tool_calls = [ToolCall(**c) for c in tool_call_dicts(reply.tool_calls)]
                reason = "tool_calls" if reason == "stop" else reason
            elif plan is None or plan.mode == "none":
                message.content = sample.text  # "" stays "" (not null) without tools
            choices.append(
                ChatChoice(
                    index=sample.index,
                    message=message,
                    logprobs=logprobs,
                    finish_reason=reason,
                    stop_reason=sample.stop_reason,
                )
            )
        completion_tokens = sum(len(s.token_ids) for s in out.outputs)
        usage = UsageInfo(
            prompt_tokens=len(out.prompt_token_ids),
            completion_tokens=completion_tokens,
            total_tokens=len(out.prompt_token_ids) + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=out.num_cached_tokens),
        )
        return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage)

    # ---- streaming ---------------------------------------------------------------------------
    async def _stream(
        self,
        outputs: AsyncGenerator[tuple[int, RequestOutput], None],
        request: ChatCompletionRequest,
        model: str,
        request_id: str,
        num_prompt_tokens: int,
        plan: ToolPlan | None = None,
    ) -> AsyncGenerator[str, None]:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        exclude = None if include_usage else {"usage"}
        chunk = ChatCompletionChunk(id=request_id, model=model, choices=[])
        usage = UsageInfo(prompt_tokens=num_prompt_tokens)
        finished: set[int] = set()
        n = request.n or 1
        replies = [StreamedReply(plan, self.tool_parser) for _ in range(n)]
        try:
            for index in range(n):
                chunk.choices = [
                    ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
                ]
                yield sse_data(chunk, exclude)
            async for _, out in outputs:
                usage.prompt_tokens_details = PromptTokensDetails(
                    cached_tokens=out.num_cached_tokens
                )
                for sample in out.outputs:
                    if sample.index in finished:
                        continue
                    if not sample.text and not sample.token_ids and sample.finish_reason is None:
                        continue
                    logprobs = None
                    if request.logprobs and sample.token_ids:
                        logprobs = self._logprobs(
                            sample.token_ids, sample.logprobs, request.top_logprobs or 0
                        )
                    usage.completion_tokens += len(sample.token_ids)
                    if sample.finish_reason is not None:
                        finished.add(sample.index)
                    reason = finish_reason(sample.finish_reason, sample.stop_reason)
                    reply = replies[sample.index]
                    content, tool_calls = reply.feed(sample.text, reason is not None)
                    if reason == "stop" and reply.has_tool_calls:
                        reason = "tool_calls"
                    function_call = None
                    if plan is not None and plan.legacy:  # asked with `functions`
                        function_call = legacy_function_call_delta(tool_calls)
                        tool_calls = None
                        reason = "function_call" if reason == "tool_calls" else reason
                    nothing = (
                        content is None
                        and tool_calls is None
                        and function_call is None
                        and logprobs is None
                    )
                    if reply.mode != "none" and nothing and reason is None:
                        continue  # held back: it may be part of a tool call
                    delta = DeltaMessage(content=content, tool_calls=tool_calls)
                    if function_call is not None:
                        delta.function_call = DeltaFunctionCall(**function_call)
                    chunk.choices = [
                        ChatStreamChoice(
                            index=sample.index,
                            delta=delta,
                            logprobs=logprobs,
                            finish_reason=reason,
                            stop_reason=sample.stop_reason,
                        )
                    ]
                    yield sse_data(chunk, exclude)
            if include_usage:
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                chunk.choices, chunk.usage = [], usage
                yield sse_data(chunk)
        except Exception as e:
            yield sse_data(error_from_exception(e, prompt_param="messages").to_dict())
        finally:
            await outputs.aclose()
        yield SSE_DONE

    # ---- logprobs ----------------------------------------------------------------------------
    def _logprobs(
        self,
        token_ids: list[int],
        logprobs: list[dict[int, Logprob]] | None,
        num_top: int,
    ) -> ChatChoiceLogprobs:
        content = []
        for pos, token_id in enumerate(token_ids):
            position = logprobs[pos] if logprobs and pos < len(logprobs) else {}
            own = position.get(token_id)
            top = [
                self._top(tid, lp)
                for tid, lp in sorted(position.items(), key=lambda kv: kv[1].rank or 0)
                if lp.rank is not None and lp.rank <= num_top
            ][:num_top]
            token = self.decode_token(token_id, own)
            content.append(
                ChatTokenLogprob(
                    token=token,
                    logprob=clamp_logprob(own.logprob) if own else clamp_logprob(float("-inf")),
                    bytes=list(token.encode("utf-8")),
                    top_logprobs=top,
                )
            )
        return ChatChoiceLogprobs(content=content)

    def _top(self, token_id: int, lp: Logprob) -> ChatTopLogprob:
        token = self.decode_token(token_id, lp)
        return ChatTopLogprob(
            token=token, logprob=clamp_logprob(lp.logprob), bytes=list(token.encode("utf-8"))
        )


def _reject_unsupported(request: ChatCompletionRequest) -> None:
    if request.audio is not None or any(m != "text" for m in request.modalities or []):
        raise invalid_request("only text output is supported", "modalities")
    if request.stream_options is not None and not request.stream:
        raise invalid_request("stream_options is only allowed with stream=true", "stream_options")
    if request.top_logprobs is not None:
        if not request.logprobs:
            raise invalid_request("top_logprobs needs logprobs=true", "top_logprobs")
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise invalid_request(
                f"top_logprobs={request.top_logprobs} is invalid: must be in "
                f"[0, {MAX_TOP_LOGPROBS}]",
                "top_logprobs",
            )
