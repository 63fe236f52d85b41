"""Speculative decoding through `LLM`, float32 on CPU with tiny random models: greedy outputs are
identical with and without speculation (n-gram and draft model; chunked prefill, prefix caching
and preemption on), a draft equal to the target has every proposal accepted, penalties, stop
tokens and logprobs behave as without speculation, and the configuration is validated."""

from __future__ import annotations

import random

import pytest

from lmserve import LLM, SamplingParams
from lmserve.config import ConfigError, EngineConfig
from tests.engine.test_hf_parity import hf_greedy

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}  # fmt: skip
MAX_TOKENS = 24
# Configurations of the engine around speculation (the prefix cache is on in all of them).
ENGINE_SETUPS = {
    "plain": {},
    "chunked_prefill": {"max_num_batched_tokens": 24, "long_prefill_token_threshold": 20},
    "preemption": {
        "num_gpu_blocks_override": 24,
        "max_model_len": 384,
        "max_num_batched_tokens": 64,
    },  # fmt: skip
}


def make_prompts(seed: int = 0) -> list[list[int]]:
    """Mixed lengths, plus repetitive prompts (a 5-token phrase 8 times, one token 20 times)
    where the tiny models' greedy output often loops, so n-gram drafts get accepted."""
    rng = random.Random(seed)
    mixed = [[rng.randrange(4, 512) for _ in range(n)] for n in (1, 3, 17, 64, 120)]
    phrases = [[rng.randrange(4, 512) for _ in range(5)] * 8 for _ in range(4)]
    return mixed + phrases + [[t] * 20 for t in (4, 5, 9)]


def make_llm(model_dir: str, **kwargs) -> LLM:
    return LLM(model_dir, dtype="float32", device="cpu", **kwargs)


def greedy(llm: LLM, prompts, max_tokens: int = MAX_TOKENS, **params) -> list[list[int]]:
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, **params)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


_reference: dict[tuple, list[list[int]]] = {}


def reference(model_dir: str, prompts, max_tokens: int = MAX_TOKENS, **params):
    """Greedy output without speculation (itself checked against HF in test_hf_parity)."""
    key = (model_dir, max_tokens, repr(sorted(params.items())), tuple(map(tuple, prompts)))
    if key not in _reference:
        _reference[key] = greedy(make_llm(model_dir), prompts, max_tokens, **params)
    return _reference[key]


def assert_no_leaks(llm: LLM) -> None:
    kv = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_gpu_blocks


# ---- n-gram --------------------------------------------------------------------------------
def test_ngram_greedy_matches_hf(tiny_model_dir):
    from tests.engine.test_hf_parity import PROMPT_LENS
    from tests.engine.test_hf_parity import make_prompts as hf_prompts

    model_dir = tiny_model_dir("llama")
    prompts = hf_prompts()  # the same as test_hf_parity's: the HF reference is computed once
    assert len(prompts) == len(PROMPT_LENS)
    llm = make_llm(model_dir, speculative_config=NGRAM)
    assert greedy(llm, prompts, max_tokens=12) == hf_greedy(model_dir, prompts)


@pytest.mark.parametrize(
    "arch, setup", [("llama", "chunked_prefill"), ("llama", "preemption"), ("qwen3", "plain")]
)
def test_ngram_greedy_output_is_identical_to_no_speculation(tiny_model_dir, arch, setup):
    model_dir = tiny_model_dir(arch)
    prompts = make_prompts()
    llm = make_llm(model_dir, speculative_config=NGRAM, **ENGINE_SETUPS[setup])
    expected = reference(model_dir, prompts)
    assert greedy(llm, prompts) == expected
    assert greedy(llm, prompts) == expected  # second pass: prefix-cache hits
    stats = llm.get_spec_decode_stats()
    assert stats.num_accepted_tokens > 0 and stats.num_accepted_tokens < stats.num_draft_tokens
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    if setup == "preemption":
        assert scheduler.num_preemptions > 0
    assert scheduler.kv_cache_manager.prefix_cache_stats.hits > 0
    assert_no_leaks(llm)


def test_ngram_with_penalties_and_stop_tokens_matches_no_speculation(tiny_model_dir):
    """Target row j must see drafts 1..j as output tokens (penalties) and min_tokens must
    count them; a stop token among accepted drafts ends the request there."""
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()[-7:]  # the repetitive ones
    llm = make_llm(model_dir, speculative_config=NGRAM)
    for params in (
        {"repetition_penalty": 1.3, "frequency_penalty": 0.4, "presence_penalty": 0.2},
        {"stop_token_ids": [224, 361, 232], "min_tokens": 3},
    ):
        assert greedy(llm, prompts, **params) == reference(model_dir, prompts, **params), params
    assert llm.get_spec_decode_stats().num_accepted_tokens > 0


def test_ngram_logprobs_match_no_speculation(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()[-4:]
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=3)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    base = make_llm(model_dir).generate(inputs, params, use_tqdm=False)
    llm = make_llm(model_dir, speculative_config=NGRAM)
    spec = llm.generate(inputs, params, use_tqdm=False)
    assert llm.get_spec_decode_stats().num_accepted_tokens > 0
    for b, s in zip(base, spec):
        b, s = b.outputs[0], s.outputs[0]
        assert b.token_ids == s.token_ids
        assert len(s.logprobs) == len(s.token_ids)
        for lb, ls in zip(b.logprobs, s.logprobs):
            assert list(lb) == list(ls)  # same token ids, in the same order
            for token_id in lb:
                assert lb[token_id].rank == ls[token_id].rank
                assert abs(lb[token_id].logprob - ls[token_id].logprob) < 1e-4
        assert abs(b.cumulative_logprob - s.cumulative_logprob) < 1e-3


def test_random_sampling_with_speculation_respects_max_tokens_and_seeds(tiny_model_dir):
    llm = make_llm(tiny_model_dir("llama"), speculative_config=NGRAM)
    prompts = [{"prompt_token_ids": p} for p in make_prompts()]
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, seed=7)
    first = llm.generate(prompts, params, use_tqdm=False)
    again = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 20 for o in first)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]
    assert_no_leaks(llm)


# ---- draft model ---------------------------------------------------------------------------
def draft_config(model_dir: str, k: int = 4) -> dict:
    return {"method": "draft_model", "model": model_dir, "num_speculative_tokens": k}


@pytest.mark.parametrize("setup", ["chunked_prefill", "preemption"])
def test_draft_equal_to_target_has_every_proposal_accepted(tiny_model_dir, setup):
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()
    llm = make_llm(model_dir, speculative_config=draft_config(model_dir), **ENGINE_SETUPS[setup])
    assert greedy(llm, prompts) == reference(model_dir, prompts)
    stats = llm.get_spec_decode_stats()
    assert stats.num_draft_tokens > 0
    assert stats.num_accepted_tokens == stats.num_draft_tokens  # acceptance rate 1.0
    assert stats.acceptance_rate_per_pos() == [1.0] * 4
    if setup == "preemption":
        assert llm.llm_engine.engine_core.engine_core.scheduler.num_preemptions > 0
    assert_no_leaks(llm)


def test_different_draft_model_keeps_greedy_output_identical(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    draft_dir = tiny_model_dir("llama", seed=1)  # same vocabulary, other weights
    prompts = make_prompts()
    llm = make_llm(model_dir, speculative_config=draft_config(draft_dir, k=3), **ENGINE_SETUPS["preemption"])  # fmt: skip
    assert greedy(llm, prompts) == reference(model_dir, prompts)
    assert greedy(llm, prompts) == reference(model_dir, prompts)  # prefix-cache hits
    stats = llm.get_spec_decode_stats()
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert llm.llm_engine.engine_core.engine_core.scheduler.num_preemptions > 0
    assert_no_leaks(llm)


def test_draft_model_kv_cache_is_sized_into_each_block(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    plain = make_llm(model_dir, cpu_kvcache_space_gib=0.01)
    spec = make_llm(model_dir, cpu_kvcache_space_gib=0.01, speculative_config=draft_config(model_dir))  # fmt: skip
    blocks = [llm.llm_engine.engine_core.engine_core.get_num_gpu_blocks() for llm in (plain, spec)]
    assert blocks[1] == blocks[0] // 2  # the draft (same shape) doubles the bytes per block


# ---- configuration -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, pattern",
    [
        ({"method": "medusa", "num_speculative_tokens": 2}, r"method='medusa'.*ngram"),
        ({"method": "ngram", "num_speculative_tokens": 0}, r"num_speculative_tokens=0.*>= 1"),
        ({"method": "ngram"}, r"missing required key\(s\) \['num_speculative_tokens'\]"),
        (
            {
                "method": "ngram",
                "num_speculative_tokens": 2,
                "prompt_lookup_min": 4,
                "prompt_lookup_max": 2,
            },  # fmt: skip
            r"prompt_lookup_min=4.*<= prompt_lookup_max=2",
        ),
        ({"method": "ngram", "num_speculative_tokens": 2, "k": 3}, r"unknown key\(s\) \['k'\]"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, r"model=None.*draft model"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "model": "x"},
            r"model='x'.*only for method 'draft_model'",
        ),
        (
            {"method": "draft_model", "num_speculative_tokens": 2, "model": "/no/such/model"},
            r"speculative_config.model='/no/such/model'",
        ),
        ("{not json", r"not valid JSON"),
    ],
)
def test_bad_speculative_config_is_rejected_clearly(tiny_model_dir, spec, pattern):
    with pytest.raises(ConfigError, match=pattern):
        EngineConfig.from_kwargs(tiny_model_dir("llama"), speculative_config=spec)


def test_draft_model_with_another_vocabulary_is_rejected(tiny_model_dir):
    other = tiny_model_dir("llama", vocab_size=600)
    with pytest.raises(ConfigError, match=r"600 tokens, the target's 512"):
        EngineConfig.from_kwargs(tiny_model_dir("llama"), speculative_config=draft_config(other))


def test_ngram_lookup_defaults_follow_vllm(tiny_model_dir):
    config = EngineConfig.from_kwargs(
        tiny_model_dir("llama"),
        speculative_config='{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}',  # fmt: skip
    ).speculative_config
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (3, 3)


def test_cli_speculative_config_flag(tiny_model_dir, capsys):
    from lmserve.entrypoints.cli import main

    model_dir = tiny_model_dir("llama")
    spec = '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1}'
    args = ["generate", model_dir, "--device", "cpu", "--dtype", "float32", "--quiet", "--json"]
    assert main([*args, "--prompt", "The small engine", "--speculative-config", spec]) == 0
    assert '"token_ids"' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--speculative-config", "[1, 2]"])
    assert "must be a JSON object" in capsys.readouterr().err
    assert main([*args, "--speculative-config", '{"method": "x", "num_speculative_tokens": 1}']) == 2  # fmt: skip
    assert "speculative_config.method='x'" in capsys.readouterr().err


def test_draft_equal_to_target_on_qwen2_with_k_2(tiny_model_dir):
    model_dir = tiny_model_dir("qwen2")
    prompts = make_prompts()[-4:]
    llm = make_llm(model_dir, speculative_config=draft_config(model_dir, k=2))
    assert greedy(llm, prompts, max_tokens=10) == reference(model_dir, prompts, max_tokens=10)
    assert llm.get_spec_decode_stats().acceptance_rate == 1.0


@pytest.mark.slow
def test_tensor_parallel_draft_model_matches_no_speculation(tiny_model_dir):
    """TP=2 on CPU (gloo): drafts travel through the multiprocess executor, the draft model is
    sharded like the target, and every rank verifies the same drafts the same way."""
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()[-5:]
    llm = make_llm(
        model_dir, tensor_parallel_size=2, num_gpu_blocks_override=64, max_model_len=512,
        speculative_config=draft_config(model_dir, k=3),
    )  # fmt: skip
    try:
        assert greedy(llm, prompts) == reference(model_dir, prompts)
        stats = llm.get_spec_decode_stats()
        assert stats.num_draft_tokens > 0 and stats.acceptance_rate == 1.0
    finally:
        llm.shutdown()
