"""Workloads: bench serve's arrival process, multi-round histories, trace replay."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from lmserve.bench import serve
from lmserve.sim.workload import WorkloadSpec, sessions, trace_items


def test_arrivals_are_bench_serves_for_the_same_seed(monkeypatch):
    slept: list[float] = []

    async def fake_sleep(s):
        slept.append(s)

    monkeypatch.setattr(serve.asyncio, "sleep", fake_sleep)

    async def collect():
        return [x async for x in serve.arrivals(list(range(20)), 3.0, 0.5,
                                                 np.random.default_rng(11))]  # fmt: skip

    asyncio.run(collect())
    spec = WorkloadSpec("random", request_rate=3.0, burstiness=0.5, num_prompts=20, seed=11,
                        input_len=4, output_len=2)  # fmt: skip
    times = [t for t, _ in sessions(spec, 16, "sha256")]
    assert np.allclose(np.diff(times), slept)


def test_a_users_next_round_extends_its_whole_last_exchange():
    spec = WorkloadSpec("multi-round-qa", num_users=1, num_rounds=3, system_prompt_len=40,
                        question_len=10, answer_len=6)  # fmt: skip
    ((_, user),) = list(sessions(spec, 16, "sha256"))
    first = user.next_request()
    first_ids = list(first.token_ids[: first.num_prompt_tokens + first.max_tokens])
    second = user.next_request()
    assert second.num_prompt_tokens == 40 + 10 + 6 + 10
    assert second.token_ids[: len(first_ids)] == first_ids
    assert second.hashes[: len(first_ids) // 16] == first.hashes[: len(first_ids) // 16]


def test_a_trace_replays_its_times_lengths_and_prefix_groups(tmp_path):
    path = tmp_path / "trace.jsonl"
    rows = [
        {"timestamp": 0.5, "prompt_tokens": 100, "output_tokens": 5, "prefix_group": "faq",
         "prefix_tokens": 64},
        {"timestamp": 0.0, "prompt_tokens": 30, "output_tokens": 7},
        {"timestamp": 2.0, "prompt_tokens": 90, "output_tokens": 3, "prefix_group": "faq",
         "prefix_tokens": 64},
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows))
    spec = WorkloadSpec("trace", trace_path=str(path))
    arrivals = [(t, s.next_request()) for t, s in sessions(spec, 16, "sha256")]
    assert [t for t, _ in arrivals] == [0.0, 0.5, 2.0]
    assert [r.num_prompt_tokens for _, r in arrivals] == [30, 100, 90]
    assert [r.max_tokens for _, r in arrivals] == [7, 5, 3]
    faq = [r for _, r in arrivals[1:]]
    assert faq[0].hashes[:4] == faq[1].hashes[:4] != arrivals[0][1].hashes[:4]


def test_a_bad_trace_row_is_named(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("timestamp,prompt_tokens,output_tokens\n0,10,2\n1,x,2\n")
    with pytest.raises(ValueError, match="row 2"):
        trace_items(str(path))
