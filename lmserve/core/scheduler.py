"""The token-budget scheduler. There is no prefill or decode phase.

Each step decides `num_scheduled_tokens = {request_id: num_tokens}` under one budget
(`max_num_batched_tokens`) and `max_num_seqs`. Every request simply moves its
`num_computed_tokens` toward `num_tokens`; that one rule gives:
  - decode:            1 token (the last sampled one) per running request;
  - chunked prefill:   a long prompt takes what is left of the budget, the rest next step;
  - prefix caching:    a hit starts `num_computed_tokens` at the cached length;
  - preemption:        when blocks run out, a victim frees its blocks and goes back to waiting
                       with `num_computed_tokens = 0` (recompute; its cached blocks often hit);
  - speculative decoding: a running request's draft tokens (`spec_token_ids`) count as tokens
                       to compute, under the same budget, after its last known token; after
                       verification `num_computed_tokens` is taken back by the drafts rejected;
  - KV connector:      a request whose prompt chunks are stored outside the GPU pool
                       (lmserve/kv_transfer/) is admitted with its blocks allocated and waits
                       aside (WAITING_FOR_REMOTE_KVS, not blocking anyone) while the workers
                       load them; what arrived advances `num_computed_tokens`, the rest is
                       computed like any prompt;
  - async scheduling:  a step that samples leaves a placeholder (`num_output_placeholders`)
                       until its output arrives; the next step is scheduled as if that token
                       were known (the worker feeds it from the device), and a request whose
                       steps in flight reach its length limit is not scheduled again;
  - images:            a step that computes any of an image's placeholder tokens needs its
                       encoder output, which is encoded once under a per-step encoder budget
                       (lmserve/core/encoder_cache_manager.py) or the step stops before it;
  - structured outputs: a constrained request waits aside (WAITING_FOR_FSM) while its grammar
                       compiles in a thread pool, then queues like any other; each step carries
                       the token masks of the constrained requests that sample in it
                       (lmserve/core/structured_output.py). Under async scheduling a
                       constrained request is scheduled ahead like any other; a step whose
                       masks depend on a token still in flight is marked pending, and its
                       masks are made once that token is known, before the step samples.
Running requests are served first, then waiting ones (only in a step with no preemption).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from lmserve.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from lmserve.core.encoder_cache_manager import (
    EncoderCacheManager,
    commit_encoder_inputs,
    schedule_encoder_inputs,
)
from lmserve.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
from lmserve.core.messages import (
    EncoderStats,
    EngineCoreOutput,
    MultiModalFeature,
    SchedulerStats,
    SpecDecodeStats,
)
from lmserve.core.sched_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from lmserve.kv_transfer.base import KVConnectorBase, KVConnectorOutput, KVTransferStats
from lmserve.request import Request, RequestStatus
from lmserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from lmserve.core.structured_output import StructuredOutputManager

logger = logging.getLogger(__name__)


class WaitingQueue:
    """Waiting requests. fcfs: arrival order, preempted ones back at the front. priority:
    lowest `priority` value first, then earliest arrival."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self._fifo: deque[Request] = deque()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._tiebreak = itertools.count()

    def add(self, request: Request, front: bool = False) -> None:
        if self.policy == "priority":
            key = (request.priority, request.arrival_time, next(self._tiebreak), request)
            heapq.heappush(self._heap, key)
        elif front:
            self._fifo.appendleft(request)
        else:
            self._fifo.append(request)

    def peek(self) -> Request:
        return self._heap[0][3] if self.policy == "priority" else self._fifo[0]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3] if self.policy == "priority" else self._fifo.popleft()

    def remove(self, request: Request) -> None:
        if self.policy == "priority":
            self._heap = [e for e in self._heap if e[3] is not request]
            heapq.heapify(self._heap)
        else:
            self._fifo.remove(request)

    def __len__(self) -> int:
        return len(self._heap) if self.policy == "priority" else len(self._fifo)

    def __iter__(self):
        return iter([e[3] for e in self._heap] if self.policy == "priority" else self._fifo)


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_gpu_blocks: int,
        speculative_config: SpeculativeConfig | None = None,
        kv_connector: KVConnectorBase | None = None,
        enable_kv_cache_events: bool = False,
        structured_output: StructuredOutputManager | None = None,
    ) -> None:
        self.config = scheduler_config
        self.max_num_batched_tokens: int = scheduler_config.max_num_batched_tokens
        if scheduler_config.max_num_seqs is None:
            raise ValueError("max_num_seqs is unresolved: EngineConfig.resolve_device_defaults()")
        self.max_num_seqs: int = scheduler_config.max_num_seqs
        self.max_model_len = scheduler_config.max_model_len
        self.kv_cache_manager = KVCacheManager(
            num_gpu_blocks=num_gpu_blocks,
            block_size=cache_config.block_size,
            max_model_len=scheduler_config.max_model_len,
            enable_caching=cache_config.enable_prefix_caching,
            hash_algo=cache_config.prefix_caching_hash_algo,
            enable_kv_cache_events=enable_kv_cache_events,
        )
        self.requests: dict[str, Request] = {}
        self.waiting = WaitingQueue(scheduler_config.policy)
        self.running: list[Request] = []  # in admission order
        self.finished_req_ids: set[str] = set()  # since the last schedule()
        self.num_preemptions = 0  # total, for metrics and tests
        self._last_reported = (0, 0, 0)  # (prefix queries, prefix hits, preemptions)
        spec = speculative_config
        self.num_spec_tokens = spec.num_speculative_tokens if spec else 0
        # A draft model writes KV for its k proposals past the step's last token (see
        # lmserve/spec_decode/draft_proposer.py), so every allocation reserves k more slots.
        self.num_lookahead_tokens = (
            self.num_spec_tokens if spec and spec.method == "draft_model" else 0
        )
        self._spec_stats = SpecDecodeStats()  # since the last make_stats()
        self.kv_connector = kv_connector  # the scheduler side of a KV connector, if any
        self.loading: dict[str, Request] = {}  # WAITING_FOR_REMOTE_KVS, by id
        self.aborted_loading: dict[str, Request] = {}  # aborted mid-load: blocks freed on report
        self.kv_loaded: set[str] = set()  # waiting again after a load, holding their blocks
        self._kv_stats = KVTransferStats()  # since the last make_stats()
        # Multimodal models only (None for text: no per-step image work at all).
        self.encoder_cache: EncoderCacheManager | None = None
        self.encoder_budget = scheduler_config.max_num_encoder_input_tokens
        if scheduler_config.encoder_cache_size:
            self.encoder_cache = EncoderCacheManager(scheduler_config.encoder_cache_size)
        self._encoder_stats = EncoderStats()  # worker-side increments since make_stats()
        self._last_encoder_counts = (0, 0)  # (queries, hits) at the last make_stats()
        # Structured outputs: the grammar manager (made on the first constrained request when
        # None), requests whose grammar compiles, how many constrained requests are admitted
        # (0: no per-step mask work at all), and requests that failed since the last step.
        self.structured_output = structured_output
        self.compiling: dict[str, Request] = {}  # WAITING_FOR_FSM, by id
        self.num_constrained = 0
        self.failed: list[EngineCoreOutput] = []

    # ---- requests in and out ---------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        if request.sampling_params.structured_outputs is not None:
            self._start_grammar(request)
            return
        self.kv_cache_manager.touch_prefix(request)
        self.waiting.add(request)

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        """Abort by id (unknown or finished ids are ignored); frees their blocks."""
        aborted = []
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            elif request.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                # A worker thread may still be writing its blocks: free them once it reports.
                self.aborted_loading[req_id] = self.loading.pop(req_id)
            elif request.status == RequestStatus.WAITING_FOR_FSM:
                del self.compiling[req_id]
            else:
                self.waiting.remove(request)
            keep_blocks = req_id in self.aborted_loading
            request.status = RequestStatus.FINISHED_ABORTED
            self._free_request(request, free_blocks=not keep_blocks)
            aborted.append(request)
        return aborted

    def has_unfinished_requests(self) -> bool:
        return (
            bool(self.running or self.loading or self.aborted_loading or self.compiling)
            or len(self.waiting) > 0
        )

    def has_finished_requests(self) -> bool:
        return bool(self.finished_req_ids)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.running) + len(self.waiting) + len(self.loading) + len(self.compiling)

    def make_stats(self) -> SchedulerStats:
        """Current gauges, and counter increments since the previous call."""
        prefix = self.kv_cache_manager.prefix_cache_stats
        totals = (prefix.queries, prefix.hits, self.num_preemptions)
        last = self._last_reported
        self._last_reported = totals
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting) + len(self.loading) + len(self.compiling),
            kv_cache_usage=self.kv_cache_manager.usage,
            prefix_cache_queries=totals[0] - last[0],
            prefix_cache_hits=totals[1] - last[1],
            num_preemptions=totals[2] - last[2],
            spec_decode=self._take_spec_stats(),
            kv_transfer=self._take_kv_stats(),
            encoder=self._take_encoder_stats(),
        )

    def _take_encoder_stats(self) -> EncoderStats | None:
        if self.encoder_cache is None:
            return None
        stats, self._last_encoder_counts = self.encoder_cache.make_stats(self._last_encoder_counts)
        stats.num_encoder_inputs = self._encoder_stats.num_encoder_inputs
        stats.encoder_seconds = self._encoder_stats.encoder_seconds
        self._encoder_stats = EncoderStats()
        return stats

    def _take_kv_stats(self) -> KVTransferStats | None:
        if self.kv_connector is not None:
            scheduler_side = self.kv_connector.take_stats()
            if scheduler_side is not None:
                self._kv_stats.add(scheduler_side)
        stats, self._kv_stats = self._kv_stats, KVTransferStats()
        return None if stats.is_empty() else stats

    def _take_spec_stats(self) -> SpecDecodeStats | None:
        stats = self._spec_stats
        if not stats.num_drafts:
            return None
        self._spec_stats = SpecDecodeStats()
        return stats

    # ---- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if self.compiling:
            self._admit_compiled()
        step = _StepPlan(self.max_num_batched_tokens, self.encoder_budget or 0)
        self._schedule_running(step)
        if not step.preempted:
            self._schedule_waiting(step)
        constrained: list[Request] = []  # constrained requests that sample this step
        for request in step.scheduled:  # the decision is made: advance progress
            request.num_computed_tokens += step.num_scheduled_tokens[request.request_id]
            if request.num_computed_tokens >= request.num_tokens + request.num_output_placeholders:
                request.num_output_placeholders += 1  # this step samples its next token
                if request.structured_output is not None:
                    constrained.append(request)
        out = SchedulerOutput(
            scheduled_new_reqs=step.new_reqs,
            scheduled_cached_reqs=step.cached_reqs,
            num_scheduled_tokens=step.num_scheduled_tokens,
            total_num_scheduled_tokens=self.max_num_batched_tokens - step.budget,
            finished_req_ids=self.finished_req_ids,
            preempted_req_ids={r.request_id for r in step.preempted},
            scheduled_spec_decode_tokens=step.spec_tokens,
        )
        if constrained:
            self._attach_grammar(out, constrained, step.spec_tokens)
        if self.encoder_cache is not None:
            out.scheduled_encoder_inputs = step.encoder_inputs
            out.free_encoder_mm_hashes = self.encoder_cache.take_freed()
        if self.kv_connector is not None:
            out.kv_connector_metadata = self.kv_connector.build_connector_meta(
                out, self.requests, self.kv_cache_manager.get_block_ids
            )
        self.finished_req_ids = set()
        return out

    def _num_new_tokens(self, request: Request, num_computed_tokens: int, budget: int) -> int:
        pending = request.num_output_placeholders  # > 0 only under async scheduling
        if pending and (
            request.num_output_tokens + pending >= request.max_tokens
            or request.num_tokens + pending >= self.max_model_len
        ):
            return 0  # the steps in flight already reach its length limit
        num_new = request.num_tokens_with_spec + pending - num_computed_tokens
        threshold = self.config.long_prefill_token_threshold
        if 0 < threshold < num_new:
            num_new = threshold
        return min(num_new, budget, self.max_model_len - num_computed_tokens)

    def _schedule_running(self, step: _StepPlan) -> None:
        for request in list(self.running):  # a snapshot: preemption edits self.running
            if step.budget <= 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted as a victim earlier in this step
            num_computed = request.num_computed_tokens
            num_new = self._num_new_tokens(request, num_computed, step.budget)
            to_encode = None
            if request.mm_features and num_computed < request.mm_features[-1].end:
                to_encode, num_new = self._plan_encoder_inputs(request, num_computed, num_new, step)
            if num_new <= 0:
                continue
            new_blocks = self._allocate_or_preempt(request, num_new, step)
            if new_blocks is None:  # the request itself was preempted
                continue
            if to_encode is not None:
                self._commit_encoder_inputs(request, num_computed, num_new, to_encode, step)
            step.schedule(request, num_new)
            self._schedule_spec_tokens(request, num_new, step)
            step.cached_reqs.req_ids.append(request.request_id)
            step.cached_reqs.new_block_ids.append(new_blocks.get_block_ids())
            step.cached_reqs.num_computed_tokens.append(request.num_computed_tokens)

    def _plan_encoder_inputs(
        self, request: Request, num_computed: int, num_new: int, step: _StepPlan
    ) -> tuple[list[int], int]:
        """(images to encode, tokens to schedule) for a request whose images are not all
        consumed yet; the step may stop before an image the encoder cannot take now."""
        to_encode, num_new, _ = schedule_encoder_inputs(
            request, num_computed, num_new, step.encoder_budget, self.encoder_cache
        )
        return to_encode, num_new

    def _commit_encoder_inputs(
        self,
        request: Request,
        num_computed: int,
        num_new: int,
        to_encode: list[int],
        step: _StepPlan,
    ) -> None:
        commit_encoder_inputs(request, num_computed, num_new, to_encode, self.encoder_cache)
        for index in to_encode:
            feature = request.mm_features[index]
            step.encoder_budget -= feature.length
            step.encoder_inputs.append(feature)

    def _schedule_spec_tokens(self, request: Request, num_new: int, step: _StepPlan) -> None:
        """Hand the request's drafts that fit in this step (the budget may cut some off) to the
        worker; they are consumed either way, and new ones come back with the step's output."""
        if not request.spec_token_ids:
            return
        num_spec = request.num_computed_tokens + num_new - request.num_tokens
        if num_spec > 0:
            step.spec_tokens[request.request_id] = request.spec_token_ids[:num_spec]
        request.spec_token_ids = []

    def _allocate_or_preempt(
        self, request: Request, num_new: int, step: _StepPlan
    ) -> KVCacheBlocks | None:
        while True:
            new_blocks = self.kv_cache_manager.allocate_slots(
                request, num_new, num_lookahead_tokens=self.num_lookahead_tokens
            )
            if new_blocks is not None:
                return new_blocks
            victim = self._pick_victim()
            self._preempt(victim, step)
            if victim is request:
                return None

    def _pick_victim(self) -> Request:
        if self.config.policy == "priority":  # lowest priority, then latest arrival
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]  # fcfs: the most recently admitted

    def _preempt(self, request: Request, step: _StepPlan) -> None:
        self.running.remove(request)
        step.unschedule(request)
        self.kv_cache_manager.free(request, request.num_computed_tokens)
        if self.encoder_cache is not None:
            self.encoder_cache.free(request)  # re-referenced when it is scheduled again
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_output_placeholders = 0  # a token sampled in flight is dropped
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add(request, front=True)
        step.preempted.append(request)

    def _schedule_waiting(self, step: _StepPlan) -> None:
        kv = self.kv_cache_manager
        # Requests loading KV hold blocks and a place among max_num_seqs, like running ones.
        while (
            len(self.waiting)
            and step.budget > 0
            and len(self.running) + len(self.loading) < self.max_num_seqs
        ):
            request = self.waiting.peek()
            # A request back from a connector load holds its blocks and its computed tokens.
            loaded = request.request_id in self.kv_loaded
            computed_blocks, num_hit = (None, 0) if loaded else kv.get_computed_blocks(request)
            if not loaded and self.kv_connector is not None:
                num_external = self._num_external_tokens(request, num_hit)
                if num_external:
                    if not self._admit_for_loading(request, computed_blocks, num_hit, num_external):
                        break  # no room: wait for running requests to finish
                    continue
            num_computed = request.num_computed_tokens + num_hit
            num_new = self._num_new_tokens(request, num_computed, step.budget)
            to_encode = None
            if request.mm_features and num_computed < request.mm_features[-1].end:
                to_encode, num_new = self._plan_encoder_inputs(request, num_computed, num_new, step)
                if num_new <= 0:
                    break  # the encoder cannot take its next image this step
            if (
                not self.config.enable_chunked_prefill
                and num_new < request.num_tokens - num_computed
            ):
                break  # the whole prompt must fit in one step
            new_blocks = kv.allocate_slots(
                request, num_new, num_hit, computed_blocks, self.num_lookahead_tokens
            )
            if new_blocks is None:
                break  # no room: wait for running requests to finish
            if to_encode is not None:
                self._commit_encoder_inputs(request, num_computed, num_new, to_encode, step)
            self.waiting.pop()
            if loaded:
                self.kv_loaded.discard(request.request_id)
            else:
                kv.prefix_cache_stats.record(request.num_tokens, num_hit)
            self._admit(request, num_computed)
            if not loaded and self.kv_connector is not None:
                self.kv_connector.update_state_after_alloc(
                    request, kv.get_block_ids(request.request_id), 0
                )
            step.schedule(request, num_new)
            step.new_reqs.append(
                NewRequestData(
                    req_id=request.request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    output_token_ids=request.output_token_ids,
                    sampling_params=request.sampling_params,
                    eos_token_id=request.eos_token_id,
                    block_ids=kv.get_block_ids(request.request_id),
                    num_computed_tokens=num_computed,
                    mm_features=_without_pixels(request.mm_features),
                )
            )

    def _admit(self, request: Request, num_computed: int) -> None:
        self.running.append(request)
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = num_computed
        if request.queue_time is None:
            request.queue_time = max(time.monotonic() - request.arrival_time, 0.0)
        if request.num_cached_tokens < 0:  # the GPU hit plus what a connector loaded
            request.num_cached_tokens = num_computed

    # ---- the KV connector's loads -----------------------------------------------------------
    def _num_external_tokens(self, request: Request, num_hit: int) -> int:
        """Tokens after the GPU hit that the connector would load (asynchronously)."""
        num_external, load_async = self.kv_connector.get_num_new_matched_tokens(request, num_hit)
        assert load_async or not num_external, "only asynchronous connector loads are supported"
        return min(num_external, self.max_model_len - num_hit)

    def _admit_for_loading(
        self, request: Request, computed_blocks: KVCacheBlocks, num_hit: int, num_external: int
    ) -> bool:
        """Allocate blocks for the GPU hit and the tokens to load, and set the request aside
        until they arrive. The loaded blocks are hashed into the prefix cache only then (never
        before their KV is there). False when the pool cannot hold them."""
        kv = self.kv_cache_manager
        blocks = kv.allocate_slots(
            request, num_external, num_hit, computed_blocks, delay_cache_blocks=True
        )
        if blocks is None:
            return False
        self.waiting.pop()
        kv.prefix_cache_stats.record(request.num_tokens, num_hit)
        request.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        request.num_computed_tokens = num_hit
        self.loading[request.request_id] = request
        self.kv_connector.update_state_after_alloc(
            request, kv.get_block_ids(request.request_id), num_external
        )
        return True

    def update_from_kv_connector(self, output: KVConnectorOutput | None) -> None:
        """Loads the workers finished: what arrived counts as computed (and joins the prefix
        cache); the request goes back to the front of the queue for the rest."""
        if output is None:
            return
        if output.stats is not None:
            self._kv_stats.add(output.stats)
        if output.tier_changes and self.kv_connector is not None:
            self.kv_cache_manager.add_events(self.kv_connector.tier_events(output))
        for req_id, num_loaded in output.finished_loading.items():
            aborted = self.aborted_loading.pop(req_id, None)
            if aborted is not None:
                self.kv_cache_manager.free(aborted)
                continue
            request = self.loading.pop(req_id, None)
            if request is None:
                continue
            request.num_computed_tokens += num_loaded
            self.kv_cache_manager.cache_blocks(request, request.num_computed_tokens)
            request.status = RequestStatus.WAITING
            self.kv_loaded.add(req_id)
            self.waiting.add(request, front=True)

    # ---- after the forward -----------------------------------------------------------------
    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Append sampled tokens, check stop conditions, free finished requests."""
        self.update_from_kv_connector(runner_output.kv_connector_output)
        if self.encoder_cache is not None:
            self._update_encoder_cache(scheduler_output, runner_output)
        outputs: list[EngineCoreOutput] = []
        finished: list[Request] = []
        accepted = self._accept_grammar_tokens(scheduler_output, runner_output)
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted (or preempted) while the step ran
            index = runner_output.req_id_to_index[req_id]
            sampled = runner_output.sampled_token_ids[index]
            prompt_logprobs = runner_output.prompt_logprobs.get(req_id)
            if sampled:
                request.num_output_placeholders -= 1
            elif prompt_logprobs is None:
                continue  # mid-prompt chunk: nothing to report yet
            scheduled_spec = scheduler_output.scheduled_spec_decode_tokens.get(req_id)
            if scheduled_spec:
                self._take_back_rejected(request, len(scheduled_spec), len(sampled))
            new_token_ids = self._append_and_check_stop(request, sampled) if sampled else []
            if request.structured_output is not None and new_token_ids:
                self._advance_grammar(request, new_token_ids, accepted.get(req_id))
            if request.is_finished:
                finished.append(request)
            elif runner_output.spec_token_ids:
                self._store_drafts(request, runner_output.spec_token_ids[index])
            logprobs = runner_output.logprobs[index] if runner_output.logprobs else None
            if logprobs is not None and len(new_token_ids) < len(sampled):  # a stop cut them
                logprobs = logprobs.rows(0, len(new_token_ids))
            outputs.append(
                EngineCoreOutput(
                    request_id=req_id,
                    new_token_ids=new_token_ids,
                    new_logprobs=logprobs,
                    new_prompt_logprobs=prompt_logprobs,
                    finish_reason=request.status.finish_reason,
                    stop_reason=request.stop_reason,
                    num_cached_tokens=max(request.num_cached_tokens, 0),
                    queue_time=request.queue_time if request.num_output_tokens <= 1 else None,
                )
            )
        if finished:
            done = {r.request_id for r in finished}
            self.running = [r for r in self.running if r.request_id not in done]
            for request in finished:
                self._free_request(request)
        return outputs

    def _update_encoder_cache(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> None:
        """Count the encoder's work and release the images the step consumed (entirely
        before the request's computed tokens): they stay cached until evicted."""
        self._encoder_stats.num_encoder_inputs += len(scheduler_output.scheduled_encoder_inputs)
        self._encoder_stats.encoder_seconds += runner_output.encoder_seconds
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            if request is None or not request.mm_features:
                continue
            if request.num_computed_tokens - num_scheduled >= request.mm_features[-1].end:
                continue  # every image consumed in earlier steps
            for index, feature in enumerate(request.mm_features):
                if feature.end <= request.num_computed_tokens:
                    self.encoder_cache.free_encoder_input(request, index)

    def _take_back_rejected(self, request: Request, num_draft: int, num_sampled: int) -> None:
        """`num_sampled - 1` drafts were accepted; the rest were computed for nothing, so
        `num_computed_tokens` steps back over them (their slots are overwritten next step)."""
        num_accepted = num_sampled - 1
        request.num_computed_tokens -= num_draft - num_accepted
        self._spec_stats.observe(num_draft, num_accepted)

    def _store_drafts(self, request: Request, draft_token_ids: list[int]) -> None:
        """Keep the drafts that could still be output: the step after next emits up to
        len(drafts) + 1 tokens, within max_tokens and max_model_len."""
        room = min(
            request.max_tokens - request.num_output_tokens,
            self.max_model_len - request.num_tokens,
        )
        drafts = list(draft_token_ids[: max(room - 1, 0)])
        if drafts and request.structured_output is not None:
            drafts = request.structured_output.grammar.validate_tokens(drafts)
        request.spec_token_ids = drafts

    def _append_and_check_stop(self, request: Request, sampled: list[int]) -> list[int]:
        params = request.sampling_params
        for i, token_id in enumerate(sampled):
            request.all_token_ids.append(token_id)
            if self._check_stop(request, token_id, params):
                return sampled[: i + 1]
        return sampled

    def _check_stop(self, request: Request, token_id: int, params: SamplingParams) -> bool:
        num_tokens = len(request.all_token_ids)
        num_output = num_tokens - request.num_prompt_tokens
        if num_output >= request.max_tokens or num_tokens >= self.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        if num_output < params.min_tokens:
            return False
        if token_id == request.eos_token_id and not params.ignore_eos:
            request.status = RequestStatus.FINISHED_STOPPED
            return True
        if token_id in params.stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = token_id
            return True
        return False

    # ---- structured outputs (lmserve/core/structured_output.py) ------------------------------
    def _start_grammar(self, request: Request) -> None:
        if self.structured_output is None:
            raise ValueError("structured outputs are not enabled in this scheduler")
        self.structured_output.submit(request)
        request.status = RequestStatus.WAITING_FOR_FSM
        self.compiling[request.request_id] = request

    def _admit_compiled(self) -> None:
        """Requests whose grammar is ready join the waiting queue (in arrival order among
        themselves); failed or timed-out ones finish with an error."""
        from lmserve.core.structured_output import GrammarCompileError

        for req_id, request in list(self.compiling.items()):
            try:
                ready = self.structured_output.poll(request)
            except GrammarCompileError as e:
                del self.compiling[req_id]
                request.status = RequestStatus.FINISHED_ERROR
                request.stop_reason = str(e)
                self._free_request(request, free_blocks=False)
                self.failed.append(
                    EngineCoreOutput(req_id, [], finish_reason="error", stop_reason=str(e))
                )
                continue
            if ready:
                del self.compiling[req_id]
                request.status = RequestStatus.WAITING
                self.num_constrained += 1
                self.waiting.add(request)

    def take_failed_outputs(self) -> list[EngineCoreOutput]:
        """Outputs of requests that failed before running (a grammar error), once."""
        failed, self.failed = self.failed, []
        return failed

    def _attach_grammar(
        self, out: SchedulerOutput, constrained: list[Request], spec_tokens: dict[str, list[int]]
    ) -> None:
        """The masks of the constrained requests that sample this step, now if every matcher
        is at its request's last token; else (async scheduling: a token of theirs is still in
        flight) the step is marked pending and `get_grammar_bitmask` makes them once the step
        in flight has been collected (lmserve/core/structured_output.py)."""
        out.structured_output_request_ids = [r.request_id for r in constrained]
        if any(r.num_output_placeholders > 1 for r in constrained):
            out.pending_structured_output_tokens = True
            return
        out.structured_output = self.structured_output.grammar_bitmask(constrained, spec_tokens)

    def get_grammar_bitmask(self, scheduler_output: SchedulerOutput):
        """The masks of a pending step (`pending_structured_output_tokens`), made after the
        output of the step before it was applied (`update_from_output`): every matcher has then
        accepted its request's tokens up to the one this step samples after. Requests that
        finished (or were aborted) meanwhile get no rows: their token is dropped anyway."""
        requests = [
            request
            for req_id in scheduler_output.structured_output_request_ids
            if (request := self.requests.get(req_id)) is not None
            and request.status == RequestStatus.RUNNING
        ]
        for request in requests:
            assert request.num_output_placeholders == 1, "a token of an earlier step in flight"
        spec_tokens = scheduler_output.scheduled_spec_decode_tokens
        return self.structured_output.grammar_bitmask(requests, spec_tokens)

    def _accept_grammar_tokens(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> dict[str, int]:
        """The matchers of the step's constrained requests accept the tokens they sampled, in
        one batched backend call: req_id -> how many each accepted. `_advance_grammar` then
        rolls back those a stop condition cut."""
        requests, token_ids = [], []
        for req_id in scheduler_output.structured_output_request_ids:
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted (or preempted) while the step ran: never accepted
            sampled = runner_output.sampled_token_ids[runner_output.req_id_to_index[req_id]]
            if sampled:
                requests.append(request)
                token_ids.append(sampled)
        if not requests:
            return {}
        counts = self.structured_output.accept_tokens(requests, token_ids)
        return {r.request_id: n for r, n in zip(requests, counts)}

    def _advance_grammar(
        self, request: Request, token_ids: list[int], num_accepted: int | None
    ) -> None:
        """The matcher is made to stand at the emitted `token_ids`: it accepted
        `num_accepted` of the tokens sampled (`_accept_grammar_tokens`; None: accept them
        now), of which those past a stop are rolled back. A grammar that is complete ends
        the request (only a stop token could follow)."""
        grammar = request.structured_output.grammar
        if num_accepted is None:
            num_accepted = self.structured_output.accept_tokens([request], [token_ids])[0]
        if num_accepted < len(token_ids):
            # Cannot happen with the mask applied; never let a bad token go unnoticed.
            logger.error("request %s emitted a token its grammar refuses", request.request_id)
        else:
            grammar.rollback(num_accepted - len(token_ids))
        if not request.is_finished and grammar.is_terminated():
            request.status = RequestStatus.FINISHED_STOPPED

    def _free_request(self, request: Request, free_blocks: bool = True) -> None:
        so = request.structured_output
        if so is not None and so.grammar is not None:
            self.num_constrained -= 1  # admitted with a matcher, now leaving
        if free_blocks:
            self.kv_cache_manager.free(request)
        if self.encoder_cache is not None:
            self.encoder_cache.free(request)
        if self.kv_connector is not None:
            self.kv_connector.request_finished(request)
            self.kv_loaded.discard(request.request_id)
        self.finished_req_ids.add(request.request_id)
        del self.requests[request.request_id]


def _without_pixels(features: list[MultiModalFeature]) -> list[MultiModalFeature] | None:
    """The placeholders the worker needs to place image embeddings (the pixels go only with
    the step that encodes them)."""
    if not features:
        return None
    return [MultiModalFeature(f.identifier, f.offset, f.length) for f in features]


class _StepPlan:
    """What one schedule() call has decided so far."""

    __slots__ = (
        "budget",
        "num_scheduled_tokens",
        "scheduled",
        "new_reqs",
        "cached_reqs",
        "preempted",
        "spec_tokens",
        "encoder_budget",
        "encoder_inputs",
    )

    def __init__(self, budget: int, encoder_budget: int = 0) -> None:
        self.budget = budget
        self.encoder_budget = encoder_budget  # encoder input tokens (image embeddings) left
        self.encoder_inputs: list[MultiModalFeature] = []  # images to encode this step
        self.num_scheduled_tokens: dict[str, int] = {}
        self.scheduled: list[Request] = []
        self.new_reqs: list[NewRequestData] = []
        self.cached_reqs = CachedRequestData()
        self.preempted: list[Request] = []
        self.spec_tokens: dict[str, list[int]] = {}  # req_id -> drafts scheduled this step

    def schedule(self, request: Request, num_tokens: int) -> None:
        self.num_scheduled_tokens[request.request_id] = num_tokens
        self.scheduled.append(request)
        self.budget -= num_tokens

    def unschedule(self, request: Request) -> None:
        """Take back a request preempted after it was scheduled this step (priority policy)."""
        num_tokens = self.num_scheduled_tokens.pop(request.request_id, None)
        if num_tokens is None:
            return
        self.budget += num_tokens
        self.scheduled.remove(request)
        self.spec_tokens.pop(request.request_id, None)
        cached = self.cached_reqs
        idx = cached.req_ids.index(request.request_id)
        for column in (cached.req_ids, cached.new_block_ids, cached.num_computed_tokens):
            del column[idx]
