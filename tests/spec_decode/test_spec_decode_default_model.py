"""The default model (SmolLM2-135M-Instruct GGUF), float32 on CPU: asked to repeat a passage,
greedy output is identical with and without n-gram speculation, and most drafts are accepted
(the answer copies the prompt, which is what prompt lookup is for)."""

from __future__ import annotations

import pytest

from lmserve import LLM, SamplingParams

PASSAGE = (
    "The river town wakes slowly. Fishermen pull their boats onto the gravel, the baker lights "
    "the oven before dawn, and the school bell rings at eight."
)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}  # fmt: skip


MESSAGES = [{"role": "user", "content": f"Repeat this text exactly:\n\n{PASSAGE}"}]


def _chat(model: str, spec: dict | None):
    llm = LLM(
        model,
        device="cpu",
        dtype="float32",
        cpu_kvcache_space_gib=0.25,
        max_model_len=1024,
        speculative_config=spec,
    )
    (out,) = llm.chat(MESSAGES, SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)
    stats = llm.get_spec_decode_stats()
    llm.shutdown()
    return list(out.outputs[0].token_ids), out.outputs[0].text, stats


@pytest.fixture(scope="module")
def without_speculation(default_model):
    return _chat(default_model, None)


@pytest.mark.slow
def test_default_model_repeating_a_passage_is_identical_with_ngram_speculation(
    default_model, without_speculation
):
    tokens, text, stats = _chat(default_model, NGRAM)
    assert tokens == without_speculation[0]
    assert "river town wakes slowly" in text  # the model did repeat it
    assert stats.num_draft_tokens > 0
    assert stats.acceptance_rate > 0.5, stats  # the answer copies the passage


@pytest.mark.slow
def test_default_model_as_its_own_draft_is_identical_and_accepts_every_draft(
    default_model, without_speculation
):
    spec = {"method": "draft_model", "model": default_model, "num_speculative_tokens": 3}
    tokens, _, stats = _chat(default_model, spec)
    assert tokens == without_speculation[0]
    assert stats.num_draft_tokens > 0
    assert stats.num_accepted_tokens == stats.num_draft_tokens, stats
