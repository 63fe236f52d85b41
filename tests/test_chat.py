"""LLM.chat: the tokenizer's chat template, one or many conversations, validated messages."""

from __future__ import annotations

import pytest

from lmserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), dtype="float32", device="cpu", max_model_len=256)


GREEDY = SamplingParams(temperature=0, max_tokens=5)


def test_chat_renders_the_template_with_a_generation_prompt(llm):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Count the boats"},
    ]
    out = llm.chat(messages, GREEDY, use_tqdm=False)
    assert len(out) == 1
    assert out[0].prompt == "<|system|>Be brief.</s><|user|>Count the boats</s><|assistant|>"
    direct = llm.generate({"prompt_token_ids": out[0].prompt_token_ids}, GREEDY, use_tqdm=False)
    assert out[0].outputs[0].token_ids == direct[0].outputs[0].token_ids


def test_chat_takes_a_list_of_conversations(llm):
    convs = [[{"role": "user", "content": "one"}], [{"role": "user", "content": "two"}]]
    outs = llm.chat(convs, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == [
        "<|user|>one</s><|assistant|>",
        "<|user|>two</s><|assistant|>",
    ]


def test_text_parts_are_joined(llm):
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    out = llm.chat([{"role": "user", "content": parts}], GREEDY, use_tqdm=False)
    assert out[0].prompt == "<|user|>a\nb</s><|assistant|>"


def test_without_generation_prompt(llm):
    out = llm.chat(
        [{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False, add_generation_prompt=False
    )
    assert out[0].prompt == "<|user|>hi</s>"


@pytest.mark.parametrize(
    "messages, pattern",
    [
        ([], "non-empty list"),
        ([{"role": "wizard", "content": "x"}], "role='wizard' is invalid"),
        ([{"role": "user", "content": 5}], "content must be a string"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "only text content parts"),
        (["hello"], "must be a dict"),
    ],
)
def test_bad_messages_raise_clear_errors(llm, messages, pattern):
    with pytest.raises(ValueError, match=pattern):
        llm.chat(messages, GREEDY, use_tqdm=False)
