"""What the EngineCore takes and gives: the messages between the front-end and the EngineCore,
and the records the workers hand back inside them (msgspec Structs, msgpack on the wire).

They live beside the core, not in the front-end's `engine/`, so the EngineCore, the scheduler and
the workers import them without depending on the front-end; the front-end imports them from
here. The codec that puts them on a socket is `lmserve/serial_utils.py`."""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from lmserve.kv_transfer.base import KVTransferStats
from lmserve.sampling_params import SamplingParams


class MultiModalFeature(msgspec.Struct, array_like=True, omit_defaults=True):
    """One image of a prompt: the range of placeholder tokens it fills and its preprocessed
    pixels. Built in the front-end (lmserve/engine/mm_processor.py); the pixels cross to the
    EngineCore as one zero-copy frame, never as a pickled image.

    The placeholder tokens [offset, offset + length) of the prompt are replaced, in the
    language model's input embeddings, by the rows of the image's encoder output."""

    identifier: str  # content hash of the pixels (the encoder cache's and prefix cache's key)
    offset: int  # position of the first placeholder token in the prompt
    length: int  # placeholder tokens = rows of the encoder output
    pixel_values: Any = None  # numpy [num_channels, height, width] float32
    modality: str = "image"

    @property
    def end(self) -> int:
        return self.offset + self.length


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float | None = None
    priority: int = 0
    cache_salt: str | None = None
    mm_features: list[MultiModalFeature] | None = None  # images, in prompt order


class LogprobsLists(msgspec.Struct, array_like=True):
    """Logprobs of k positions. Column 0 is the token actually sampled (or, for prompt
    logprobs, the prompt's next token); columns 1.. are the top-N most likely tokens.
    numpy arrays (zero-copy frames on the wire) or nested lists."""

    token_ids: Any  # [k, N + 1] int64
    logprobs: Any  # [k, N + 1] float32
    ranks: Any  # [k] int64, rank of column 0's token (1 = most likely)

    @classmethod
    def from_tensors(cls, tensors: Any) -> LogprobsLists:
        """From device tensors with the same fields (a LogprobsTensors): host numpy arrays,
        which travel to the front-end as zero-copy frames."""
        return cls(
            token_ids=tensors.token_ids.cpu().numpy(),
            logprobs=tensors.logprobs.cpu().numpy(),
            ranks=tensors.ranks.cpu().numpy(),
        )

    def rows(self, start: int, end: int) -> LogprobsLists:
        """Positions [start, end)."""
        return LogprobsLists(
            self.token_ids[start:end], self.logprobs[start:end], self.ranks[start:end]
        )


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: LogprobsLists | None = None  # one row per new token
    new_prompt_logprobs: LogprobsLists | None = None  # rows for prompt tokens computed now
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id that ended it, if any
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    queue_time: float | None = None  # seconds waiting before first scheduled (first output)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SpecDecodeStats(msgspec.Struct, array_like=True, omit_defaults=True):
    """Speculative decoding counters (increments). Acceptance rate = accepted / draft tokens;
    acceptance rate at draft position j = num_accepted_tokens_per_pos[j] /
    num_draft_tokens_per_pos[j] (of the drafts proposed at position j, the share accepted — a
    draft is accepted only if every earlier one was)."""

    num_drafts: int = 0  # verifications: requests verified with >= 1 draft token
    num_draft_tokens: int = 0  # draft tokens verified
    num_accepted_tokens: int = 0  # draft tokens accepted
    num_draft_tokens_per_pos: list[int] = []  # [k] drafts verified at position j
    num_accepted_tokens_per_pos: list[int] = []  # [k] accepted at position j

    def observe(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        """One request's verification: the first `num_accepted_tokens` drafts were accepted."""
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens
        _add_ones(self.num_draft_tokens_per_pos, num_draft_tokens)
        _add_ones(self.num_accepted_tokens_per_pos, num_accepted_tokens)
        accepted, drafted = self.num_accepted_tokens_per_pos, self.num_draft_tokens_per_pos
        accepted.extend([0] * (len(drafted) - len(accepted)))  # same length: one entry per j

    def add(self, other: SpecDecodeStats) -> None:
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        _add_lists(self.num_draft_tokens_per_pos, other.num_draft_tokens_per_pos)
        _add_lists(self.num_accepted_tokens_per_pos, other.num_accepted_tokens_per_pos)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def acceptance_rate_per_pos(self) -> list[float]:
        accepted, drafted = self.num_accepted_tokens_per_pos, self.num_draft_tokens_per_pos
        return [a / d if d else 0.0 for a, d in zip(accepted, drafted)]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification (accepted drafts + the one sampled token)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "num_draft_tokens_per_pos": list(self.num_draft_tokens_per_pos),
            "num_accepted_tokens_per_pos": list(self.num_accepted_tokens_per_pos),
            "acceptance_rate_per_pos": self.acceptance_rate_per_pos(),
        }


def _add_ones(counts: list[int], n: int) -> None:
    """counts[j] += 1 for j < n, growing `counts` as needed."""
    if len(counts) < n:
        counts.extend([0] * (n - len(counts)))
    for j in range(n):
        counts[j] += 1


def _add_lists(counts: list[int], other: list[int]) -> None:
    if len(counts) < len(other):
        counts.extend([0] * (len(other) - len(counts)))
    for j, count in enumerate(other):
        counts[j] += count


class EncoderStats(msgspec.Struct, array_like=True, omit_defaults=True):
    """The vision encoder and its cache (multimodal models only)."""

    cache_usage: float = 0.0  # encoder cache slots (embedding rows) in use / all slots
    cache_queries: int = 0  # images looked up in the encoder cache when scheduled (increment)
    cache_hits: int = 0  # ... found there, encoder not run (increment)
    num_encoder_inputs: int = 0  # images encoded (increment)
    encoder_seconds: float = 0.0  # time the encoder ran (increment)


class SchedulerStats(msgspec.Struct, array_like=True, omit_defaults=True):
    """Engine-side gauges (current values) and counters (increments since the last stats)."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0  # blocks in use / all blocks
    prefix_cache_queries: int = 0  # prompt tokens looked up (increment)
    prefix_cache_hits: int = 0  # prompt tokens found (increment)
    num_preemptions: int = 0  # (increment)
    iteration_tokens: int = 0  # tokens the step that produced these stats scheduled (0: none)
    spec_decode: SpecDecodeStats | None = None  # (increments) None: nothing verified
    kv_transfer: KVTransferStats | None = None  # (increments) None: no connector activity
    encoder: EncoderStats | None = None  # None: a text-only model


class UtilityOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    call_id: int
    result: Any = None
    error: str | None = None


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    outputs: list[EngineCoreOutput] = []
    timestamp: float = 0.0
    scheduler_stats: SchedulerStats | None = None
    utility_output: UtilityOutput | None = None


class EngineCoreRequestType(enum.Enum):
    """First frame of every front-end → EngineCore message."""

    ADD = b"\x00"
    ABORT = b"\x01"
    UTILITY = b"\x02"  # payload: (call_id, method name, args); answered by a UtilityOutput


class ReadyMessage(msgspec.Struct):
    """EngineCore → front-end once at start-up: ready (with facts) or the failure's cause."""

    ok: bool
    num_gpu_blocks: int = 0
    error: str | None = None  # the real cause, traceback included, when ok is False
