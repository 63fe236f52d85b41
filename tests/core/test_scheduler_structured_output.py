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


def test_constrained_request_is_not_scheduled_ahead(backend):
    """Async scheduling: step 2 is scheduled before step 1's token is known; the plain
    request goes ahead, the constrained one waits for its token (its mask depends on it)."""
    scheduler = make_scheduler(backend)
    scheduler.add_request(request("json", regex="[ab]+"))
    scheduler.add_request(request("plain"))
    scheduler.structured_output._compiled[("regex", "[ab]+", False)].result(10)
    step1 = scheduler.schedule()
    assert set(step1.num_scheduled_tokens) == {"json", "plain"}
    step2 = scheduler.schedule()  # step 1 still in flight
    assert list(step2.num_scheduled_tokens) == ["plain"] and step2.structured_output is None
    token_a = allowed_tokens(step1, "json")[0]
    scheduler.update_from_output(step1, answer(step1, {"json": [token_a]}))
    step3 = scheduler.schedule()
    assert "json" in step3.num_scheduled_tokens
    assert EOS in allowed_tokens(step3, "json")  # one letter is enough: may stop now


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
