"""Async scheduling in the scheduler: step N+1 is scheduled before step N's output is known.

A fake device keeps the tokens it sampled (the host learns them one step later); the harness
keeps two steps in flight exactly as EngineCore does: launch(schedule(N+1)), then
update_from_output(N). Pure Python; no model."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from lmserve.config import CacheConfig, SchedulerConfig
from lmserve.core.sched_output import ModelRunnerOutput, SchedulerOutput
from lmserve.core.scheduler import Scheduler
from lmserve.request import Request
from lmserve.sampling_params import SamplingParams
from tests.core.test_scheduler import assert_no_leaked_blocks

EOS = 2


def token_at(req_id: str, index: int) -> int:
    """Deterministic per (request, output index), so a recompute samples the same tokens;
    requests whose id ends in 'e' emit EOS at output index 5."""
    return EOS if req_id.endswith("e") and index == 5 else 1000 + index


@dataclass
class _DeviceRequest:
    token_ids: list[int]  # prompt + outputs, including tokens the host has not seen yet
    num_prompt: int
    num_computed_tokens: int


class FakeDevice:
    """The worker's view: requests from SchedulerOutputs only; samples when a step's tokens
    reach the end of everything it knows (tokens sampled in flight included)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.reqs: dict[str, _DeviceRequest] = {}
        self.max_output_index: dict[str, int] = {}

    def launch(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in out.finished_req_ids | out.preempted_req_ids:
            self.reqs.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            tokens = new.prompt_token_ids + new.output_token_ids
            self.reqs[new.req_id] = _DeviceRequest(
                tokens, len(new.prompt_token_ids), new.num_computed_tokens
            )
        cached = out.scheduled_cached_reqs
        for req_id, num_computed in zip(cached.req_ids, cached.num_computed_tokens, strict=True):
            assert self.reqs[req_id].num_computed_tokens == num_computed
        req_ids, sampled = list(out.num_scheduled_tokens), []
        for req_id in req_ids:
            state = self.reqs[req_id]
            state.num_computed_tokens += out.num_scheduled_tokens[req_id]
            assert state.num_computed_tokens <= len(state.token_ids)  # never past known input
            host = self.scheduler.requests.get(req_id)
            if host is not None:  # the host's tokens are a prefix of the device's
                assert state.token_ids[: host.num_tokens] == host.all_token_ids
            if state.num_computed_tokens == len(state.token_ids):
                index = len(state.token_ids) - state.num_prompt
                state.token_ids.append(token_at(req_id, index))
                sampled.append([state.token_ids[-1]])
                self.max_output_index[req_id] = max(self.max_output_index.get(req_id, 0), index)
            else:
                sampled.append([])
        return ModelRunnerOutput(req_ids, {r: i for i, r in enumerate(req_ids)}, sampled)


def run_pipelined(scheduler: Scheduler, requests: list[Request], add_every: int = 0):
    """Two steps in flight; returns (outputs, finish reasons, most placeholders seen)."""
    device = FakeDevice(scheduler)
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finish: dict[str, str] = {}
    pending = deque(requests)
    in_flight: deque[tuple[SchedulerOutput, ModelRunnerOutput]] = deque()
    most_placeholders = 0
    for step in range(100_000):
        if pending and (not add_every or step % add_every == 0):
            scheduler.add_request(pending.popleft())
        if not (scheduler.has_unfinished_requests() or in_flight or pending):
            break
        out = scheduler.schedule()
        if not out.is_empty:
            in_flight.append((out, device.launch(out)))
            most_placeholders = max(
                [most_placeholders] + [r.num_output_placeholders for r in scheduler.running]
            )
        if len(in_flight) == 2 or (in_flight and out.is_empty):
            done, result = in_flight.popleft()
            for o in scheduler.update_from_output(done, result):
                assert o.request_id not in finish, "output after the request finished"
                outputs[o.request_id].extend(o.new_token_ids)
                if o.finished:
                    finish[o.request_id] = o.finish_reason
    else:
        raise AssertionError("the workload did not finish")
    return outputs, finish, most_placeholders, device


def make_scheduler(num_gpu_blocks: int = 1000, **kwargs) -> Scheduler:
    kwargs.setdefault("max_model_len", 512)
    kwargs.setdefault("max_num_seqs", 256)
    return Scheduler(
        SchedulerConfig(**kwargs), CacheConfig(block_size=16), num_gpu_blocks=num_gpu_blocks
    )


def make_request(req_id: str, prompt_len: int, max_tokens: int) -> Request:
    return Request(
        req_id,
        list(range(100, 100 + prompt_len)),
        SamplingParams(max_tokens=max_tokens),
        eos_token_id=EOS,
        max_model_len=512,
    )


def expected(req_id: str, max_tokens: int) -> list[int]:
    tokens = []
    for i in range(max_tokens):
        tokens.append(token_at(req_id, i))
        if tokens[-1] == EOS:
            break
    return tokens


def test_decode_is_scheduled_again_before_the_previous_token_is_known():
    sched = make_scheduler()
    request = make_request("a", 10, max_tokens=5)
    sched.add_request(request)
    first = sched.schedule()  # the whole prompt; samples output 0
    assert first.num_scheduled_tokens == {"a": 10}
    assert request.num_output_placeholders == 1
    second = sched.schedule()  # output 0 is still in flight: decode it anyway
    assert second.num_scheduled_tokens == {"a": 1}
    assert request.num_output_placeholders == 2
    device = FakeDevice(sched)
    sched.update_from_output(first, device.launch(first))
    assert request.num_output_placeholders == 1 and request.num_output_tokens == 1


def test_a_request_whose_steps_in_flight_reach_max_tokens_is_not_scheduled_again():
    sched = make_scheduler()
    request = make_request("a", 4, max_tokens=2)
    sched.add_request(request)
    sched.schedule()  # prompt -> output 0
    sched.schedule()  # output 0 -> output 1 = the last one
    assert request.num_output_placeholders == 2
    assert sched.schedule().is_empty


def test_a_request_at_max_model_len_is_not_scheduled_past_it():
    sched = make_scheduler(max_model_len=12)
    request = Request("a", list(range(100, 110)), SamplingParams(), max_model_len=12)
    sched.add_request(request)
    sched.schedule()  # 10 prompt tokens -> token 11
    sched.schedule()  # -> token 12 = max_model_len
    assert sched.schedule().is_empty


def test_pipelined_workload_gives_every_token_once_and_frees_every_block():
    rng = random.Random(7)
    sched = make_scheduler(num_gpu_blocks=16, max_num_batched_tokens=64, max_num_seqs=8)
    max_tokens = {}
    requests = []
    for i in range(60):
        req_id = f"r{i}" + ("e" if i % 3 == 0 else "")
        max_tokens[req_id] = rng.randrange(1, 60)
        requests.append(make_request(req_id, rng.choice([1, 7, 16, 33, 90]), max_tokens[req_id]))
    outputs, finish, most_placeholders, device = run_pipelined(sched, requests, add_every=2)
    assert most_placeholders == 2  # two steps really were in flight
    assert sched.num_preemptions > 0  # with tokens in flight at preemption
    for req_id, n in max_tokens.items():
        assert outputs[req_id] == expected(req_id, n)
        eos = outputs[req_id][-1] == EOS
        assert finish[req_id] == ("stop" if eos else "length")
        if not eos:  # the length limit is never overrun by a step in flight
            assert device.max_output_index[req_id] == n - 1
    assert_no_leaked_blocks(sched)


def test_abort_with_steps_in_flight_drops_their_output_and_frees_blocks():
    sched = make_scheduler()
    device = FakeDevice(sched)
    sched.add_request(make_request("a", 20, max_tokens=50))
    sched.add_request(make_request("b", 20, max_tokens=3))
    first = sched.schedule()
    first_result = device.launch(first)
    second = sched.schedule()
    second_result = device.launch(second)
    assert [r.request_id for r in sched.abort_requests(["a"])] == ["a"]
    outs = sched.update_from_output(first, first_result)
    outs += sched.update_from_output(second, second_result)
    assert {o.request_id for o in outs} == {"b"}
    while sched.has_unfinished_requests():
        out = sched.schedule()
        outs += sched.update_from_output(out, device.launch(out))
    assert [t for o in outs for t in o.new_token_ids] == expected("b", 3)
    assert_no_leaked_blocks(sched)
