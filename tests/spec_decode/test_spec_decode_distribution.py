"""Random-mode speculative decoding follows the target distribution exactly, end to end.

A tiny model with an 8-token vocabulary samples 3 tokens per request, many times, with
temperature, top-k and a frequency penalty. With max_tokens = 3 the second step verifies one
draft (n-gram: the prompt holds every token, so a proposal always exists; draft model: always),
so tokens 2 and 3 come from the rejection sampler — accepted draft + bonus, or recovered token.
The empirical distribution of the sequence (t1, t2, t3) is compared with the exact one computed
from the HF model's logits (8 + 64 contexts) by Pearson's chi-square test at alpha = 1e-6: the
test fails falsely once in a million runs, while a wrong acceptance rule, residual, or a penalty
that ignores the drafts shifts whole cells (see test_rejection_sampler for the unit-level tests).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lmserve import LLM, SamplingParams
from tests.spec_decode.chi_square import chi_square_p_value
from tests.tiny_models import build_tiny_hf_model

ALPHA = 1e-6
VOCAB = 8
# Every token occurs, so n-gram lookup always proposes; 17 tokens = 2 full blocks of 8 that the
# samples share through the prefix cache, so each computes one prompt token (cheap on CPU).
PROMPT = [0, 1, 2, 3, 4, 5, 6, 7, 3, 5, 1, 6, 2, 7, 4, 0, 5]
NUM_SAMPLES = {"ngram": 4000, "draft_model": 1500}  # the torch backend's q > 1 path is slow
PARAMS = dict(temperature=1.3, top_k=6, frequency_penalty=0.7)


@pytest.fixture(scope="module")
def small_vocab_models(tmp_path_factory):
    """(target dir, draft dir): tiny llamas with an 8-token vocabulary (no tokenizer)."""
    dirs = []
    for seed in (0, 1):
        path = tmp_path_factory.mktemp(f"vocab8-{seed}")
        model = build_tiny_hf_model("llama", seed=seed, vocab_size=VOCAB)
        with torch.no_grad():  # flatter logits than the parity models: every cell is likely
            model.lm_head.weight.mul_(0.25)
        model.save_pretrained(path)
        dirs.append(str(path))
    return dirs


def exact_distribution(model_dir: str) -> torch.Tensor:
    """P(t1, t2, t3) [VOCAB**3] under the target with PARAMS applied step by step: the
    frequency penalty counts earlier output tokens, then temperature, then top-k."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pairs = list(itertools.product(range(VOCAB), repeat=2))  # (t1, t2)
    inputs = torch.tensor([PROMPT + [t1, t2] for t1, t2 in pairs])  # [64, len + 2]
    with torch.no_grad():
        logits = model(inputs).logits[:, -3:].double()  # [64, 3, vocab]: after x, t1, t2

    def probs(raw: torch.Tensor, outputs: list[int]) -> torch.Tensor:
        counts = torch.bincount(torch.tensor(outputs, dtype=torch.long), minlength=VOCAB)
        scaled = (raw - PARAMS["frequency_penalty"] * counts) / PARAMS["temperature"]
        kth = scaled.topk(PARAMS["top_k"]).values[-1]
        return torch.softmax(scaled.masked_fill(scaled < kth, float("-inf")), dim=-1)

    joint = torch.zeros(VOCAB, VOCAB, VOCAB, dtype=torch.float64)
    p1 = probs(logits[0, 0], [])
    for i, (t1, t2) in enumerate(pairs):
        p2 = probs(logits[i, 1], [t1])
        p3 = probs(logits[i, 2], [t1, t2])
        joint[t1, t2] = p1[t1] * p2[t2] * p3
    return joint.flatten()


@pytest.mark.parametrize("method", ["ngram", pytest.param("draft_model", marks=pytest.mark.slow)])
def test_random_mode_follows_the_target_distribution(small_vocab_models, method):
    target_dir, draft_dir = small_vocab_models
    spec = {"method": method, "num_speculative_tokens": 2}
    spec.update(
        {"prompt_lookup_min": 1, "prompt_lookup_max": 2} if method == "ngram" else {"model": draft_dir}
    )  # fmt: skip
    llm = LLM(
        target_dir,
        dtype="float32",
        device="cpu",
        skip_tokenizer_init=True,
        block_size=8,
        max_num_seqs=1024,
        max_num_batched_tokens=16384,
        speculative_config=spec,
    )
    n = NUM_SAMPLES[method]
    params = SamplingParams(n=n, max_tokens=3, ignore_eos=True, **PARAMS)
    (out,) = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)
    samples = torch.tensor([c.token_ids for c in out.outputs])  # [n, 3]
    cells = (samples[:, 0] * VOCAB + samples[:, 1]) * VOCAB + samples[:, 2]
    observed = torch.bincount(cells, minlength=VOCAB**3)
    p_value, statistic, dof = chi_square_p_value(observed, exact_distribution(target_dir))
    assert p_value > ALPHA, (p_value, statistic, dof)
    stats = llm.get_spec_decode_stats()
    # Both paths ran many times: drafts accepted (bonus token) and rejected (recovered token).
    assert stats.num_drafts >= n * 0.9
    assert n / 40 < stats.num_accepted_tokens < stats.num_draft_tokens - n / 40, stats
