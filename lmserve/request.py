"""Request: the engine-side state of one sequence, owned by the scheduler."""

from __future__ import annotations

import enum
import time

from lmserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    # Admitted with KV to load from a connector (lmserve/kv_transfer/): its blocks are
    # allocated and it is not scheduled until the workers report what arrived.
    WAITING_FOR_REMOTE_KVS = enum.auto()
    # Structured outputs: set aside (holding nothing) while its grammar compiles in the
    # EngineCore's pool (lmserve/core/structured_output.py); then it joins the waiting queue.
    WAITING_FOR_FSM = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # Everything after this point is finished.
    FINISHED_STOPPED = enum.auto()  # EOS, a stop token id (or, front-end side, a stop string)
    FINISHED_LENGTH_CAPPED = enum.auto()  # max_tokens or max_model_len
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()  # could not run (its grammar failed to compile or timed out)

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """Token ids, progress and status of one sequence.

    Invariant: `num_computed_tokens <= num_tokens_with_spec`; the scheduler moves
    `num_computed_tokens` toward it, and a step whose scheduled tokens reach the last known token
    yields one new sampled token (plus one per accepted draft token with speculative decoding,
    after which the scheduler takes back the rejected drafts from `num_computed_tokens`).
    """

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "sampling_params",
        "eos_token_id",
        "arrival_time",
        "priority",
        "cache_salt",
        "max_tokens",
        "status",
        "stop_reason",
        "all_token_ids",
        "num_prompt_tokens",
        "num_computed_tokens",
        "num_cached_tokens",
        "num_preemptions",
        "block_hashes",
        "queue_time",
        "spec_token_ids",
        "num_output_placeholders",
        "mm_features",
        "structured_output",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_id: int | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        max_model_len: int | None = None,
        mm_features: list | None = None,  # core.messages.MultiModalFeature (no import: a cycle)
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority  # lower value = scheduled first (vLLM's convention)
        self.cache_salt = cache_salt  # isolates this request's prefix-cache entries
        self.num_prompt_tokens = len(prompt_token_ids)
        max_tokens = sampling_params.max_tokens
        if max_model_len is not None:
            room = max(max_model_len - self.num_prompt_tokens, 1)
            max_tokens = room if max_tokens is None else min(max_tokens, room)
        self.max_tokens: int = max_tokens if max_tokens is not None else 2**31
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.all_token_ids: list[int] = list(prompt_token_ids)  # prompt + output
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prompt tokens served from the prefix cache; -1 = unset
        self.num_preemptions = 0
        self.block_hashes: list[bytes] = []  # hashes of full blocks, filled by the KV manager
        self.queue_time: float | None = None  # seconds from arrival to first scheduled
        # Draft tokens proposed for the positions after the last known token (speculative
        # decoding); scheduled next step after it, verified, then replaced by new proposals.
        self.spec_token_ids: list[int] = []
        # Steps scheduled whose sampled token is not known yet (async scheduling): the next
        # step is scheduled as if they were, with the device feeding those tokens to it.
        self.num_output_placeholders = 0
        # Images of the prompt, in prompt order ([] for text): each fills a range of
        # placeholder tokens whose embeddings come from the vision encoder.
        self.mm_features: list = mm_features or []
        # core.structured_output.StructuredOutputRequest for a constrained request, else None.
        self.structured_output = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        return len(self.all_token_ids) + len(self.spec_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.all_token_ids.extend(token_ids)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens})"
        )
