"""The correctness oracle (DESIGN.md §6): greedy token ids identical to HF transformers
`generate` in float32 on CPU — for a mixed batch, with chunked prefill, with prefix caching, and
under preemption."""

from __future__ import annotations

import random

import pytest
import torch

from lmserve import LLM, SamplingParams

ARCHS = ["llama", "qwen2", "qwen3"]
MAX_TOKENS = 12
# 12 prompts of mixed lengths, 1 to 300 tokens, as token ids.
PROMPT_LENS = [1, 3, 17, 300, 64, 5, 250, 31, 2, 129, 16, 90]


def make_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 512) for _ in range(n)] for n in PROMPT_LENS]


_hf_cache: dict[tuple, list[list[int]]] = {}


def hf_greedy(model_dir: str, prompts: list[list[int]]) -> list[list[int]]:
    """HF `generate`, one prompt at a time (no padding), greedy, float32."""
    key = (model_dir, tuple(map(tuple, prompts)))
    if key not in _hf_cache:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        outs = []
        for ids in prompts:
            with torch.no_grad():
                gen = model.generate(
                    torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=3
                )
            outs.append(gen[0, len(ids) :].tolist())
        _hf_cache[key] = outs
    return _hf_cache[key]


def hf_greedy_with_top_k(
    model_dir: str,
    prompts: list[list[int]],
    dtype: torch.dtype,
    max_new_tokens: int,
    device: str = "cuda",
    top_k: int = 5,
) -> tuple[list[list[int]], list[list[set[int]]]]:
    """HF `generate`, greedy, one prompt at a time: (token ids, per-position top-k token ids)
    for each prompt — the reference side of vLLM's top-5 rule on the GPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    tokens, tops = [], []
    for ids in prompts:
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([ids], device=device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=3,
                output_logits=True,
                return_dict_in_generate=True,
            )
        tokens.append(gen.sequences[0, len(ids) :].tolist())
        tops.append([set(step[0].float().topk(top_k).indices.tolist()) for step in gen.logits])
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the engine under test comes next on the same GPU
    return tokens, tops


def top5_rule_holds(ours, ours_top5, theirs, theirs_top5) -> bool:
    """vLLM's rule: at the first position where the tokens differ, each side's token is in the
    other's top-5 (after that the sequences may diverge freely)."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return a in theirs_top5[i] and b in ours_top5[i]
    return len(ours) == len(theirs)


def lmserve_greedy(llm: LLM, prompts: list[list[int]]):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return outs, [o.outputs[0].token_ids for o in outs]


def scheduler_of(llm: LLM):
    return llm.llm_engine.engine_core.engine_core.scheduler


def make_llm(model_dir: str, **kwargs) -> LLM:
    return LLM(model_dir, dtype="float32", device="cpu", **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_greedy_matches_hf(tiny_model_dir, arch):
    model_dir = tiny_model_dir(arch)
    prompts = make_prompts()
    _, ours = lmserve_greedy(make_llm(model_dir), prompts)
    assert ours == hf_greedy(model_dir, prompts)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_with_tiny_budget_matches_hf(tiny_model_dir, arch):
    model_dir = tiny_model_dir(arch)
    prompts = make_prompts()
    llm = make_llm(model_dir, max_num_batched_tokens=24, long_prefill_token_threshold=20)
    sched = scheduler_of(llm)
    budgets = []
    original = sched.schedule

    def spy():
        out = original()
        budgets.append(out.total_num_scheduled_tokens)
        return out

    sched.schedule = spy
    _, ours = lmserve_greedy(llm, prompts)
    assert ours == hf_greedy(model_dir, prompts)
    assert max(budgets) <= 24
    assert len(budgets) > max(PROMPT_LENS) // 24  # the 300-token prompt needed many chunks


@pytest.mark.parametrize("arch", ARCHS)
def test_second_pass_hits_prefix_cache_and_matches_hf(tiny_model_dir, arch):
    model_dir = tiny_model_dir(arch)
    prompts = make_prompts()
    llm = make_llm(model_dir, enable_prefix_caching=True)
    first, ours_first = lmserve_greedy(llm, prompts)
    second, ours_second = lmserve_greedy(llm, prompts)
    expected = hf_greedy(model_dir, prompts)
    assert ours_first == expected
    assert ours_second == expected
    assert sum(o.num_cached_tokens for o in second) > 0
    # Every prompt with at least one full block beyond its last token hits in whole blocks.
    for out, n in zip(second, PROMPT_LENS):
        assert out.num_cached_tokens == (n - 1) // 16 * 16


@pytest.mark.parametrize("arch", ARCHS)
def test_preemption_under_tiny_kv_pool_matches_hf(tiny_model_dir, arch):
    model_dir = tiny_model_dir(arch)
    prompts = make_prompts()
    # 24 blocks x 16 = 384 token slots for ~1,100 prompt tokens: preemption is unavoidable.
    llm = make_llm(
        model_dir, num_gpu_blocks_override=24, max_model_len=384, enable_prefix_caching=False
    )
    _, ours = lmserve_greedy(llm, prompts)
    assert ours == hf_greedy(model_dir, prompts)
    sched = scheduler_of(llm)
    assert sched.num_preemptions > 0
    kv = sched.kv_cache_manager
    assert kv.num_free_blocks == kv.num_gpu_blocks  # nothing leaked


def test_preemption_with_prefix_caching_matches_hf(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()
    llm = make_llm(
        model_dir, num_gpu_blocks_override=24, max_model_len=384, max_num_batched_tokens=64
    )
    _, ours = lmserve_greedy(llm, prompts)
    assert ours == hf_greedy(model_dir, prompts)
    assert scheduler_of(llm).num_preemptions > 0


def test_text_prompts_match_hf_through_the_tokenizer(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    llm = make_llm(model_dir)
    texts = ["The small engine hums", "A farmer walks to the market with a basket of apples"]
    tokenizer = llm.get_tokenizer()
    ids = [tokenizer.encode(t) for t in texts]
    outs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == ids
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(model_dir, ids)
    assert all(
        o.outputs[0].text == tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True)
        for o in outs
    )
