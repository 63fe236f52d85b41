"""The scheduler's decision for one step, and the runner's answer.

A worker keeps a persistent copy of every running request (its InputBatch). A request is sent
in full the first time a worker sees it (`NewRequestData`) — and again after a preemption,
since the worker dropped it — and afterwards only as a diff (`CachedRequestData`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmserve.core.messages import LogprobsLists, MultiModalFeature
from lmserve.kv_transfer.base import KVConnectorMetadata, KVConnectorOutput
from lmserve.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty only when resuming after a preemption
    sampling_params: SamplingParams
    eos_token_id: int | None  # banned until min_tokens are out
    block_ids: list[int]  # all blocks of the request, in token order
    num_computed_tokens: int  # tokens already in the KV cache (prefix-cache hit)
    # Images of the prompt (placeholder ranges and content hashes, no pixels); None: text.
    mm_features: list[MultiModalFeature] | None = None


@dataclass(slots=True)
class CachedRequestData:
    """Diffs for requests the worker already holds; the lists are parallel to `req_ids`."""

    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)  # blocks appended this step
    num_computed_tokens: list[int] = field(default_factory=list)  # before this step

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)


@dataclass(slots=True)
class StructuredOutputBatch:
    """One step's token masks for the constrained requests that sample in it (structured
    outputs; lmserve/core/structured_output.py). A request has 1 + len(its scheduled drafts)
    rows from `req_row_start[req_id]`: row j allows what may follow its known tokens and
    drafts 1..j. A numpy array: one zero-copy frame on the wire (tensor parallelism), no
    copy at all in one process."""

    req_row_start: dict[str, int]  # req_id -> its first row
    bitmask: Any  # numpy [num_rows, num_words] int32; bit t % 32 of word t // 32: t allowed
    num_words: int  # ceil(tokens covered / 32); tokens past the rows are never allowed


@dataclass(slots=True)
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]  # full data, first time a worker sees a request
    scheduled_cached_reqs: CachedRequestData  # diffs only: new block ids
    num_scheduled_tokens: dict[str, int]  # req_id -> tokens this step (the whole decision)
    total_num_scheduled_tokens: int  # sum of the above; <= max_num_batched_tokens
    finished_req_ids: set[str]  # finished or aborted since the last step: drop them
    preempted_req_ids: set[str]  # preempted this step: drop them (they come back as new)
    # req_id -> draft tokens scheduled this step (speculative decoding): the last len(...) of
    # the request's num_scheduled_tokens, right after its last known token.
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    # The KV connector's loads and saves for this step (None: no connector configured).
    kv_connector_metadata: KVConnectorMetadata | None = None
    # Images to encode before this step's forward (with their pixels), each once even when
    # several requests read it; their outputs join the worker's encoder cache by identifier.
    scheduled_encoder_inputs: list[MultiModalFeature] = field(default_factory=list)
    # Encoder cache entries evicted: the worker drops them before encoding this step's.
    free_encoder_mm_hashes: list[str] = field(default_factory=list)
    # Structured outputs: the constrained requests that sample this step, and their token
    # masks (None: none of them, or masks pending). Pending (async scheduling only): a token
    # of theirs from the step in flight is not known yet, so the masks come later, through
    # the runner's `sample_tokens`, once that step's output has advanced their grammars.
    structured_output_request_ids: list[str] = field(default_factory=list)
    structured_output: StructuredOutputBatch | None = None
    pending_structured_output_tokens: bool = False

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(slots=True)
class ModelRunnerOutput:
    req_ids: list[str]  # every request scheduled this step, in batch order
    req_id_to_index: dict[str, int]
    # [] for a request still mid-prompt (chunked prefill); with speculative decoding, the
    # accepted drafts then one sampled token (1..k+1 tokens).
    sampled_token_ids: list[list[int]]
    # Parallel to req_ids: logprobs of the sampled tokens, for requests that asked.
    logprobs: list[LogprobsLists | None] = field(default_factory=list)
    # req_id -> logprobs of the prompt tokens computed this step (requests that asked).
    prompt_logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    # Parallel to req_ids: draft tokens proposed for each request's next step ([] for none);
    # empty when speculative decoding is off.
    spec_token_ids: list[list[int]] = field(default_factory=list)
    # The KV connector's report: loads finished since the last step, counters.
    kv_connector_output: KVConnectorOutput | None = None
    encoder_seconds: float = 0.0  # time this step's vision encoder ran
