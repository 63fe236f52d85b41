"""Async scheduling end to end on CPU (forced on; it is auto-enabled on CUDA only): two steps in
flight, the next step's input tokens fed from the previous step's sampled tokens on the device.
Output must be exactly what synchronous stepping gives, and greedy output what HF gives."""

from __future__ import annotations

import pytest

from lmserve import LLM, SamplingParams
from lmserve.config import ConfigError, EngineConfig
from tests.engine.test_hf_parity import (
    MAX_TOKENS,
    PROMPT_LENS,
    hf_greedy,
    lmserve_greedy,
    make_llm,
    make_prompts,
    scheduler_of,
)


def engine_core_of(llm: LLM):
    return llm.llm_engine.engine_core.engine_core


def count_in_flight(llm: LLM) -> list[int]:
    """Spy: how many steps were in flight each time one was collected."""
    core = engine_core_of(llm)
    seen: list[int] = []
    original = core._update

    def spy(scheduler_output, runner_output):
        seen.append(len(core.in_flight) + 1)
        return original(scheduler_output, runner_output)

    core._update = spy
    return seen


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"max_num_batched_tokens": 24, "long_prefill_token_threshold": 20},
        {"num_gpu_blocks_override": 24, "max_model_len": 384, "enable_prefix_caching": False},
        {"num_gpu_blocks_override": 24, "max_model_len": 384, "max_num_batched_tokens": 64},
    ],
    ids=["mixed-batch", "chunked-prefill", "preemption", "preemption-prefix-cache"],
)
def test_async_greedy_matches_hf(tiny_model_dir, kwargs):
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()
    llm = make_llm(model_dir, async_scheduling=True, **kwargs)
    in_flight = count_in_flight(llm)
    _, ours = lmserve_greedy(llm, prompts)
    assert ours == hf_greedy(model_dir, prompts)
    assert max(in_flight) == 2  # the next step was launched before this one was collected
    sched = scheduler_of(llm)
    if "num_gpu_blocks_override" in kwargs:
        assert sched.num_preemptions > 0
    kv = sched.kv_cache_manager
    assert kv.num_free_blocks == kv.num_gpu_blocks  # nothing leaked
    assert not engine_core_of(llm).in_flight


def test_async_second_pass_hits_prefix_cache_and_matches_hf(tiny_model_dir):
    model_dir = tiny_model_dir("qwen3")
    prompts = make_prompts()
    llm = make_llm(model_dir, async_scheduling=True, enable_prefix_caching=True)
    lmserve_greedy(llm, prompts)
    second, ours = lmserve_greedy(llm, prompts)
    assert ours == hf_greedy(model_dir, prompts)
    for out, n in zip(second, PROMPT_LENS):
        assert out.num_cached_tokens == (n - 1) // 16 * 16


def _sampled_run(model_dir: str, async_scheduling: bool, params: list[SamplingParams]):
    llm = make_llm(model_dir, async_scheduling=async_scheduling)
    prompts = [{"prompt_token_ids": p} for p in make_prompts(seed=3)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [
        (
            o.outputs[0].token_ids,
            o.outputs[0].finish_reason,
            o.outputs[0].stop_reason,
            o.outputs[0].logprobs,
            o.prompt_logprobs,
        )
        for o in outs
    ]


def test_async_sampling_stops_logprobs_and_penalties_equal_sync(tiny_model_dir):
    """Seeded sampling draws the same tokens either way; stop tokens, max_tokens, min_tokens,
    logprobs, prompt logprobs and penalties (which read every output token on the host) too."""
    model_dir = tiny_model_dir("llama")
    params = []
    for i in range(len(PROMPT_LENS)):
        p = dict(temperature=0.9, seed=100 + i, max_tokens=MAX_TOKENS + i % 4)
        if i % 4 == 1:
            p.update(stop_token_ids=list(range(4, 300)), min_tokens=2)  # stops early
        if i % 4 == 2:
            p.update(logprobs=3, prompt_logprobs=2)
        if i % 4 == 3:
            p.update(frequency_penalty=0.5, repetition_penalty=1.2, top_k=20)
        params.append(SamplingParams(**p))
    sync = _sampled_run(model_dir, False, params)
    asynchronous = _sampled_run(model_dir, True, params)
    assert [s[:3] for s in asynchronous] == [s[:3] for s in sync]
    assert any(s[1] == "stop" for s in sync) and any(s[1] == "length" for s in sync)
    # Logprobs: same tokens and ranks; values up to float32 rounding (steps batch differently).
    for a, s in zip(asynchronous, sync):
        for name, ours, theirs in (("logprobs", a[3], s[3]), ("prompt logprobs", a[4], s[4])):
            ours, theirs = _logprob_table(ours), _logprob_table(theirs)
            assert [k for k, _ in ours] == [k for k, _ in theirs], name
            assert [v for _, v in ours] == pytest.approx([v for _, v in theirs], abs=1e-4), name
    assert any(s[3] for s in sync) and any(s[4] for s in sync)


def _logprob_table(positions) -> list[tuple[tuple[int, int, int], float]]:
    """[((position, token, rank), logprob), ...] over every position that has logprobs."""
    return [
        ((i, token, lp.rank), lp.logprob)
        for i, p in enumerate(positions or [])
        for token, lp in sorted((p or {}).items())
    ]


def test_async_eos_finish_discards_the_step_already_in_flight(tiny_model_dir):
    """A request ending on EOS has one more step in flight; its token is never reported."""
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()
    _, greedy = lmserve_greedy(make_llm(model_dir), prompts)
    # EOS for every request: a token some request first emits mid-way (not at its start).
    eos_prompt, eos_at = next(
        (i, tokens.index(t)) for i, tokens in enumerate(greedy) for t in tokens[2:]
        if tokens.index(t) >= 2
    )  # fmt: skip
    eos = greedy[eos_prompt][eos_at]
    llm = make_llm(model_dir, async_scheduling=True)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    llm.llm_engine.input_processor.eos_token_id = eos
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for out, tokens in zip(outs, greedy):
        expected = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
        assert out.outputs[0].token_ids == expected
        stopped = eos in tokens[:-1]  # at max_tokens the length limit is checked first
        assert out.outputs[0].finish_reason == ("stop" if stopped else "length")
    assert outs[eos_prompt].outputs[0].token_ids == greedy[eos_prompt][: eos_at + 1]


def test_async_scheduling_is_auto_on_for_cuda_only_and_refused_with_speculation(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    config = EngineConfig.from_kwargs(model_dir, device="cpu")
    assert config.scheduler_config.async_scheduling is False
    config = EngineConfig.from_kwargs(model_dir, device="cpu", async_scheduling=True)
    assert config.scheduler_config.async_scheduling is True
    spec = {"method": "ngram", "num_speculative_tokens": 2}
    with pytest.raises(ConfigError, match="async_scheduling.*speculative decoding"):
        EngineConfig.from_kwargs(
            model_dir, device="cpu", async_scheduling=True, speculative_config=spec
        )
    config = EngineConfig.from_kwargs(model_dir, device="cpu", speculative_config=spec)
    assert config.scheduler_config.async_scheduling is False
    for bad in ("yes", 1, 0.0):  # no truthiness: a typo must not switch it on
        with pytest.raises(ConfigError, match="async_scheduling"):
            EngineConfig.from_kwargs(model_dir, device="cpu", async_scheduling=bad)
