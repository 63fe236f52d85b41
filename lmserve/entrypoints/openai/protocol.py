"""Request and response bodies of the OpenAI-compatible API (OpenAI's field names).

Requests are validated strictly: a field of the wrong JSON type is a 400, never coerced
("2" is not an integer). Unknown fields are ignored, as OpenAI's clients send fields that a
given server may not know; fields OpenAI defines that we cannot honour (audio) are rejected
explicitly by the serving layer rather than silently dropped. OpenAI's deprecated `functions` /
`function_call` are served as the `tools` / `tool_choice` they stand for.
Range checks (temperature >= 0, top_p in (0, 1], ...) happen in SamplingParams, so the
server and `LLM` accept exactly the same values.

Responses follow the schemas in OpenAI's openapi.json; vLLM's additions (`stop_reason`,
`prompt_tokens_details.cached_tokens`) are extra properties those schemas allow.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128  # completions per prompt (OpenAI's limit)

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
NonNegInt = Annotated[int, Field(ge=0, le=INT64_MAX)]


# ---- shared validators -------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_prompt(value: Any) -> str | list[str] | list[int] | list[list[int]]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value):
            return value
        if all(_is_int(x) for x in value):
            return value
        if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in value):
            return value
    if isinstance(value, list) and not value:
        raise ValueError("the prompt list is empty")
    raise ValueError(
        "must be a string, a list of strings, a list of token ids (integers) or a list of "
        "non-empty token-id lists"
    )


def _check_stop(value: Any) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ValueError("must be a string or a list of strings")


Prompt = Annotated[Any, AfterValidator(_check_prompt)]
Stop = Annotated[Any, AfterValidator(_check_stop)]


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(OpenAIRequest):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # accepted; we never obfuscate


class SamplingFields(OpenAIRequest):
    """Fields both endpoints share: OpenAI's, then vLLM's extras."""

    model: str | None = None  # None: the (first) served model
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias
    n: int | None = 1
    seed: Int64 | None = None
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: NonNegInt = 0
    stop_token_ids: list[NonNegInt] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: Int64 = 0


class CompletionRequest(SamplingFields):
    prompt: Prompt
    best_of: int | None = None
    echo: bool | None = False
    logprobs: int | None = None  # top-N logprobs per token (0..20)
    max_tokens: Int64 | None = 16
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM's: tokenize text prompts with BOS etc.
    response_format: dict[str, Any] | None = None  # vLLM's: JSON mode on completions too
    structured_outputs: dict[str, Any] | None = None  # vLLM's: json/regex/choice/grammar


class ChatCompletionRequest(SamplingFields):
    # Checked in depth by lmserve.engine.chat.validate_conversation.
    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]
    logprobs: bool | None = False
    top_logprobs: int | None = None
    max_tokens: Int64 | None = None  # deprecated by OpenAI in favour of the next one
    max_completion_tokens: Int64 | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    # Accepted and ignored: they do not change what a self-hosted model generates.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    # vLLM's extras
    add_generation_prompt: bool = True
    structured_outputs: dict[str, Any] | None = None  # json/regex/choice/grammar (vLLM's)


class TokenizeRequest(OpenAIRequest):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(OpenAIRequest):
    model: str | None = None
    tokens: list[int]


# ---- responses -----------------------------------------------------------------------------
def _now() -> int:
    return int(time.time())


def _is_none(value: Any) -> bool:
    return value is None


class OpenAIResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptTokensDetails(OpenAIResponse):
    cached_tokens: int = 0


class UsageInfo(OpenAIResponse):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = Field(default=None, exclude_if=_is_none)


FinishReason = Literal["stop", "length", "tool_calls", "function_call"]  # the last: deprecated


class CompletionLogprobs(OpenAIResponse):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: first prompt token
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIResponse):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None  # None only on streamed chunks
    stop_reason: int | str | None = None  # vLLM's: the stop token id or string, if any


class CompletionResponse(OpenAIResponse):
    """Both the response and its streamed chunks (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = Field(default=None, exclude_if=_is_none)


class ChatTopLogprob(OpenAIResponse):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(OpenAIResponse):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class FunctionCall(OpenAIResponse):
    name: str
    arguments: str  # JSON text


class ToolCall(OpenAIResponse):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIResponse):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, exclude_if=_is_none)
    # OpenAI's deprecated form of tool_calls, for requests that sent `functions`.
    function_call: FunctionCall | None = Field(default=None, exclude_if=_is_none)


class ChatChoice(OpenAIResponse):
    index: int
    message: ChatMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIResponse):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaFunctionCall(OpenAIResponse):
    name: str | None = Field(default=None, exclude_if=_is_none)
    arguments: str | None = Field(default=None, exclude_if=_is_none)


class DeltaToolCall(OpenAIResponse):
    """A piece of tool call `index`: the first carries id, type and name; then arguments."""

    index: int
    id: str | None = Field(default=None, exclude_if=_is_none)
    type: Literal["function"] | None = Field(default=None, exclude_if=_is_none)
    function: DeltaFunctionCall


class DeltaMessage(OpenAIResponse):
    role: Literal["assistant"] | None = Field(default=None, exclude_if=_is_none)
    content: str | None = Field(default=None, exclude_if=_is_none)
    tool_calls: list[DeltaToolCall] | None = Field(default=None, exclude_if=_is_none)
    function_call: DeltaFunctionCall | None = Field(default=None, exclude_if=_is_none)


class ChatStreamChoice(OpenAIResponse):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = Field(default=None, exclude_if=_is_none)


class ChatCompletionChunk(OpenAIResponse):
    """`usage` is null on every chunk but the last when stream_options.include_usage is set,
    and absent otherwise (the serving layer decides which, at dump time)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(OpenAIResponse):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "lmserve"
    root: str | None = None  # vLLM's: what was loaded (folder, hub id or .gguf file)
    max_model_len: int | None = None


class ModelList(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(OpenAIResponse):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(OpenAIResponse):
    prompt: str
