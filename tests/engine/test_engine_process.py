"""The EngineCore in its own process: same outputs, the real cause on a failed start, death
noticed at once, a named process that does not spin while idle."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest

from lmserve import LLM, SamplingParams
from lmserve.config import EngineConfig
from lmserve.engine.async_llm import AsyncLLM
from lmserve.engine.core_client import EngineDeadError, EngineStartupError
from lmserve.sampling_params import RequestOutputKind

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": list(range(20, 90))}]


@pytest.fixture
def multiprocessing_on(monkeypatch):
    monkeypatch.setenv("LMSERVE_ENABLE_MULTIPROCESSING", "1")


def engine_process(llm: LLM) -> psutil.Process:
    return psutil.Process(llm.llm_engine.engine_core.engine_pid)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_background_engine_matches_in_process_engine(tiny_model_dir, monkeypatch, async_scheduling):
    model = tiny_model_dir("llama")
    inproc = LLM(model, device="cpu", dtype="float32")
    expected = [o.outputs[0].token_ids for o in inproc.generate(PROMPTS, GREEDY, use_tqdm=False)]
    monkeypatch.setenv("LMSERVE_ENABLE_MULTIPROCESSING", "1")
    llm = LLM(model, device="cpu", dtype="float32", async_scheduling=async_scheduling)
    try:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert llm.llm_engine.engine_core.call_utility("reset_prefix_cache") is True
    finally:
        llm.shutdown()


def test_engine_process_is_named_and_quiet_when_idle(tiny_model_dir, multiprocessing_on):
    llm = LLM(tiny_model_dir("llama"), device="cpu", num_gpu_blocks_override=256)
    try:
        proc = engine_process(llm)
        assert "lmserve::EngineCore" in " ".join(proc.cmdline())
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)  # it has worked; now it idles
        before = proc.cpu_times()
        time.sleep(2.0)
        after = proc.cpu_times()
        busy = (after.user + after.system) - (before.user + before.system)
        assert busy / 2.0 < 0.05, f"idle EngineCore used {busy / 2.0:.1%} of a core"
    finally:
        llm.shutdown()
    assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE


def test_failed_start_reports_the_real_cause(tiny_model_dir, tmp_path, multiprocessing_on):
    broken = tmp_path / "broken"
    broken.mkdir()
    src = tiny_model_dir("llama")
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            (broken / name).write_bytes((open(os.path.join(src, name), "rb")).read())
    # config.json parses (the front-end is happy); the weights are missing (the engine is not)
    with pytest.raises(EngineStartupError, match=r"(?s)failed to start.*safetensors"):
        LLM(str(broken), device="cpu")


def test_bad_config_stops_the_engine_process_started_before_it(tmp_path, multiprocessing_on):
    """LLM() starts the EngineCore process before building its configuration; a configuration
    error still raises at once and leaves no EngineCore behind."""
    before = {c.pid for c in psutil.Process().children(recursive=True)}  # other tests' servers
    with pytest.raises(Exception, match="missing"):
        LLM(str(tmp_path / "missing"), device="cpu")
    alive = [
        " ".join(c.cmdline())
        for c in psutil.Process().children(recursive=True)
        if c.pid not in before and c.is_running() and c.status() != psutil.STATUS_ZOMBIE
    ]
    assert not [cmd for cmd in alive if "resource_tracker" not in cmd], alive


def test_killed_engine_surfaces_as_engine_death(tiny_model_dir, multiprocessing_on):
    llm = LLM(tiny_model_dir("llama"), device="cpu", num_gpu_blocks_override=256)
    proc = engine_process(llm)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=5)
    deadline = time.monotonic() + 5
    while not llm.llm_engine.engine_core.is_dead and time.monotonic() < deadline:
        time.sleep(0.05)
    assert llm.llm_engine.engine_core.is_dead
    with pytest.raises(EngineDeadError, match="exited unexpectedly"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.shutdown()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_async_engine_streams_and_abort_frees_blocks(tiny_model_dir, async_scheduling):
    config = EngineConfig.from_kwargs(
        tiny_model_dir("llama"),
        device="cpu",
        num_gpu_blocks_override=256,
        async_scheduling=async_scheduling,
    )

    async def scenario():
        engine = AsyncLLM(config)
        try:
            params = SamplingParams(
                temperature=0, max_tokens=6, ignore_eos=True, output_kind=RequestOutputKind.DELTA
            )
            deltas = [out async for out in engine.generate(PROMPTS[0], params, "a")]
            assert sum(len(d.outputs[0].token_ids) for d in deltas) == 6
            assert deltas[-1].finished
            # A long request, abandoned after its first token: the engine frees it.
            long = SamplingParams(
                max_tokens=5000, ignore_eos=True, output_kind=RequestOutputKind.DELTA
            )
            stream = engine.generate(PROMPTS[1], long, "b")
            await stream.__anext__()
            await stream.aclose()  # what a client disconnect does
            for _ in range(100):
                if (
                    engine.stats.running._value.get() == 0
                    and engine.stats.kv_usage._value.get() == 0
                ):
                    break
                await asyncio.sleep(0.05)
            assert engine.stats.running._value.get() == 0
            assert engine.stats.kv_usage._value.get() == 0
            assert engine.num_unfinished_requests == 0
        finally:
            engine.shutdown()

    asyncio.run(scenario())


def test_utility_calls_are_limited_to_known_methods(tiny_model_dir, multiprocessing_on):
    llm = LLM(tiny_model_dir("llama"), device="cpu", num_gpu_blocks_override=256)
    try:
        with pytest.raises(RuntimeError, match="unknown utility method 'shutdown_everything'"):
            llm.llm_engine.engine_core.call_utility("shutdown_everything")
        assert llm.llm_engine.engine_core.call_utility("get_num_gpu_blocks") == 256
    finally:
        llm.shutdown()
