"""CUDA graphs on the GPU: every graph mode gives the tokens of the eager forward, and bf16 with
graphs keeps vLLM's top-5 parity rule against HF transformers on the GPU — with chunked prefill,
prefix caching and preemption. Skipped without CUDA."""

from __future__ import annotations

import gc

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from lmserve import LLM, SamplingParams  # noqa: E402
from tests.engine.test_hf_parity import (  # noqa: E402
    hf_greedy_with_top_k,
    make_prompts,
    top5_rule_holds,
)

MAX_TOKENS = 16


def _runner(llm: LLM):
    return llm.llm_engine.engine_core.engine_core.executor.worker.model_runner


def _generate(model_dir, dtype, prompts, logprobs=None, **kwargs):
    llm = LLM(model_dir, dtype=dtype, device="cuda", gpu_memory_utilization=0.3, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=logprobs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    graphs = _runner(llm).graphs
    sizes = (sorted(graphs.full), sorted(graphs.piecewise)) if graphs else ([], [])
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0] for o in outs], sizes


@pytest.mark.parametrize("mode", ["full", "piecewise", "full_and_piecewise"])
def test_every_graph_mode_matches_eager_float32(tiny_model_dir, mode):
    """A 64-token budget makes mixed steps (prompt chunks + decodes) under the piecewise cap,
    and the decode tail runs at many batch sizes (requests finish at different steps)."""
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()
    kw = {"max_num_batched_tokens": 64, "max_num_seqs": 16}
    eager, no_sizes = _generate(model_dir, "float32", prompts, logprobs=3, enforce_eager=True, **kw)
    graphed, sizes = _generate(
        model_dir, "float32", prompts, logprobs=3, cuda_graph_mode=mode, **kw
    )
    assert no_sizes == ([], [])
    assert bool(sizes[0]) == (mode != "piecewise") and bool(sizes[1]) == (mode != "full")
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
    for g, e in zip(graphed, eager):  # same kernels, padded shapes: logprobs agree closely
        for lp_g, lp_e in zip(g.logprobs, e.logprobs):
            for token, lp in lp_e.items():
                assert abs(lp_g[token].logprob - lp.logprob) < 1e-3


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {},
        {"max_num_batched_tokens": 48, "long_prefill_token_threshold": 40},  # chunked prefill
        {"num_gpu_blocks_override": 40, "max_num_batched_tokens": 64, "max_model_len": 512},
    ],
    ids=["graphs", "chunked", "preemption"],  # 40 blocks for 12 prompts force preemption
)
def test_bf16_with_graphs_keeps_top5_parity_with_hf(tiny_model_dir, engine_kwargs):
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()
    hf = list(zip(*hf_greedy_with_top_k(model_dir, prompts, torch.bfloat16, MAX_TOKENS)))
    # Twice through one engine: the second pass hits the prefix cache.
    llm = LLM(model_dir, dtype="bfloat16", device="cuda", gpu_memory_utilization=0.3,
              **engine_kwargs)  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=5)
    for _ in range(2):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for out, (hf_tokens, hf_top5) in zip(outs, hf):
            completion = out.outputs[0]
            ours_top5 = [set(lp) for lp in completion.logprobs]
            assert top5_rule_holds(completion.token_ids, ours_top5, hf_tokens, hf_top5)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    if "num_gpu_blocks_override" in engine_kwargs:
        assert scheduler.num_preemptions > 0
    assert scheduler.kv_cache_manager.prefix_cache_stats.hits > 0
    assert _runner(llm).graphs is not None


def test_ngram_verify_steps_replay_verify_graphs_and_match_eager_float32(tiny_model_dir):
    """Speculative decoding with full graphs: verify steps (up to 1 + k tokens per request)
    replay the verify graphs, and greedy float32 output equals the eager engine's and the
    engine's without speculation."""
    from tests.spec_decode.test_spec_decode_e2e import NGRAM, make_prompts

    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    inputs = [{"prompt_token_ids": p} for p in prompts]

    def run(**kwargs):
        llm = LLM(model_dir, dtype="float32", device="cuda", gpu_memory_utilization=0.3, **kwargs)
        graphs, replays = _runner(llm).graphs, []
        if graphs is not None:
            for size, graph in graphs.verify.items():
                graph.replay = _counted(graph.replay, replays, size)
        outs = llm.generate(inputs, params, use_tqdm=False)
        verify_sizes = sorted(graphs.verify) if graphs is not None else []
        llm.shutdown()
        gc.collect()
        torch.cuda.empty_cache()
        return [list(o.outputs[0].token_ids) for o in outs], verify_sizes, replays

    plain, _, _ = run(enforce_eager=True)
    eager, _, _ = run(enforce_eager=True, speculative_config=NGRAM)
    graphed, sizes, replays = run(speculative_config=NGRAM)
    assert sizes[:4] == [1, 2, 4, 8]
    assert replays, "no verify step replayed a verify graph"
    assert graphed == eager == plain


def _counted(replay, calls: list, size: int):
    def wrapper(num_tokens):
        calls.append((size, num_tokens))
        return replay(num_tokens)

    return wrapper


def test_small_decode_graphs_hold_the_lm_head_and_give_the_eager_heads_bits(tiny_model_dir):
    """Decode graphs of up to GEMV_MAX_ROWS requests run the LM head too: their logits are the
    bits of the eager head on the graph's hidden states, larger graphs have none, and a
    bf16 engine whose small decode steps take them keeps the top-5 rule against HF."""
    from lmserve.model.layers.gemv import GEMV_MAX_ROWS

    model_dir = tiny_model_dir("llama")
    llm = LLM(model_dir, dtype="bfloat16", device="cuda", gpu_memory_utilization=0.3,
              max_num_seqs=16)  # fmt: skip
    runner = _runner(llm)
    graphs = runner.graphs
    assert {s for s, g in graphs.full.items() if g.logits is not None} == {
        s for s in graphs.full if s <= GEMV_MAX_ROWS
    }
    prompts = make_prompts()[:3]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=5)
    heads = []
    compute_logits = runner.model.compute_logits
    runner.model.compute_logits = lambda h: heads.append(len(h)) or compute_logits(h)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    runner.model.compute_logits = compute_logits
    # Eager heads ran only for the prefill steps: every decode step took the graph's logits.
    assert len(heads) < MAX_TOKENS
    with torch.inference_mode():
        for size in (1, 4):
            graph = graphs.full[size]
            graph.replay(size)
            assert torch.equal(graph.logits, compute_logits(graph.output))
    hf = list(zip(*hf_greedy_with_top_k(model_dir, prompts, torch.bfloat16, MAX_TOKENS)))
    for out, (hf_tokens, hf_top5) in zip(outs, hf):
        completion = out.outputs[0]
        ours_top5 = [set(lp) for lp in completion.logprobs]
        assert top5_rule_holds(completion.token_ids, ours_top5, hf_tokens, hf_top5)
    llm.shutdown()


def test_shared_prefix_decode_replays_shared_graphs_and_matches_the_plain_path(
    tiny_model_dir, monkeypatch
):
    """Sixteen requests whose prompts share 1,600 tokens, then differ: their decode steps
    replay the shared-prefix graphs (the prefix read once per batch), and float32 tokens and
    logprobs equal those of the plain decode graphs (LMSERVE_SHARED_PREFIX_ATTENTION=0)."""
    import random

    from lmserve.attention.shared_prefix import MIN_REQS

    model_dir = tiny_model_dir("llama")
    rng = random.Random(7)
    prefix = [rng.randrange(4, 512) for _ in range(1600)]
    prompts = [prefix + [rng.randrange(4, 512) for _ in range(3 + i)] for i in range(MIN_REQS)]
    kw = {"max_num_seqs": 16, "logprobs": 3}
    monkeypatch.setenv("LMSERVE_SHARED_PREFIX_ATTENTION", "0")
    plain, _ = _generate(model_dir, "float32", prompts, **kw)
    monkeypatch.setenv("LMSERVE_SHARED_PREFIX_ATTENTION", "1")
    llm = LLM(model_dir, dtype="float32", device="cuda", gpu_memory_utilization=0.3,
              max_num_seqs=16)  # fmt: skip
    graphs = _runner(llm).graphs
    assert sorted(graphs.shared) == [16]
    calls: list = []
    for size, graph in graphs.shared.items():
        graph.replay = _counted(graph.replay, calls, size)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.shutdown()
    assert len(calls) >= 5  # every decode step while all 16 run (some may stop at EOS)
    shared = [o.outputs[0] for o in outs]
    assert [o.token_ids for o in shared] == [o.token_ids for o in plain]
    for s, p in zip(shared, plain):
        for lp_s, lp_p in zip(s.logprobs, p.logprobs):
            for token, lp in lp_p.items():
                assert abs(lp_s[token].logprob - lp.logprob) < 1e-3
