"""Logprobs and prompt logprobs equal log_softmax of HF's logits (float32), and the sampling
controls that change the distribution act through the engine."""

from __future__ import annotations

import pytest
import torch

from lmserve import LLM, SamplingParams

PROMPT = [5, 17, 42, 99, 7, 300, 12, 64, 8, 150, 33, 21, 400, 11, 77, 9, 250, 3 + 1]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(
        model_dir, dtype="float32", device="cpu", max_model_len=256, max_num_batched_tokens=8
    )  # small budget: prompt logprobs arrive in chunks


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_logprobs(hf_model, token_ids: list[int]) -> torch.Tensor:  # [len, vocab]
    with torch.no_grad():
        logits = hf_model(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_sample_logprobs_match_hf_log_softmax(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=5, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0].outputs[0]
    ref = hf_logprobs(hf_model, PROMPT + out.token_ids)
    assert len(out.logprobs) == 6
    cumulative = 0.0
    for i, (token, position) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(PROMPT) - 1 + i]  # the distribution that produced output token i
        assert position[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert position[token].rank == 1  # greedy picks the most likely token
        top = torch.topk(row, 5)
        assert set(top.indices.tolist()) <= set(position)
        for tid, lp in zip(top.indices.tolist(), top.values.tolist()):
            assert position[tid].logprob == pytest.approx(lp, abs=1e-4)
        cumulative += row[token].item()
    assert out.cumulative_logprob == pytest.approx(cumulative, abs=1e-3)


def test_prompt_logprobs_match_hf_across_chunks(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3)
    out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
    ref = hf_logprobs(hf_model, PROMPT)
    assert len(out.prompt_logprobs) == len(PROMPT)
    assert out.prompt_logprobs[0] is None
    for i in range(1, len(PROMPT)):
        position = out.prompt_logprobs[i]
        token = PROMPT[i]
        row = ref[i - 1]
        assert position[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert position[token].rank == int((row > row[token]).sum()) + 1
        assert len(position) >= 3


def test_sampled_token_rank_is_reported_for_random_sampling(llm, hf_model):
    params = SamplingParams(temperature=3.0, seed=3, max_tokens=8, logprobs=0, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0].outputs[0]
    ref = hf_logprobs(hf_model, PROMPT + out.token_ids)
    for i, (token, position) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(PROMPT) - 1 + i]
        assert list(position) == [token]  # logprobs=0: only the sampled token
        assert position[token].rank == int((row > row[token]).sum()) + 1


def test_logit_bias_forces_a_token(llm):
    params = SamplingParams(temperature=0, max_tokens=4, logit_bias={123: 100.0}, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [123] * 4


def test_min_tokens_holds_back_eos_until_reached(llm):
    eos = 2
    params = SamplingParams(temperature=0, max_tokens=10, min_tokens=5, logit_bias={eos: 100.0})
    out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 6 and out.token_ids[-1] == eos
    assert eos not in out.token_ids[:5]
    assert out.finish_reason == "stop"


def test_repetition_penalty_follows_hf_rule_on_prompt_tokens(llm, hf_model):
    with torch.no_grad():
        logits = hf_model(torch.tensor([PROMPT])).logits[0, -1].float()
    # Bias prompt token 42 to lead by 1.0, so without a penalty greedy picks it.
    bias = {42: float(logits.max() - logits[42] + 1.0)}
    free = llm.generate(
        {"prompt_token_ids": PROMPT},
        SamplingParams(temperature=0, max_tokens=1, logit_bias=bias),
        use_tqdm=False,
    )[0].outputs[0]
    assert free.token_ids == [42]
    # With the penalty, every prompt token's logit is divided (if > 0) or multiplied (if < 0).
    penalty = 50.0
    expected = logits.clone()
    expected[42] += bias[42]
    seen = torch.tensor(sorted(set(PROMPT)))
    expected[seen] = torch.where(
        expected[seen] > 0, expected[seen] / penalty, expected[seen] * penalty
    )
    penalised = llm.generate(
        {"prompt_token_ids": PROMPT},
        SamplingParams(temperature=0, max_tokens=1, logit_bias=bias, repetition_penalty=penalty),
        use_tqdm=False,
    )[0].outputs[0]
    assert penalised.token_ids == [int(expected.argmax())]
    assert penalised.token_ids != [42]


def test_out_of_vocab_logit_bias_is_rejected(llm):
    with pytest.raises(ValueError, match=r"logit_bias token id 9999 is out of range"):
        llm.generate(
            {"prompt_token_ids": [1, 2]}, SamplingParams(logit_bias={9999: 1.0}), use_tqdm=False
        )
