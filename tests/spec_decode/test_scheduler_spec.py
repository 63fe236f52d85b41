"""Scheduler with speculative decoding, driven by a fake worker that verifies drafts against a
deterministic "target": drafts count in the token budget, rejected ones are taken back from
num_computed_tokens, nothing is scheduled past max_tokens / max_model_len, and the tokens
streamed out are exactly those without speculation — with chunked prefill, prefix caching and
preemption. Pure Python; no model."""

from __future__ import annotations

import random
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from lmserve.config import CacheConfig, SchedulerConfig
from lmserve.core.sched_output import ModelRunnerOutput, SchedulerOutput
from lmserve.core.scheduler import Scheduler
from lmserve.request import Request
from lmserve.sampling_params import SamplingParams

EOS = 2


def target_token(req_id: str, index: int) -> int:
    """The token the target emits at output position `index` (never EOS)."""
    return 1000 + (index * 7 + len(req_id)) % 50


def good_drafts(req_id: str, index: int) -> int:
    return target_token(req_id, index)


def bad_drafts(req_id: str, index: int) -> int:
    return 5


def mixed_drafts(req_id: str, index: int) -> int:
    """Right about two times in three, deterministically."""
    return target_token(req_id, index) if hash((req_id, index)) % 3 else 6


@dataclass
class _State:
    token_ids: list[int]
    num_prompt: int
    block_ids: list[int]
    num_computed_tokens: int


class SpecFakeWorker:
    """Keeps its own copy of every request from SchedulerOutputs only, checks it against the
    scheduler, verifies scheduled drafts against `target_token`, and proposes k drafts with
    `draft_fn` for every request that sampled."""

    def __init__(self, scheduler: Scheduler, k: int, draft_fn, token_fn=target_token) -> None:
        self.scheduler, self.k, self.draft_fn, self.token_fn = scheduler, k, draft_fn, token_fn
        self.reqs: dict[str, _State] = {}
        self.num_scheduled_drafts = 0

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in out.finished_req_ids | out.preempted_req_ids:
            self.reqs.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            self.reqs[new.req_id] = _State(
                new.prompt_token_ids + new.output_token_ids,
                len(new.prompt_token_ids),
                list(new.block_ids),
                new.num_computed_tokens,
            )
        cached = out.scheduled_cached_reqs
        for req_id, new_block_ids, num_computed in zip(
            cached.req_ids, cached.new_block_ids, cached.num_computed_tokens
        ):
            state = self.reqs[req_id]
            assert state.num_computed_tokens == num_computed  # the rollback reached the worker
            state.block_ids.extend(new_block_ids)
        req_ids = list(out.num_scheduled_tokens)
        sampled = [self._run(req_id, out) for req_id in req_ids]
        drafts = [
            [self.draft_fn(r, len(self.reqs[r].token_ids) - self.reqs[r].num_prompt + j) for j in range(self.k)]
            if s else []
            for r, s in zip(req_ids, sampled)
        ]  # fmt: skip
        return ModelRunnerOutput(
            req_ids, {r: i for i, r in enumerate(req_ids)}, sampled, spec_token_ids=drafts
        )

    def _run(self, req_id: str, out: SchedulerOutput) -> list[int]:
        sched = self.scheduler
        state = self.reqs[req_id]
        spec = out.scheduled_spec_decode_tokens.get(req_id, [])
        n = out.num_scheduled_tokens[req_id]
        if spec:  # drafts come right after the last known token, which is scheduled too
            self.num_scheduled_drafts += len(spec)
            assert state.num_computed_tokens + n == len(state.token_ids) + len(spec)
            assert len(spec) <= self.k
        state.num_computed_tokens += n
        request = sched.requests[req_id]
        assert state.num_computed_tokens == request.num_computed_tokens
        assert state.num_computed_tokens <= sched.max_model_len
        need = min(state.num_computed_tokens + sched.num_lookahead_tokens, sched.max_model_len)
        assert len(state.block_ids) * sched.kv_cache_manager.block_size >= need
        assert state.block_ids == sched.kv_cache_manager.get_block_ids(req_id)
        if state.num_computed_tokens < len(state.token_ids):
            assert not spec
            return []  # mid-prompt
        num_output = len(state.token_ids) - state.num_prompt
        emitted = []
        for j, draft in enumerate(spec):
            token = self.token_fn(req_id, num_output + j)
            emitted.append(token)
            if draft != token:
                break
        else:
            emitted.append(self.token_fn(req_id, num_output + len(spec)))
        assert num_output + len(emitted) <= request.max_tokens  # never past max_tokens
        state.token_ids += emitted
        state.num_computed_tokens = len(state.token_ids) - 1  # what the scheduler rolls back to
        return emitted


class Harness:
    def __init__(self, k: int = 3, draft_fn=good_drafts, method: str = "ngram", **kwargs) -> None:
        block_size = kwargs.pop("block_size", 16)
        num_gpu_blocks = kwargs.pop("num_gpu_blocks", 1000)
        caching = kwargs.pop("enable_prefix_caching", True)
        kwargs.setdefault("max_model_len", 1024)
        kwargs.setdefault("max_num_seqs", 256)
        spec = SimpleNamespace(method=method, num_speculative_tokens=k)
        self.scheduler = Scheduler(
            SchedulerConfig(**kwargs),
            CacheConfig(block_size=block_size, enable_prefix_caching=caching),
            num_gpu_blocks,
            spec,
        )
        self.worker = SpecFakeWorker(self.scheduler, k, draft_fn)
        self.outputs: dict[str, list[int]] = {}
        self.finish_reasons: dict[str, str] = {}
        self.history: list[SchedulerOutput] = []

    def add(self, req_id: str, prompt: list[int] | int, **params) -> Request:
        params.setdefault("max_tokens", 20)
        prompt = list(range(100, 100 + prompt)) if isinstance(prompt, int) else prompt
        request = Request(req_id, prompt, SamplingParams(**params), eos_token_id=EOS)
        self.scheduler.add_request(request)
        self.outputs[req_id] = []
        return request

    def step(self) -> SchedulerOutput:
        sched = self.scheduler
        out = sched.schedule()
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        assert out.total_num_scheduled_tokens <= sched.max_num_batched_tokens
        for o in sched.update_from_output(out, self.worker.execute(out)):
            self.outputs[o.request_id].extend(o.new_token_ids)
            if o.finished:
                self.finish_reasons[o.request_id] = o.finish_reason
        self.history.append(out)
        return out

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests():
                return
            self.step()
        raise AssertionError("did not finish")


def expected(req_id: str, n: int) -> list[int]:
    return [target_token(req_id, i) for i in range(n)]


def assert_no_leaked_blocks(scheduler: Scheduler) -> None:
    kv = scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_gpu_blocks
    assert not any(kv.req_to_blocks.values())


def test_accepted_drafts_emit_k_plus_one_tokens_per_step():
    h = Harness(k=3)
    h.add("r", 10, max_tokens=10)
    h.run()
    assert h.outputs["r"] == expected("r", 10)
    # prefill (1 token), then 1 + 3 drafts -> 4 tokens twice (9), then no room for drafts (10)
    assert [o.num_scheduled_tokens["r"] for o in h.history] == [10, 4, 4, 1]
    assert [len(o.scheduled_spec_decode_tokens.get("r", [])) for o in h.history] == [0, 3, 3, 0]
    stats = h.scheduler.make_stats().spec_decode
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (2, 6, 6)
    assert stats.num_accepted_tokens_per_pos == [2, 2, 2]
    assert stats.acceptance_rate_per_pos() == [1.0, 1.0, 1.0]
    assert h.scheduler.make_stats().spec_decode is None  # increments: reported once
    assert_no_leaked_blocks(h.scheduler)


def test_rejected_drafts_are_taken_back_from_num_computed_tokens():
    h = Harness(k=4, draft_fn=bad_drafts)
    request = h.add("r", 5, max_tokens=6)
    for _ in range(3):
        h.step()
        assert request.num_computed_tokens == request.num_tokens - 1
    h.run()
    assert h.outputs["r"] == expected("r", 6)
    assert all(len(o.scheduled_spec_decode_tokens.get("r", [])) <= 4 for o in h.history)
    stats = h.scheduler.make_stats().spec_decode
    assert stats.num_accepted_tokens == 0 and stats.num_draft_tokens > 0
    assert stats.num_accepted_tokens_per_pos == [0, 0, 0, 0]
    assert stats.acceptance_rate_per_pos() == [0.0] * 4


def test_budget_cuts_drafts_but_not_the_last_token():
    h = Harness(k=4, max_num_batched_tokens=3, long_prefill_token_threshold=0)
    h.add("r", 2, max_tokens=12)
    h.step()  # prefill: 2 tokens
    out = h.step()
    assert out.num_scheduled_tokens == {"r": 3}
    assert len(out.scheduled_spec_decode_tokens["r"]) == 2
    h.run()
    assert h.outputs["r"] == expected("r", 12)


def test_drafts_never_reach_past_max_model_len():
    h = Harness(k=4, max_model_len=40, block_size=4)
    h.add("r", 33, max_tokens=100)  # room for 7 tokens: 33 + 7 = max_model_len
    h.run()
    assert h.outputs["r"] == expected("r", 7)
    for out in h.history:
        assert out.num_scheduled_tokens["r"] + 0 <= 40


def test_eos_among_accepted_drafts_stops_the_request_there():
    def token_fn(req_id: str, index: int) -> int:
        return EOS if index == 3 else target_token(req_id, index)

    h = Harness(k=4)
    h.worker.token_fn = token_fn
    h.worker.draft_fn = token_fn  # the drafts include the EOS
    h.add("r", 6, max_tokens=20)
    h.run()
    assert h.outputs["r"] == expected("r", 3) + [EOS]
    assert h.finish_reasons["r"] == "stop"
    assert_no_leaked_blocks(h.scheduler)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_random_workload_with_preemption_and_prefix_caching_streams_exact_tokens(method):
    rng = random.Random(7)
    h = Harness(
        k=3,
        draft_fn=mixed_drafts,
        method=method,
        num_gpu_blocks=40,  # small: forces preemptions
        block_size=8,
        max_num_batched_tokens=48,
        long_prefill_token_threshold=32,
        max_num_seqs=8,
        max_model_len=256,
    )
    shared = [rng.randrange(3, 500) for _ in range(24)]
    max_tokens = {}
    for i in range(40):
        prompt = [rng.randrange(3, 500) for _ in range(rng.choice([1, 6, 17, 60, 120]))]
        if rng.random() < 0.5:
            prompt = shared + prompt
        max_tokens[f"r{i}"] = rng.randrange(1, 30)
        h.add(f"r{i}", prompt, max_tokens=max_tokens[f"r{i}"])
        if rng.random() < 0.3:
            h.step()
    h.run()
    for req_id, n in max_tokens.items():
        assert h.outputs[req_id] == expected(req_id, n), req_id
    assert h.scheduler.num_preemptions > 0
    assert h.worker.num_scheduled_drafts > 0
    assert h.scheduler.kv_cache_manager.prefix_cache_stats.hits > 0
    assert_no_leaked_blocks(h.scheduler)


def test_draft_model_allocates_lookahead_slots():
    h = Harness(k=4, method="draft_model", block_size=4)
    assert h.scheduler.num_lookahead_tokens == 4
    h.add("r", 4, max_tokens=3)
    h.step()
    # 4 prompt tokens + 4 lookahead slots = 2 blocks, although the prompt fills only one
    assert len(h.scheduler.kv_cache_manager.get_block_ids("r")) == 2
    h.run()
    assert_no_leaked_blocks(h.scheduler)
