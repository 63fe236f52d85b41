"""Model-level parity with HF transformers (float32, CPU): logits of a flat multi-request batch,
a prefix-then-rest forward reading the paged cache, and greedy decoding token for token."""

from __future__ import annotations

import pytest
import torch

from lmserve.model.loader import load_model
from tests.tiny_models import EOS_ID, PAD_ID, PagedKVHarness

# Logits are O(10); ours and HF's differ only by float32 rounding (~1e-6 relative): a GEMM over
# a flat batch of several requests may round differently from HF's one-request GEMM.
LOGITS_TOL = dict(rtol=1e-5, atol=1e-4)

VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied-embeddings": ("llama", dict(tie_word_embeddings=True)),
    "llama-attention-and-mlp-bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama-rope-linear": (
        "llama",
        dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    ),
    "llama-rope-llama3": (
        "llama",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,  # < our positions, so scaling matters
            }
        ),
    ),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "qwen3-attention-bias": ("qwen3", dict(attention_bias=True)),
}


@pytest.fixture(params=list(VARIANTS), scope="module")
def variant(request):
    return request.param


@pytest.fixture
def models(tiny_model_dir, variant):
    """(our model, HF model, hf_config) for one variant, both float32 on CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, overrides = VARIANTS[variant]
    path = tiny_model_dir(arch, **overrides)
    hf_config = AutoConfig.from_pretrained(path)
    ours = load_model(hf_config, path, torch.float32, torch.device("cpu"))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, hf, hf_config


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(4, 512, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def hf_logits(hf, token_ids: list[int]) -> torch.Tensor:  # [len, vocab]
    return hf(torch.tensor([token_ids])).logits[0].float()


def test_flat_batch_of_two_requests_matches_hf_logits(models):
    ours, hf, hf_config = models
    a, b = random_prompt(37, seed=1), random_prompt(11, seed=2)
    logits = PagedKVHarness(hf_config, block_size=4).step(ours, {"a": a, "b": b})
    torch.testing.assert_close(logits["a"], hf_logits(hf, a), **LOGITS_TOL)
    torch.testing.assert_close(logits["b"], hf_logits(hf, b), **LOGITS_TOL)


def test_prefix_then_rest_from_cache_matches_one_pass(models):
    ours, _, hf_config = models
    prompt = random_prompt(41, seed=3)
    one_pass = PagedKVHarness(hf_config, block_size=4).step(ours, {"a": prompt})["a"]

    harness = PagedKVHarness(hf_config, block_size=4)
    first = harness.step(ours, {"a": prompt[:13]})["a"]  # ends mid-block
    # The rest arrives next to a new request's prefill, in the same flat batch.
    second = harness.step(ours, {"new": random_prompt(6, seed=4), "a": prompt[13:]})["a"]
    torch.testing.assert_close(torch.cat([first, second]), one_pass, **LOGITS_TOL)


def test_greedy_decode_of_a_mixed_batch_matches_hf_generate(models):
    ours, hf, hf_config = models
    prompts = {"a": random_prompt(29, seed=5), "b": random_prompt(3, seed=6)}
    max_new_tokens = 10
    expected = {}
    for req_id, prompt in prompts.items():
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=PAD_ID,
            )
        expected[req_id] = out[0, len(prompt) :].tolist()

    harness = PagedKVHarness(hf_config, block_size=4)
    generated: dict[str, list[int]] = {req_id: [] for req_id in prompts}
    # Step 1: "a" prefills its first chunk alone. Then "a" finishes its prompt while "b"
    # prefills; from then on both decode one token per step in the same batch.
    scheduled = {"a": prompts["a"][:16]}
    harness.step(ours, scheduled)
    scheduled = {"a": prompts["a"][16:], "b": prompts["b"]}
    while scheduled:
        logits = harness.step(ours, scheduled)
        scheduled = {}
        for req_id, req_logits in logits.items():
            token = int(req_logits[-1].argmax())
            generated[req_id].append(token)
            if token != EOS_ID and len(generated[req_id]) < max_new_tokens:
                scheduled[req_id] = [token]
    assert generated == expected
