"""Scheduler: token budget, chunked prefill, preemption, abort, stop conditions, prefix caching and
the new/cached request protocol, driven by a fake model runner. Pure Python; no model."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from lmserve.config import CacheConfig, ConfigError, SchedulerConfig
from lmserve.core.sched_output import ModelRunnerOutput, SchedulerOutput
from lmserve.core.scheduler import Scheduler
from lmserve.request import Request, RequestStatus
from lmserve.sampling_params import SamplingParams

EOS = 2


def default_token(req_id: str, index: int) -> int:
    """The token a request samples at output position `index`: deterministic, so a request
    recomputed after a preemption samples the same tokens again. Never EOS."""
    return 1000 + index


@dataclass
class _WorkerRequest:
    token_ids: list[int]  # prompt + outputs, as the worker knows them
    block_ids: list[int]
    num_computed_tokens: int


class FakeWorker:
    """Stands in for the model runner. Keeps its own copy of every request built only from
    SchedulerOutputs (in full the first time, as diffs afterwards), checks that copy against the
    scheduler, and samples one token for each request whose tokens are all computed after the
    step; a request still mid-prompt gets []."""

    def __init__(self, scheduler: Scheduler, token_fn: Callable[[str, int], int]) -> None:
        self.scheduler = scheduler
        self.token_fn = token_fn
        self.block_size = scheduler.kv_cache_manager.block_size
        self.reqs: dict[str, _WorkerRequest] = {}

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in out.finished_req_ids | out.preempted_req_ids:
            self.reqs.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.reqs, f"{new.req_id} sent in full twice"
            self.reqs[new.req_id] = _WorkerRequest(
                new.prompt_token_ids + new.output_token_ids,
                list(new.block_ids),
                new.num_computed_tokens,
            )
        cached = out.scheduled_cached_reqs
        for req_id, new_block_ids, num_computed in zip(
            cached.req_ids, cached.new_block_ids, cached.num_computed_tokens, strict=True
        ):
            state = self.reqs[req_id]  # KeyError: a diff for a request the worker never saw
            assert state.num_computed_tokens == num_computed
            state.block_ids.extend(new_block_ids)
        new_ids = [r.req_id for r in out.scheduled_new_reqs]
        assert sorted(new_ids + cached.req_ids) == sorted(out.num_scheduled_tokens)

        req_ids, sampled = list(out.num_scheduled_tokens), []
        for req_id in req_ids:
            state = self.reqs[req_id]
            state.num_computed_tokens += out.num_scheduled_tokens[req_id]
            assert state.num_computed_tokens <= len(state.token_ids)
            assert len(state.block_ids) * self.block_size >= state.num_computed_tokens
            request = self.scheduler.requests[req_id]
            assert state.block_ids == self.scheduler.kv_cache_manager.get_block_ids(req_id)
            assert state.token_ids == request.all_token_ids
            assert state.num_computed_tokens == request.num_computed_tokens
            if state.num_computed_tokens == len(state.token_ids):
                num_prompt = len(request.prompt_token_ids)
                token = self.token_fn(req_id, len(state.token_ids) - num_prompt)
                state.token_ids.append(token)
                sampled.append([token])
            else:
                sampled.append([])
        return ModelRunnerOutput(req_ids, {r: i for i, r in enumerate(req_ids)}, sampled)


@dataclass
class Harness:
    """A scheduler, a fake worker, and everything the engine would have streamed out."""

    scheduler: Scheduler
    worker: FakeWorker
    outputs: dict[str, list[int]] = field(default_factory=dict)
    finish_reasons: dict[str, str] = field(default_factory=dict)
    stop_reasons: dict[str, object] = field(default_factory=dict)
    num_cached_tokens: dict[str, int] = field(default_factory=dict)
    history: list[SchedulerOutput] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        return len(self.history)

    def add(
        self,
        req_id: str,
        prompt: list[int] | int,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        **params,
    ) -> Request:
        params.setdefault("max_tokens", 8)
        prompt = list(range(100, 100 + prompt)) if isinstance(prompt, int) else prompt
        request = Request(
            req_id,
            prompt,
            SamplingParams(**params),
            eos_token_id=EOS,
            arrival_time=float(self.num_steps) if arrival_time is None else arrival_time,
            priority=priority,
        )
        self.scheduler.add_request(request)
        self.outputs[req_id] = []
        return request

    def step(self) -> SchedulerOutput:
        sched = self.scheduler
        out = sched.schedule()
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        assert out.total_num_scheduled_tokens <= sched.max_num_batched_tokens
        assert len(out.num_scheduled_tokens) <= sched.max_num_seqs
        assert len(sched.running) <= sched.max_num_seqs
        assert all(n > 0 for n in out.num_scheduled_tokens.values())
        runner_output = self.worker.execute(out)
        for o in sched.update_from_output(out, runner_output):
            assert o.request_id not in self.finish_reasons, "output after the request finished"
            self.outputs[o.request_id].extend(o.new_token_ids)
            self.num_cached_tokens[o.request_id] = o.num_cached_tokens
            if o.finished:
                self.finish_reasons[o.request_id] = o.finish_reason
                self.stop_reasons[o.request_id] = o.stop_reason
        self.history.append(out)
        return out

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests():
                return
            self.step()
        raise AssertionError(f"the workload did not finish in {max_steps} steps")


def make_harness(
    token_fn: Callable[[str, int], int] = default_token,
    *,
    num_gpu_blocks: int = 1000,
    block_size: int = 16,
    enable_prefix_caching: bool = True,
    **scheduler_kwargs,
) -> Harness:
    scheduler_kwargs.setdefault("max_model_len", 1024)
    scheduler_kwargs.setdefault("max_num_seqs", 256)
    scheduler = Scheduler(
        SchedulerConfig(**scheduler_kwargs),
        CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching),
        num_gpu_blocks=num_gpu_blocks,
    )
    return Harness(scheduler, FakeWorker(scheduler, token_fn))


def assert_no_leaked_blocks(scheduler: Scheduler) -> None:
    kv = scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_gpu_blocks
    assert all(b.ref_cnt == 0 for b in kv.blocks)
    assert not any(kv.req_to_blocks.values())
    assert scheduler.requests == {} and not scheduler.running and len(scheduler.waiting) == 0


def expected_tokens(req_id: str, n: int, token_fn=default_token) -> list[int]:
    return [token_fn(req_id, i) for i in range(n)]


# ---- budget and limits ---------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_budget_and_max_num_seqs_hold_over_a_random_workload(policy):
    rng = random.Random(1234)
    h = make_harness(
        num_gpu_blocks=48,  # small: forces preemptions
        max_num_batched_tokens=96,
        max_num_seqs=10,
        max_model_len=512,
        policy=policy,
    )
    shared_prefixes = [[rng.randrange(3, 500) for _ in range(n)] for n in (16, 40, 70)]
    max_tokens, num_requests = {}, 120
    for i in range(num_requests):
        prompt = [rng.randrange(3, 500) for _ in range(rng.choice([1, 5, 17, 64, 150, 280]))]
        if rng.random() < 0.5:
            prompt = rng.choice(shared_prefixes) + prompt
        max_tokens[f"r{i}"] = rng.randrange(1, 40)
        h.add(f"r{i}", prompt, max_tokens=max_tokens[f"r{i}"], priority=rng.randrange(3))
        if rng.random() < 0.3:  # requests trickle in while others run
            h.step()
    h.run()

    assert h.scheduler.num_preemptions > 0  # the workload exercised preemption
    assert h.scheduler.kv_cache_manager.prefix_cache_stats.hits > 0
    for req_id, n in max_tokens.items():
        assert h.outputs[req_id] == expected_tokens(req_id, n)
        assert h.finish_reasons[req_id] == "length"
    reported = [r for out in h.history for r in out.finished_req_ids]
    reported += h.scheduler.schedule().finished_req_ids  # the last step's finishes
    assert sorted(reported) == sorted(max_tokens)  # each finish reported exactly once
    assert_no_leaked_blocks(h.scheduler)


def test_chunked_prefill_splits_a_100_token_prompt_into_32_32_32_4_then_samples():
    h = make_harness(max_num_batched_tokens=32)
    request = h.add("a", 100, max_tokens=3)
    chunks = []
    for _ in range(4):
        out = h.step()
        chunks.append(out.num_scheduled_tokens["a"])
        if len(chunks) < 4:
            assert h.outputs["a"] == [] and request.num_output_tokens == 0
    assert chunks == [32, 32, 32, 4]
    assert h.outputs["a"] == expected_tokens("a", 1)
    assert [h.step().num_scheduled_tokens["a"] for _ in range(2)] == [1, 1]  # decode
    assert h.finish_reasons["a"] == "length"


def test_long_prefill_token_threshold_caps_one_requests_share_of_the_budget():
    h = make_harness(max_num_batched_tokens=64, long_prefill_token_threshold=20)
    h.add("a", 100)
    h.add("b", 100)
    h.add("c", 10)
    assert h.step().num_scheduled_tokens == {"a": 20, "b": 20, "c": 10}
    assert h.step().num_scheduled_tokens == {"a": 20, "b": 20, "c": 1}


def test_running_requests_are_scheduled_before_waiting_ones():
    h = make_harness(max_num_batched_tokens=32)
    h.add("a", 10, max_tokens=20)
    h.add("b", 10, max_tokens=20)
    h.step()  # both prefilled, now decoding
    h.add("c", 100)
    out = h.step()
    assert list(out.num_scheduled_tokens.items()) == [("a", 1), ("b", 1), ("c", 30)]
    # A running request mid-prefill also goes first: c takes its chunk before d is admitted.
    h.add("d", 5)
    out = h.step()
    assert list(out.num_scheduled_tokens.items()) == [("a", 1), ("b", 1), ("c", 30)]
    assert "d" not in out.num_scheduled_tokens


def test_max_num_seqs_keeps_extra_requests_waiting():
    h = make_harness(max_num_seqs=2)
    for req_id in "abc":
        h.add(req_id, 4, max_tokens=2)
    assert set(h.step().num_scheduled_tokens) == {"a", "b"}
    assert set(h.step().num_scheduled_tokens) == {"a", "b"}  # both finish here
    assert set(h.step().num_scheduled_tokens) == {"c"}


def test_without_chunked_prefill_a_prompt_waits_until_it_fits_whole():
    h = make_harness(max_num_batched_tokens=64, max_model_len=64, enable_chunked_prefill=False)
    h.add("a", 10, max_tokens=5)
    h.add("b", 60, max_tokens=2)
    assert h.step().num_scheduled_tokens == {"a": 10}  # 54 tokens left: b does not fit
    assert h.step().num_scheduled_tokens == {"a": 1, "b": 60}


def test_long_prefill_token_threshold_needs_chunked_prefill():
    # A capped prompt could never be admitted whole, so the combination is refused up front.
    with pytest.raises(ConfigError, match="long_prefill_token_threshold=20 .*chunked_prefill"):
        make_harness(
            enable_chunked_prefill=False,
            long_prefill_token_threshold=20,
            max_num_batched_tokens=1024,
        )


# ---- preemption ------------------------------------------------------------------------------
def test_fcfs_preempts_the_most_recently_admitted_request_which_resumes_and_finishes():
    # 6 blocks of 4 tokens; a and b take 2 blocks each for their 8-token prompts, then one more
    # each at token 9. At token 13 a needs a 4th block: b (admitted last) is preempted.
    h = make_harness(num_gpu_blocks=6, block_size=4, max_num_seqs=2)
    h.add("a", list(range(10, 18)), max_tokens=6)
    h.add("b", list(range(20, 28)), max_tokens=8)
    h.add("c", list(range(30, 34)), max_tokens=2)  # waits behind them (max_num_seqs=2)
    b = h.scheduler.requests["b"]
    kv = h.scheduler.kv_cache_manager
    for _ in range(5):
        assert h.step().preempted_req_ids == set()
    assert b.num_computed_tokens == 12 and len(kv.get_block_ids("b")) == 3

    out = h.step()
    assert out.preempted_req_ids == {"b"}
    assert out.num_scheduled_tokens == {"a": 1}  # a got the block b gave back
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert kv.get_block_ids("b") == []
    assert [r.request_id for r in h.scheduler.waiting] == ["b", "c"]  # front of the queue
    assert h.scheduler.num_preemptions == 1 and b.num_preemptions == 1
    assert h.finish_reasons["a"] == "length"  # a's 6th token came in this step

    out = h.step()  # b comes back in full, its 5 output tokens included
    (resumed,) = [n for n in out.scheduled_new_reqs if n.req_id == "b"]
    assert resumed.output_token_ids == expected_tokens("b", 5)
    assert resumed.prompt_token_ids == list(range(20, 28))
    # Its first 2 blocks were still cached; the 3rd was handed to a. Recompute the rest.
    assert resumed.num_computed_tokens == 8
    assert out.num_scheduled_tokens["b"] == 13 - 8
    assert resumed.block_ids == kv.get_block_ids("b")

    h.run()
    assert h.outputs["b"] == expected_tokens("b", 8)  # the right number, no duplicates
    assert h.outputs["c"] == expected_tokens("c", 2)
    assert_no_leaked_blocks(h.scheduler)


def _priority_harness() -> Harness:
    # 7 blocks of 4 tokens. "low" is admitted first, then "high" and "mid" (all 8-token prompts).
    return make_harness(num_gpu_blocks=7, block_size=4, policy="priority")


def test_priority_preempts_the_lowest_priority_request_not_the_latest_admitted():
    h = _priority_harness()
    h.add("low", list(range(10, 18)), priority=5, max_tokens=4)
    h.step()
    h.add("high", list(range(20, 28)), priority=0, max_tokens=4)
    h.add("mid", list(range(30, 38)), priority=1, max_tokens=4)
    h.step()  # low takes its 3rd block; high and mid take 2 each: the pool is full
    assert [r.request_id for r in h.scheduler.running] == ["low", "high", "mid"]
    h.add("tiny", [5], priority=0, max_tokens=1)

    out = h.step()  # high needs a block: low (priority 5) goes, though it was scheduled first
    assert out.preempted_req_ids == {"low"}
    assert out.num_scheduled_tokens == {"high": 1, "mid": 1}  # low's token was taken back
    assert out.scheduled_cached_reqs.req_ids == ["high", "mid"]
    assert h.scheduler.kv_cache_manager.get_block_ids("low") == []
    assert "tiny" not in out.num_scheduled_tokens  # no admissions in a step that preempted

    h.run()
    for req_id, n in (("low", 4), ("high", 4), ("mid", 4), ("tiny", 1)):
        assert h.outputs[req_id] == expected_tokens(req_id, n)
    assert_no_leaked_blocks(h.scheduler)


def test_priority_ties_preempt_the_latest_arrival():
    h = _priority_harness()
    h.add("late", list(range(10, 18)), priority=1, arrival_time=10.0, max_tokens=4)
    h.step()
    h.add("early", list(range(20, 28)), priority=1, arrival_time=5.0, max_tokens=4)
    h.add("urgent", list(range(30, 38)), priority=0, arrival_time=20.0, max_tokens=4)
    h.step()
    assert [r.request_id for r in h.scheduler.running] == ["late", "urgent", "early"]
    out = h.step()
    assert out.preempted_req_ids == {"late"}  # same priority as early, arrived later
    h.run()
    assert all(h.outputs[r] == expected_tokens(r, 4) for r in ("late", "early", "urgent"))
    assert_no_leaked_blocks(h.scheduler)


def test_priority_preemption_does_not_skip_the_running_requests_after_the_victims():
    # 14 blocks of 4; long prefill chunks of 16 tokens (4 blocks). Running order a, b, c, d with
    # priorities 9, 0, 5, 0. In step 5 c needs 4 blocks with 1 free: a (9) goes, frees 2, still
    # short; then c (5) itself goes. d still fits (1 block, plenty free) and must be scheduled.
    h = make_harness(
        num_gpu_blocks=14,
        block_size=4,
        policy="priority",
        max_num_batched_tokens=64,
        long_prefill_token_threshold=16,
    )
    h.add("a", 4, priority=9, max_tokens=50)
    h.step()
    h.add("b", 4, priority=0, max_tokens=50)
    h.step()
    h.add("c", 48, priority=5, max_tokens=50)
    h.step()
    h.add("d", 4, priority=0, max_tokens=50)
    h.step()
    assert [r.request_id for r in h.scheduler.running] == ["a", "b", "c", "d"]
    out = h.step()
    assert out.preempted_req_ids == {"a", "c"}
    assert out.num_scheduled_tokens == {"b": 1, "d": 1}


# ---- abort -------------------------------------------------------------------------------------
def test_abort_of_a_running_request_frees_its_blocks_and_reports_it_next_step():
    h = make_harness()
    h.add("a", 40, max_tokens=50)
    h.add("b", 40, max_tokens=50)
    h.step()
    kv = h.scheduler.kv_cache_manager
    assert len(kv.get_block_ids("a")) == 3
    aborted = h.scheduler.abort_requests(["a", "unknown"])
    assert [r.request_id for r in aborted] == ["a"]
    assert aborted[0].status == RequestStatus.FINISHED_ABORTED
    assert kv.get_block_ids("a") == [] and kv.num_free_blocks == kv.num_gpu_blocks - 3
    assert h.scheduler.abort_requests(["a"]) == []  # already gone
    out = h.step()
    assert out.finished_req_ids == {"a"} and set(out.num_scheduled_tokens) == {"b"}
    assert h.step().finished_req_ids == set()  # reported once
    h.scheduler.abort_requests(["b"])
    h.step()
    assert_no_leaked_blocks(h.scheduler)


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_abort_of_a_waiting_request_removes_it_from_the_queue(policy):
    h = make_harness(max_num_seqs=1, policy=policy)
    h.add("a", 8, max_tokens=3)
    h.add("b", 8, max_tokens=3)
    h.add("c", 8, max_tokens=3)
    h.step()
    h.scheduler.abort_requests(["b"])
    assert [r.request_id for r in h.scheduler.waiting] == ["c"]
    out = h.step()
    assert "b" in out.finished_req_ids
    h.run()
    assert "b" not in h.finish_reasons and h.outputs["c"] == expected_tokens("c", 3)
    assert_no_leaked_blocks(h.scheduler)


def test_abort_of_a_preempted_request_waiting_to_resume():
    h = make_harness(num_gpu_blocks=6, block_size=4, max_num_seqs=2)
    h.add("a", list(range(10, 18)), max_tokens=10)
    h.add("b", list(range(20, 28)), max_tokens=10)
    while not h.step().preempted_req_ids:
        pass
    assert h.scheduler.requests["b"].status == RequestStatus.PREEMPTED
    h.scheduler.abort_requests(["b"])
    assert len(h.scheduler.waiting) == 0
    h.run()
    assert h.outputs["a"] == expected_tokens("a", 10)
    assert_no_leaked_blocks(h.scheduler)


def test_abort_while_the_step_runs_drops_the_requests_output():
    h = make_harness()
    h.add("a", 8, max_tokens=5)
    h.add("b", 8, max_tokens=5)
    out = h.scheduler.schedule()
    runner_output = h.worker.execute(out)
    h.scheduler.abort_requests(["a"])
    outputs = h.scheduler.update_from_output(out, runner_output)
    assert [o.request_id for o in outputs] == ["b"]
    assert "a" in h.scheduler.schedule().finished_req_ids


# ---- stop conditions ---------------------------------------------------------------------------
def eos_at(position: int) -> Callable[[str, int], int]:
    return lambda req_id, i: EOS if i == position else 1000 + i


def test_max_tokens_stops_with_finish_reason_length():
    h = make_harness()
    h.add("a", 5, max_tokens=7)
    h.run()
    assert h.outputs["a"] == expected_tokens("a", 7)
    assert (h.finish_reasons["a"], h.stop_reasons["a"]) == ("length", None)


def test_eos_stops_the_request_and_is_included_in_the_output():
    h = make_harness(eos_at(3))
    h.add("a", 5, max_tokens=10)
    h.run()
    assert h.outputs["a"] == [1000, 1001, 1002, EOS]
    assert (h.finish_reasons["a"], h.stop_reasons["a"]) == ("stop", None)


def test_ignore_eos_generates_through_eos_up_to_max_tokens():
    h = make_harness(eos_at(3))
    h.add("a", 5, max_tokens=6, ignore_eos=True)
    h.run()
    assert len(h.outputs["a"]) == 6 and h.outputs["a"][3] == EOS
    assert h.finish_reasons["a"] == "length"


def test_stop_token_id_stops_with_it_as_stop_reason():
    h = make_harness()
    h.add("a", 5, max_tokens=10, stop_token_ids=[1004, 9999])
    h.run()
    assert h.outputs["a"] == expected_tokens("a", 5)
    assert (h.finish_reasons["a"], h.stop_reasons["a"]) == ("stop", 1004)


def test_min_tokens_suppresses_eos_and_stop_tokens_until_reached():
    always_eos = lambda req_id, i: EOS  # noqa: E731
    h = make_harness(always_eos)
    h.add("a", 5, max_tokens=10, min_tokens=3)
    h.add("b", 5, max_tokens=10, min_tokens=4, stop_token_ids=[EOS], ignore_eos=True)
    h.run()
    assert h.outputs["a"] == [EOS] * 3 and h.finish_reasons["a"] == "stop"
    assert h.outputs["b"] == [EOS] * 4 and h.stop_reasons["b"] == EOS


def test_max_model_len_caps_the_request():
    h = make_harness(max_model_len=20)
    h.add("a", 16, max_tokens=None)
    h.run()
    assert len(h.outputs["a"]) == 4 and h.finish_reasons["a"] == "length"


def test_a_stop_inside_several_sampled_tokens_drops_the_tokens_after_it():
    h = make_harness()
    h.add("a", 5, max_tokens=10)
    out = h.scheduler.schedule()
    runner_output = ModelRunnerOutput(["a"], {"a": 0}, [[7, EOS, 8]])
    (o,) = h.scheduler.update_from_output(out, runner_output)
    assert o.new_token_ids == [7, EOS] and o.finish_reason == "stop"


# ---- prefix caching ----------------------------------------------------------------------------
def test_second_request_with_the_same_prefix_starts_from_the_cache():
    h = make_harness()
    prefix = list(range(500, 532))  # 2 full blocks
    h.add("a", prefix + [1, 2, 3, 4, 5, 6, 7, 8], max_tokens=2)
    h.run()
    h.add("b", prefix + [9, 9, 9], max_tokens=2)
    out = h.step()
    (new,) = out.scheduled_new_reqs
    assert new.num_computed_tokens == 32 and out.num_scheduled_tokens == {"b": 3}
    assert h.scheduler.requests["b"].num_cached_tokens == 32
    h.run()
    assert h.num_cached_tokens == {"a": 0, "b": 32}
    assert_no_leaked_blocks(h.scheduler)


def test_requests_sharing_a_prefix_while_both_run_share_its_blocks():
    h = make_harness()
    prefix = list(range(500, 548))  # 3 full blocks
    h.add("a", prefix + [1], max_tokens=20)
    h.step()
    h.add("b", prefix + [2], max_tokens=20)
    out = h.step()
    kv = h.scheduler.kv_cache_manager
    assert out.num_scheduled_tokens["b"] == 1
    assert kv.get_block_ids("b")[:3] == kv.get_block_ids("a")[:3]
    assert all(kv.blocks[i].ref_cnt == 2 for i in kv.get_block_ids("a")[:3])
    h.run()
    assert_no_leaked_blocks(h.scheduler)


def test_a_waiting_requests_cached_prefix_outlives_the_blocks_a_running_request_takes():
    h = make_harness(num_gpu_blocks=8, block_size=4, max_num_seqs=1)
    prefix = list(range(500, 508))  # 2 full blocks
    for req_id, prompt in (("a", prefix), ("b", list(range(600, 608)))):
        h.add(req_id, prompt, max_tokens=1)
        h.run()
    # free queue, evicted first to last: 2 never-used blocks, a's 3 (partial last), b's 3
    h.add("x", [7, 7, 7, 7], max_tokens=19)  # will need 6 blocks
    h.step()
    h.add("w", prefix + [9], max_tokens=1)  # waits (max_num_seqs=1): a's blocks move last
    h.run()
    assert h.num_cached_tokens["w"] == 8  # x evicted b's blocks, not the prefix w waits for
    assert_no_leaked_blocks(h.scheduler)


def test_prefix_cache_stats_count_each_request_once_even_if_it_waits_for_blocks():
    h = make_harness(num_gpu_blocks=4, block_size=4)
    h.add("a", list(range(10, 22)), max_tokens=4)  # takes all 4 blocks at its 13th token
    h.add("b", list(range(30, 42)), max_tokens=1)  # waits until a finishes
    h.run()
    assert h.num_steps > 3  # b was retried while waiting
    stats = h.scheduler.kv_cache_manager.prefix_cache_stats
    assert (stats.requests, stats.queries) == (2, 24)


@pytest.mark.parametrize(("prompt_len", "cached"), [(33, 32), (32, 16)])
def test_full_prefix_hit_still_computes_the_last_prompt_token(prompt_len, cached):
    h = make_harness()
    prompt = list(range(500, 500 + prompt_len))
    h.add("a", prompt, max_tokens=1)
    h.run()
    h.add("b", prompt, max_tokens=1)
    out = h.step()
    assert out.num_scheduled_tokens == {"b": prompt_len - cached}
    assert h.outputs["b"] == expected_tokens("b", 1)  # sampled in the first step
    assert h.num_cached_tokens["b"] == cached


def test_no_prefix_hits_when_prefix_caching_is_off():
    h = make_harness(enable_prefix_caching=False)
    h.add("a", 40, max_tokens=1)
    h.run()
    h.add("b", 40, max_tokens=1)
    assert h.step().num_scheduled_tokens == {"b": 40}
    assert h.num_cached_tokens["b"] == 0


# ---- what travels to the worker ----------------------------------------------------------------
def test_new_requests_travel_in_full_and_running_ones_as_diffs():
    h = make_harness()
    h.add("a", list(range(7, 27)), max_tokens=30)  # 20 tokens: 2 blocks
    out = h.step()
    (new,) = out.scheduled_new_reqs
    assert new.prompt_token_ids == list(range(7, 27)) and new.output_token_ids == []
    assert new.num_computed_tokens == 0 and len(new.block_ids) == 2
    assert new.sampling_params.max_tokens == 30
    assert out.scheduled_cached_reqs.num_reqs == 0

    new_block_ids = []
    for step in range(13):  # tokens 21..33: a third block is needed for token 33 (index 32)
        out = h.step()
        assert out.scheduled_new_reqs == []
        assert out.scheduled_cached_reqs.req_ids == ["a"]
        assert out.scheduled_cached_reqs.num_computed_tokens == [20 + step]
        new_block_ids.append(out.scheduled_cached_reqs.new_block_ids[0])
    assert new_block_ids[:12] == [[]] * 12
    kv = h.scheduler.kv_cache_manager
    assert new_block_ids[12] == kv.get_block_ids("a")[2:] and len(new_block_ids[12]) == 1


def test_request_ids_must_be_unique():
    h = make_harness()
    h.add("a", 4)
    with pytest.raises(ValueError, match="already in use"):
        h.add("a", 4)


def test_has_unfinished_requests_tracks_waiting_and_running():
    h = make_harness()
    assert not h.scheduler.has_unfinished_requests()
    h.add("a", 4, max_tokens=2)
    assert h.scheduler.has_unfinished_requests() and h.scheduler.num_unfinished_requests == 1
    h.run()
    assert not h.scheduler.has_unfinished_requests()
    assert h.scheduler.has_finished_requests()  # "a" awaits being reported
