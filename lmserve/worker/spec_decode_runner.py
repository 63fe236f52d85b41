"""The model runner's speculative-decoding step (only built when `speculative_config` is set).

    execute_model:  write_drafts ─► prepare_inputs ─► forward ─► sample_and_propose
                    (scheduled drafts go           (target      │
                     after the known tokens)        logits at    ├─ verify: logits at each
                                                    every token) │  draft position + the last
                                                                 │  one, rejection sampler,
                                                                 │  append 1..k+1 tokens
                                                                 ├─ prompt logprobs
                                                                 └─ propose: k drafts per
                                                                    request for the next step

Every sampling request goes through the rejection sampler (one with no drafts simply samples
its bonus row, from the same distribution as the plain sampler). The drafts travel back in
`ModelRunnerOutput.spec_token_ids`; the scheduler schedules them next step and rolls back
`num_computed_tokens` over the rejected ones — the runner needs no rollback of its own, since
its persistent batch only ever appends the tokens actually emitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from lmserve.attention import AttentionBackend
from lmserve.config import EngineConfig, SpeculativeConfig
from lmserve.core.messages import LogprobsLists
from lmserve.core.sched_output import ModelRunnerOutput, SchedulerOutput
from lmserve.sample.grammar import build_grammar_mask
from lmserve.sample.logprobs import LogprobsTensors
from lmserve.sample.rejection_sampler import RejectionSampler
from lmserve.spec_decode.draft_proposer import DraftModelProposer
from lmserve.spec_decode.metadata import SpecDecodeMetadata
from lmserve.spec_decode.ngram_proposer import NgramProposer
from lmserve.worker.device_inputs import DeviceInputs
from lmserve.worker.input_batch import FlatInputs, InputBatch
from lmserve.worker.sampling_inputs import RepeatedInputs, build_sampling_metadata


class TargetRunner(Protocol):
    """What this module uses of the target model's runner (ModelRunner satisfies it). A
    protocol, so that the runner imports this module and not the other way round."""

    config: EngineConfig
    device: torch.device
    block_size: int
    vocab_size: int
    input_batch: InputBatch
    inputs: DeviceInputs
    attn_backend: AttentionBackend
    repeated_inputs: RepeatedInputs
    model: Any  # the target model: compute_logits(hidden) -> logits

    def compute_prompt_logprobs(
        self, flat: FlatInputs, hidden: torch.Tensor
    ) -> dict[str, LogprobsTensors]: ...


@dataclass(slots=True)
class _Verified:
    """Host results of one step's verification, one row per sampling request."""

    token_ids: np.ndarray  # [num_sampling, max_k + 1] emitted tokens, left-aligned
    num_tokens: np.ndarray  # [num_sampling] how many were emitted (accepted drafts + 1)
    row_start: np.ndarray  # [num_sampling] first target row of each request
    logprobs: LogprobsLists | None  # [num_rows, N + 1] one row per target row


class SpecDecodeRunner:
    def __init__(self, runner: TargetRunner, config: SpeculativeConfig) -> None:
        config = config.finalize(runner.config.model_config)  # the draft's config (idempotent)
        self.runner = runner
        self.num_spec_tokens = config.num_speculative_tokens
        self.max_model_len = runner.input_batch.max_model_len
        self.rejection_sampler = RejectionSampler()
        self.ngram: NgramProposer | None = None
        self.drafter: DraftModelProposer | None = None
        if config.method == "ngram":
            self.ngram = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        else:
            self.drafter = DraftModelProposer(
                config.draft_model_config, runner.block_size, runner.inputs, runner.attn_backend
            )

    # ---- set-up hooks (the draft model's weights and KV cache) --------------------------------
    def load_model(self) -> None:
        if self.drafter is not None:
            self.drafter.load_model()

    def kv_cache_bytes_per_block(self) -> int:
        return self.drafter.kv_cache_bytes_per_block() if self.drafter is not None else 0

    def initialize_kv_cache(self, num_blocks: int) -> None:
        if self.drafter is not None:
            self.drafter.initialize_kv_cache(num_blocks)

    # ---- one step -----------------------------------------------------------------------------
    def write_drafts(self, scheduler_output: SchedulerOutput) -> None:
        """Before `prepare_inputs`: scheduled drafts become the tokens after the known ones."""
        batch = self.runner.input_batch
        for req_id, draft_token_ids in scheduler_output.scheduled_spec_decode_tokens.items():
            batch.write_draft_tokens(batch.req_id_to_index[req_id], draft_token_ids)

    def sample_and_propose(
        self,
        scheduler_output: SchedulerOutput,
        flat: FlatInputs,
        hidden: torch.Tensor,  # [num_tokens, hidden_size] the target's output
    ) -> ModelRunnerOutput:
        sampling = flat.completes_known_tokens  # [num_reqs] bool
        sample_rows = flat.req_rows[sampling]  # [num_sampling]
        verified = None
        if len(sample_rows):
            verified = self._verify(scheduler_output, flat, hidden, sample_rows)
        prompt_logprobs = {
            req_id: LogprobsLists.from_tensors(tensors)
            for req_id, tensors in self.runner.compute_prompt_logprobs(flat, hidden).items()
        }
        if self.drafter is not None:
            self.drafter.forward_scheduled(flat)
        drafts = self._propose(sample_rows)
        return self._collect(flat, sample_rows, verified, drafts, prompt_logprobs)

    def _verify(
        self,
        scheduler_output: SchedulerOutput,
        flat: FlatInputs,
        hidden: torch.Tensor,
        sample_rows: np.ndarray,  # [num_sampling]
    ) -> _Verified:
        runner, batch = self.runner, self.runner.input_batch
        scheduled = scheduler_output.scheduled_spec_decode_tokens
        drafts = [scheduled.get(batch.req_ids[r], []) for r in sample_rows.tolist()]
        last_index = flat.logits_indices[flat.completes_known_tokens]
        spec = SpecDecodeMetadata.build(drafts, last_index, runner.device)
        logits = runner.model.compute_logits(hidden[spec.logits_indices_dev])  # [num_rows, vocab]
        # Target row j of a request sees its known tokens plus its drafts 1..j.
        row_batch_rows = np.repeat(sample_rows, spec.row_repeats())  # [num_rows]
        num_tokens = batch.num_tokens[row_batch_rows] + spec.row_offsets()
        metadata = build_sampling_metadata(
            batch, row_batch_rows, runner.vocab_size, runner.device, num_tokens,
            repeated=runner.repeated_inputs,
        )  # fmt: skip
        if scheduler_output.structured_output is not None:  # rows after each draft, too
            req_ids = [batch.req_ids[r] for r in sample_rows.tolist()]
            metadata.grammar_mask = build_grammar_mask(
                scheduler_output.structured_output, req_ids, spec.row_start, runner.device
            )
        generators = {
            i: batch.generators[r] for i, r in enumerate(sample_rows.tolist()) if r in batch.generators
        }  # fmt: skip
        out = self.rejection_sampler(spec, logits, metadata, generators)
        host = torch.cat([out.output_token_ids, out.num_output_tokens[:, None]], dim=1)
        host = host.cpu().numpy()  # one device->host copy for tokens and counts
        token_ids, num_tokens_out = host[:, :-1], host[:, -1]
        batch.append_token_ids(sample_rows, token_ids, num_tokens_out)
        logprobs = LogprobsLists.from_tensors(out.logprobs) if out.logprobs is not None else None
        return _Verified(token_ids, num_tokens_out, spec.row_start, logprobs)

    def _num_drafts(self, rows: np.ndarray) -> np.ndarray:  # [n] drafts worth proposing
        """Up to k, leaving room for the bonus token within max_tokens and max_model_len
        (the scheduler applies the same cap; here it saves draft-model forwards)."""
        batch = self.runner.input_batch
        num_tokens = batch.num_tokens[rows].astype(np.int64)
        num_output = num_tokens - batch.num_prompt_tokens[rows]
        room = np.minimum(batch.max_tokens[rows] - num_output, self.max_model_len - num_tokens)
        return np.clip(room - 1, 0, self.num_spec_tokens)

    def _propose(self, sample_rows: np.ndarray) -> list[list[int]]:  # per sampling request
        if not len(sample_rows):
            return []
        batch = self.runner.input_batch
        num_drafts = self._num_drafts(sample_rows)
        if self.ngram is not None:  # one pass over the batch
            num_tokens = batch.num_tokens[sample_rows]
            tokens = batch.token_ids[sample_rows, : int(num_tokens.max())]  # [n, longest]
            return [d.tolist() for d in self.ngram.propose_batch(tokens, num_tokens, num_drafts)]
        drafts = self.drafter.propose(batch, sample_rows, num_drafts)  # [n, max drafts]
        return [drafts[i, :n].tolist() for i, n in enumerate(num_drafts.tolist())]

    def _collect(
        self,
        flat: FlatInputs,
        sample_rows: np.ndarray,
        verified: _Verified | None,
        drafts: list[list[int]],
        prompt_logprobs: dict[str, LogprobsLists],
    ) -> ModelRunnerOutput:
        batch = self.runner.input_batch
        req_ids = [batch.req_ids[r] for r in flat.req_rows]
        sampled: list[list[int]] = [[] for _ in req_ids]
        spec_token_ids: list[list[int]] = [[] for _ in req_ids]
        logprobs: list[LogprobsLists | None] = [None] * len(req_ids)
        positions = np.nonzero(flat.completes_known_tokens)[0].tolist()
        for j, pos in enumerate(positions):  # a loop over requests, not tokens
            n = int(verified.num_tokens[j])
            sampled[pos] = verified.token_ids[j, :n].tolist()
            spec_token_ids[pos] = drafts[j]
            if verified.logprobs is not None and batch.num_logprobs[sample_rows[j]] >= 0:
                start = int(verified.row_start[j])
                logprobs[pos] = verified.logprobs.rows(start, start + n)
        return ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            spec_token_ids=spec_token_ids,
        )
