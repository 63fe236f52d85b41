"""The default model (SmolLM2-135M-Instruct GGUF, float32 on CPU) under structured outputs: a
trained model asked for JSON, greedy and sampled, for every test schema: all outputs parse and
validate; with n-gram speculation greedy output is identical; chat with tools_choice-style
constraints through LLM.chat. Skipped when the default model is not installed."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from lmserve import LLM, SamplingParams
from lmserve.sampling_params import StructuredOutputsParams
from tests.structured_output.schemas import SCHEMAS

pytestmark = pytest.mark.slow
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}  # fmt: skip


def make_llm(model: str, **kwargs) -> LLM:
    return LLM(model, device="cpu", dtype="float32", cpu_kvcache_space_gib=0.25, max_model_len=1024, **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def llm(default_model):
    return make_llm(default_model)


def conversations() -> list[list[dict]]:
    return [
        [
            {
                "role": "user",
                "content": f"Give me an example JSON value for this JSON Schema:\n{json.dumps(s)}",
            }
        ]  # fmt: skip
        for s in SCHEMAS.values()
    ]


def run(llm: LLM, temperature: float) -> list:
    params = [
        SamplingParams(
            temperature=temperature,
            seed=i,
            max_tokens=300,
            structured_outputs=StructuredOutputsParams(json=s),
        )  # fmt: skip
        for i, s in enumerate(SCHEMAS.values())
    ]
    return llm.chat(conversations(), params, use_tqdm=False)


def assert_valid(outputs) -> None:
    for name, out in zip(SCHEMAS, outputs):
        sample = out.outputs[0]
        assert sample.finish_reason == "stop", (name, sample.text)
        jsonschema.validate(json.loads(sample.text), SCHEMAS[name])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_default_model_json_schemas_validate(llm, temperature):
    assert_valid(run(llm, temperature))


def test_default_model_regex_and_choice(llm):
    messages = [[{"role": "user", "content": "What is the capital of France? Answer in one word."}]] * 2  # fmt: skip
    params = [
        SamplingParams(
            temperature=0,
            max_tokens=16,
            structured_outputs=StructuredOutputsParams(choice=["Paris", "London", "Berlin"]),
        ),  # fmt: skip
        SamplingParams(
            temperature=0,
            max_tokens=16,
            structured_outputs=StructuredOutputsParams(regex=r"[A-Z][a-z]{2,10}"),
        ),  # fmt: skip
    ]
    outs = llm.chat(messages, params, use_tqdm=False)
    assert outs[0].outputs[0].text == "Paris"  # the model knows; the mask keeps it to one word
    assert re.fullmatch(r"[A-Z][a-z]{2,10}", outs[1].outputs[0].text)


def test_default_model_ngram_speculation_keeps_greedy_identical(default_model):
    # The exact path. With packed weights (the CPU default for a GGUF) activations are rounded
    # to bfloat16 before each matmul, so a last-bit difference between a verify step's attention
    # (several query rows, masked) and a decode step's can flip a rounding and, at a near-tie, a
    # greedy pick: seen on this test's schemas.
    llm = make_llm(default_model, quantization="none")
    spec_llm = make_llm(default_model, speculative_config=NGRAM, quantization="none")
    got = run(spec_llm, 0.0)
    assert_valid(got)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in run(llm, 0.0)]
