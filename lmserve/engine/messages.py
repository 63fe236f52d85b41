"""Messages between the front-end and the EngineCore (msgspec Structs, msgpack on the wire)."""

from __future__ import annotations

import msgspec

from lmserve.sampling_params import SamplingParams


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float | None = None
    priority: int = 0
    cache_salt: str | None = None


class LogprobsLists(msgspec.Struct, array_like=True):
    """Logprobs of k positions. Column 0 is the token actually sampled (or, for prompt
    logprobs, the prompt's next token); columns 1.. are the top-N most likely tokens."""

    token_ids: list[list[int]]  # [k][N + 1]
    logprobs: list[list[float]]  # [k][N + 1]
    ranks: list[int]  # [k] rank of column 0's token (1 = most likely)


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: LogprobsLists | None = None  # one row per new token
    new_prompt_logprobs: LogprobsLists | None = None  # rows for prompt tokens computed now
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id that ended it, if any
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    outputs: list[EngineCoreOutput] = []
    timestamp: float = 0.0
