"""Tensor parallelism on CPU (gloo, two processes): sharded layers give the logits of one rank.

The weights are loaded from the same checkpoint at both sizes; every rank must end with the
full logits (the LM head gathers), equal to TP=1 up to float32 reduction order.
"""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from tests.ports import free_port
from tests.tiny_models import PagedKVHarness

PROMPTS = {"a": [5, 17, 42, 99, 7, 300, 12, 64, 8], "b": [1, 2, 3]}
CASES = [
    ("llama", {}),  # 4 heads, 2 KV heads: KV heads split
    ("llama", {"num_key_value_heads": 1}),  # one KV head: replicated on both ranks
    ("llama", {"tie_word_embeddings": True, "attention_bias": True}),
    ("qwen2", {}),
    ("qwen3", {}),
]


def run_model(model_dir: str, steps: list[dict[str, list[int]]]) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoConfig

    from lmserve.model.loader import load_model

    hf_config = AutoConfig.from_pretrained(model_dir)
    model = load_model(hf_config, model_dir, torch.float32, torch.device("cpu"))
    harness = PagedKVHarness(hf_config)
    return [harness.step(model, step) for step in steps]


def tp_worker(rank: int, world: int, port: int, model_dir: str, steps, results) -> None:
    from lmserve.distributed.parallel_state import (
        destroy_tensor_parallel,
        exit_worker_process,
        init_tensor_parallel,
    )

    torch.set_num_threads(1)
    init_tensor_parallel(world, rank, f"tcp://127.0.0.1:{port}", backend="gloo")
    try:
        logits = run_model(model_dir, steps)  # numpy: plain bytes through the queue
        results.put((rank, [{k: v.numpy() for k, v in step.items()} for step in logits]))
    finally:
        destroy_tensor_parallel()
    results.close()
    results.join_thread()  # the queue's feeder thread has sent the logits
    exit_worker_process(0)  # as the engine's TP workers end (run_worker)


@pytest.mark.parametrize("arch, overrides", CASES)
def test_tp2_logits_match_tp1(tiny_model_dir, arch, overrides):
    model_dir = tiny_model_dir(arch, **overrides)
    steps = [PROMPTS, {"a": [77], "b": [9, 10]}]  # prefill, then decode + a chunk
    expected = run_model(model_dir, steps)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=tp_worker, args=(r, 2, port, model_dir, steps, results))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for rank in (0, 1):
        for want, have in zip(expected, got[rank]):
            for req_id in want:
                torch.testing.assert_close(
                    torch.from_numpy(have[req_id]),
                    want[req_id],
                    rtol=1e-4,
                    atol=1e-4,  # float32 reduction order differs across ranks
                )


ENGINE_PROMPTS = [[5, 6, 7], list(range(10, 80)), [300, 301], list(range(100, 140))]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_engine_tp2_greedy_matches_tp1(tiny_model_dir, arch):
    from lmserve import LLM, SamplingParams

    model_dir = tiny_model_dir(arch)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in ENGINE_PROMPTS]
    tp1 = LLM(
        model_dir, device="cpu", dtype="float32", num_gpu_blocks_override=64, max_model_len=512
    )
    expected = [o.outputs[0].token_ids for o in tp1.generate(prompts, params, use_tqdm=False)]
    tp2 = LLM(
        model_dir,
        device="cpu",
        dtype="float32",
        num_gpu_blocks_override=64,
        max_model_len=512,
        tensor_parallel_size=2,
        max_num_batched_tokens=32,
    )  # chunked prefill across ranks
    try:
        got = [o.outputs[0].token_ids for o in tp2.generate(prompts, params, use_tqdm=False)]
    finally:
        tp2.shutdown()
    assert got == expected


def test_dead_tp_worker_is_an_engine_failure(tiny_model_dir):
    import psutil

    from lmserve import LLM, SamplingParams

    llm = LLM(
        tiny_model_dir("llama"),
        device="cpu",
        num_gpu_blocks_override=64,
        max_model_len=512,
        tensor_parallel_size=2,
    )
    try:
        executor = llm.llm_engine.engine_core.engine_core.executor
        psutil.Process(executor.workers[1].pid).kill()
        with pytest.raises(RuntimeError, match="tensor-parallel worker 1 .* died"):
            llm.generate(
                {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2), use_tqdm=False
            )
    finally:
        llm.shutdown()


def test_rank0_leaves_the_store_only_after_every_other_rank():
    import threading
    import time

    import torch.distributed as dist

    from lmserve.distributed.parallel_state import TensorParallelGroup, _leave_store

    store = dist.HashStore()
    left = threading.Event()
    rank0 = threading.Thread(
        target=lambda: (_leave_store(store, TensorParallelGroup(0, 3)), left.set())
    )
    rank0.start()
    _leave_store(store, TensorParallelGroup(1, 3))
    time.sleep(0.05)
    assert not left.is_set()  # rank 2 has not left yet: rank 0 keeps serving
    _leave_store(store, TensorParallelGroup(2, 3))
    assert left.wait(5)
    rank0.join()
