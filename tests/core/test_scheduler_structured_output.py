"""The scheduler with structured outputs, no model: a request waits aside while its grammar
compiles without holding up others; no mask is made for a batch with no constrained request;
a constrained request that samples gets mask rows (1 + its drafts), is never scheduled ahead of
its token in flight (async scheduling), and its drafts are cut to what the grammar allows."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from lmserve.config import CacheConfig, SchedulerConfig
from lmserve.core.sched_output import ModelRunnerOutput
from lmserve.core.scheduler import Scheduler
from lmserve.core.structured_output import StructuredOutputManager
from lmserve.request import Request, RequestStatus
from lmserve.sampling_params import SamplingParams, StructuredOutputsParams

EOS = 2


@pytest.fixture(scope="module")
def backend():
    from lmserve.structured_output.xgrammar_backend import XgrammarBackend
    from tests.tiny_models import make_tiny_tokenizer

    return XgrammarBackend(make_tiny_tokenizer(512), 512)


def make_scheduler(backend, gate: threading.Event | None = None) -> Scheduler:
    manager = StructuredOutputManager(SimpleNamespace())
    manager._backend = backend

    def compile_when_allowed(params):
        if gate is not None:
            gate.wait(10)
        return backend.compile(params)

    manager._compile = compile_when_allowed
    config = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256)
    return Scheduler(config, CacheConfig(block_size=16), 64, structured_output=manager)


def request(req_id: str, regex: str | None = None) -> Request:
    so = StructuredOutputsParams(regex=regex) if regex else None
    params = SamplingParams(max_tokens=8, structured_outputs=so)
    return Request(req_id, [5, 6, 7], params, eos_token_id=EOS)


def answer(out, tokens: dict[str, list[int]]) -> ModelRunnerOutput:
    req_ids = list(out.num_scheduled_tokens)
    return ModelRunnerOutput(
        req_ids, {r: i for i, r in enumerate(req_ids)}, [tokens.get(r, [9]) for r in req_ids]
    )


def allowed_tokens(out, req_id: str, row: int = 0) -> list[int]:
    so = out.structured_output
    mask = np.frombuffer(so.bitmask, dtype=np.int32).reshape(-1, so.num_words)
    words = mask[so.req_row_start[req_id] + row].view(np.uint32)
    return [t for t in range(512) if (int(words[t // 32]) >> (t % 32)) & 1]


def test_compiling_request_waits_aside_without_blocking_others(backend):
    gate = threading.Event()
    scheduler = make_scheduler(backend, gate)
    scheduler.add_request(request("json", regex="[ab]+"))
    scheduler.add_request(request("plain"))
    out = scheduler.schedule()
    assert list(out.num_scheduled_tokens) == ["plain"]
    assert out.structured_output is None  # nobody constrained is running: no mask work
    assert scheduler.requests["json"].status == RequestStatus.WAITING_FOR_FSM
    scheduler.update_from_output(out, answer(out, {}))
    gate.set()
    scheduler.structured_output._compiled[("regex", "[ab]+", False)].result(10)
    out = scheduler.schedule()
    assert set(out.num_scheduled_tokens) == {"json", "plain"}
    assert set(out.structured_output.req_row_start) == {"json"}
    tokenizer_ok = allowed_tokens(out, "json")
    assert 0 < len(tokenizer_ok) < 512 and EOS not in tokenizer_ok


def test_abort_while_compiling(backend):
    gate = threading.Event()
    scheduler = make_scheduler(backend, gate)
    scheduler.add_request(request("json", regex="[ab]+"))
    scheduler.abort_requests(["json"])
    gate.set()
    assert not scheduler.has_unfinished_requests() and scheduler.num_constrained == 0


def test_constrained_request_is_scheduled_ahead_and_its_masks_follow_its_token(backend):
    """Async scheduling: step 2 is scheduled before step 1's token is known; the constrained
    request goes ahead too, its step marked pending (no masks yet). Once step 1's output is
    applied, the masks follow the token it emitted."""
    scheduler = make_scheduler(backend)
    scheduler.add_request(request("json", regex="[ab]+"))
    scheduler.add_request(request("plain"))
    scheduler.structured_output._compiled[("regex", "[ab]+", False)].result(10)
    step1 = scheduler.schedule()
    assert set(step1.num_scheduled_tokens) == {"json", "plain"}
    assert not step1.pending_structured_output_tokens  # nothing in flight: masks at once
    assert step1.structured_output_request_ids == ["json"]
    step2 = scheduler.schedule()  # step 1 still in flight
    assert set(step2.num_scheduled_tokens) == {"json", "plain"}
    assert step2.pending_structured_output_tokens and step2.structured_output is None
    assert step2.structured_output_request_ids == ["json"]
    assert EOS not in allowed_tokens(step1, "json")  # at least one letter first
    token_a = allowed_tokens(step1, "json")[0]
    scheduler.update_from_output(step1, answer(step1, {"json": [token_a]}))
    step2.structured_output = scheduler.get_grammar_bitmask(step2)
    assert EOS in allowed_tokens(step2, "json")  # one letter is enough: may stop now
    assert set(step2.structured_output.req_row_start) == {"json"}


def test_pending_masks_leave_out_a_request_that_finished_meanwhile(backend):
    scheduler = make_scheduler(backend)
    scheduler.add_request(request("json", regex="[ab]+"))
    scheduler.add_request(request("json2", regex="[ab]+"))
    scheduler.structured_output._compiled[("regex", "[ab]+", False)].result(10)
    step1 = scheduler.schedule()
    step2 = scheduler.schedule()
    assert step2.pending_structured_output_tokens
    assert sorted(step2.structured_output_request_ids) == ["json", "json2"]
    scheduler.abort_requests(["json"])
    token_a = allowed_tokens(step1, "json2")[0]
    scheduler.update_from_output(step1, answer(step1, {"json": [token_a], "json2": [token_a]}))
    masks = scheduler.get_grammar_bitmask(step2)
    assert set(masks.req_row_start) == {"json2"}
    scheduler.abort_requests(["json2"])
    assert scheduler.get_grammar_bitmask(step2) is None


def run_steps(scheduler: Scheduler, pipelined: bool) -> tuple[dict, dict]:
    """Drive the scheduler like the EngineCore: one step at a time, or (pipelined) with the
    next step scheduled before the last one is collected, a pending step's masks made right
    after the step before it is collected. The "device" emits the lowest token its mask
    allows (r1: the highest), 9 for unconstrained requests. Returns (outputs, the steps each
    request was scheduled in)."""
    outputs: dict[str, list[int]] = {}
    scheduled_in: dict[str, list[int]] = {}
    in_flight = []

    def collect(out):
        tokens = {}
        if out.structured_output is not None:
            for r in out.structured_output.req_row_start:
                tokens[r] = [allowed_tokens(out, r)[-1 if r == "r1" else 0]]
        for o in scheduler.update_from_output(out, answer(out, tokens)):
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)

    for step in range(1000):
        if not (scheduler.has_unfinished_requests() or in_flight):
            break
        out = scheduler.schedule()
        for req_id in out.num_scheduled_tokens:
            scheduled_in.setdefault(req_id, []).append(step)
        if not pipelined:
            collect(out)
        elif out.pending_structured_output_tokens:
            assert len(in_flight) == 1
            collect(in_flight.pop())
            out.structured_output = scheduler.get_grammar_bitmask(out)
            in_flight.append(out)
        elif not out.is_empty:
            in_flight.append(out)
            if len(in_flight) == 2:
                collect(in_flight.pop(0))
        elif in_flight:
            collect(in_flight.pop(0))
    return outputs, scheduled_in


def test_pipelined_constrained_requests_decode_every_step(backend):
    """Async scheduling: each constrained request is scheduled in every step from its prompt
    to its end (it used to skip every other step), and emits the same tokens as with one
    step at a time: its masks always follow its last token."""
    results = {}
    for pipelined in (False, True):
        scheduler = make_scheduler(backend)
        for i in range(3):
            scheduler.add_request(request(f"r{i}", regex="a[ab]{4,6}"))
        scheduler.add_request(request("plain"))
        scheduler.structured_output._compiled[("regex", "a[ab]{4,6}", False)].result(10)
        results[pipelined] = run_steps(scheduler, pipelined)
        assert scheduler.num_constrained == 0 and not scheduler.requests
    (sync_out, _), (async_out, scheduled_in) = results[False], results[True]
    assert async_out == sync_out
    for r in ("r0", "r1", "r2"):
        steps = scheduled_in[r]
        assert steps == list(range(steps[0], steps[0] + len(steps)))  # no step skipped
        # one step per output token, plus at most the one scheduled ahead of its stop
        assert len(async_out[r]) <= len(steps) <= len(async_out[r]) + 1
        assert async_out[r][-1] == EOS and len(async_out[r]) >= 3


def test_drafts_are_cut_to_the_grammar_and_get_one_row_each(backend):
    scheduler = make_scheduler(backend)
    scheduler.add_request(request("json", regex="[ab]+"))
    scheduler.structured_output._compiled[("regex", "[ab]+", False)].result(10)
    out = scheduler.schedule()
    letters = allowed_tokens(out, "json")
    good, bad = letters[0], next(t for t in range(4, 512) if t not in letters)
    runner = answer(out, {"json": [good]})
    runner.spec_token_ids = [[good, good, bad, good]]
    scheduler.update_from_output(out, runner)
    assert scheduler.requests["json"].spec_token_ids == [good, good]
    out = scheduler.schedule()
    assert out.scheduled_spec_decode_tokens["json"] == [good, good]
    assert len(np.frombuffer(out.structured_output.bitmask, dtype=np.int32)) == 3 * out.structured_output.num_words  # fmt: skip


def test_batched_masks_equal_per_request_masks():
    """One batched fill over several threads (first rows, then one per draft depth) gives
    exactly the rows of filling each request alone, drafts included; matchers end where they
    started."""
    import random

    from lmserve.structured_output.xgrammar_backend import XgrammarBackend
    from tests.structured_output.schemas import SCHEMAS
    from tests.tiny_models import make_tiny_tokenizer

    backend = XgrammarBackend(make_tiny_tokenizer(512), 512, num_fill_threads=2)
    manager = StructuredOutputManager(SimpleNamespace())
    manager._backend = backend
    rng = random.Random(0)
    constraints = [StructuredOutputsParams(json=s) for s in SCHEMAS.values()]
    constraints += [StructuredOutputsParams(regex=r) for r in ("a[ab]{4,6}", r"\d{3}-\d{4}")]
    requests, spec_tokens = [], {}
    for i, params in enumerate(constraints * 2):
        req = Request(f"r{i}", [5], SamplingParams(structured_outputs=params), eos_token_id=EOS)
        manager.submit(req)
        req.structured_output.future.result(10)
        assert manager.poll(req)
        grammar = req.structured_output.grammar
        for _ in range(rng.randrange(0, 12)):  # advance by allowed tokens, not to the end
            ok = [t for t in grammar_allows(grammar) if t != EOS]
            if not ok:
                break
            assert grammar.accept_tokens([rng.choice(ok)])
        if i % 3:  # drafts the grammar allows (EOS too), sometimes then one it refuses
            drafts = []
            while len(drafts) < rng.randrange(1, 5) and not grammar.is_terminated():
                drafts.append(rng.choice(grammar_allows(grammar)))
                assert grammar.accept_tokens(drafts[-1:])
            grammar.rollback(len(drafts))
            if rng.random() < 0.5:
                drafts.append(next(t for t in range(3, 512) if t not in grammar_allows(grammar)))
            spec_tokens[req.request_id] = drafts
        requests.append(req)
    batch = manager.grammar_bitmask(requests, spec_tokens)
    assert batch.bitmask.shape == (len(requests) + sum(map(len, spec_tokens.values())), 16)
    num_draft_rows_filled = 0

    for req in requests:  # the reference: one request, one row at a time
        grammar = req.structured_output.grammar
        drafts = spec_tokens.get(req.request_id, [])
        want = np.full((1 + len(drafts), 16), -1, dtype=np.int32)
        grammar.fill_bitmask(want, 0)
        accepted = 0
        for j, token in enumerate(drafts):
            if not grammar.accept_tokens([token]):
                break
            accepted += 1
            if grammar.is_terminated():
                break
            grammar.fill_bitmask(want, j + 1)
        grammar.rollback(accepted)
        start = batch.req_row_start[req.request_id]
        assert np.array_equal(batch.bitmask[start : start + len(want)], want), req.request_id
        num_draft_rows_filled += int((want[1:] != -1).any(axis=1).sum())
    assert num_draft_rows_filled >= 10  # the draft rows were really exercised


def grammar_allows(grammar) -> list[int]:
    row = np.zeros((1, 16), dtype=np.int32)
    grammar.fill_bitmask(row, 0)
    return [t for t in range(512) if (int(row[0, t // 32]) >> (t % 32)) & 1]
