"""Structured outputs through `LLM` on tiny random models (float32, CPU): every output of a
constrained request parses and validates (JSON Schemas with jsonschema, regexes with `re`,
choices and grammars exactly), greedy and sampled; with speculative decoding (n-gram and a
draft model) outputs stay valid and greedy ones equal those without speculation; async
scheduling and preemption keep them valid; unconstrained requests in the same batch are
unchanged; bad constraints are ValueErrors naming the field; a slow grammar times out alone.
The tests marked by a `backend` parameter run on both backends (xgrammar, the default, and
guidance); the others on xgrammar (the manager's paths they test do not depend on it).

A random model has no reason to write JSON: everything it emits here comes from the masks,
so these tests prove the mask path (compile, bitmask per step, sampler, matcher advance),
not that a model follows instructions (tests/structured_output/test_default_model.py does).

The random model is kept to ASCII tokens (a logit_bias of -100 on the others): xgrammar 0.2.9
accepts invalid UTF-8 byte sequences inside strings, which a random byte-level model emits
now and then (decoded as U+FFFD, they can break a maxLength); a trained model does not."""

from __future__ import annotations

import functools
import json
import re

import jsonschema
import pytest

from lmserve import LLM, SamplingParams
from lmserve.sampling_params import StructuredOutputsParams
from tests.structured_output.schemas import SCHEMAS

MAX_TOKENS = 320  # free whitespace makes a random model's JSON long
PROMPTS = ["The small engine", "A farmer walks to the market", "Numbers like 12", "Rain"]
REGEXES = [r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)", r"\d{3}-\d{4}", r"(yes|no)( indeed)?"]
CHOICES = ["red", "green", "a much longer choice"]
GRAMMAR = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
LARK_GRAMMAR = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9][0-9]?/'  # the same, in Lark (guidance)
BACKENDS = ["xgrammar", "guidance"]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}  # fmt: skip


def make_llm(model_dir: str, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 512)
    return LLM(model_dir, dtype="float32", device="cpu", **kwargs)


@pytest.fixture(scope="module")
def llms(tiny_model_dir):
    """llms(backend) -> the tiny model's LLM with that structured-outputs backend (built once)."""
    built: dict[str, LLM] = {}

    def get(backend: str) -> LLM:
        if backend not in built:
            built[backend] = make_llm(tiny_model_dir("llama"), structured_outputs_backend=backend)
        return built[backend]

    return get


@pytest.fixture(scope="module")
def llm(llms):
    return llms("xgrammar")


@functools.cache
def ascii_only_bias(vocab_size: int = 512) -> dict[int, float]:
    from tests.tiny_models import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer(vocab_size)
    return {
        t: -100.0
        for t in range(vocab_size)
        if not tokenizer.decode([t]).isascii() or "\ufffd" in tokenizer.decode([t])
    }


def json_params(schema: dict, temperature: float, seed: int = 0, **kw) -> SamplingParams:
    return SamplingParams(
        temperature=temperature,
        seed=seed,
        max_tokens=MAX_TOKENS,
        logit_bias=ascii_only_bias(),
        structured_outputs=StructuredOutputsParams(json=schema, **kw),
    )


def run_schemas(llm: LLM, temperature: float, **kw) -> list:
    names = list(SCHEMAS)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    params = [json_params(SCHEMAS[n], temperature, seed=i, **kw) for i, n in enumerate(names)]
    return llm.generate(prompts, params, use_tqdm=False)


def assert_valid_json(outputs) -> None:
    for name, out in zip(SCHEMAS, outputs):
        sample = out.outputs[0]
        assert sample.finish_reason == "stop", (name, sample.text)
        jsonschema.validate(json.loads(sample.text), SCHEMAS[name])


def test_at_least_twenty_schemas():
    assert len(SCHEMAS) >= 20
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_validate(llms, backend, temperature):
    llm = llms(backend)
    assert llm.llm_engine.config.model_config.structured_outputs_backend == backend
    assert_valid_json(run_schemas(llm, temperature))


def test_compact_json_without_whitespace(llm):
    outputs = run_schemas(llm, 1.0, disable_any_whitespace=True)
    assert_valid_json(outputs)
    for out in outputs:  # strings hold no raw controls, so these can only be free whitespace
        assert not re.search(r"[\r\n\t]", out.outputs[0].text), out.outputs[0].text


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_regex_choice_grammar_and_json_object(llms, backend, temperature):
    """The EBNF grammar on both backends (guidance translates it to Lark); a Lark grammar
    too on guidance."""
    llm = llms(backend)
    constraints = [StructuredOutputsParams(regex=r) for r in REGEXES] + [
        StructuredOutputsParams(choice=CHOICES),
        StructuredOutputsParams(grammar=GRAMMAR),
        StructuredOutputsParams(json_object=True),
    ]
    if backend == "guidance":
        constraints.append(StructuredOutputsParams(grammar=LARK_GRAMMAR))
    params = [
        SamplingParams(temperature=temperature, seed=i, max_tokens=64, structured_outputs=c)
        for i, c in enumerate(constraints)
    ]
    outs = llm.generate([PROMPTS[i % 4] for i in range(len(params))], params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    for regex, text in zip(REGEXES, texts):
        assert re.fullmatch(regex, text), (regex, text)
    assert texts[3] in CHOICES
    for text in [texts[4], *texts[6:]]:
        assert re.fullmatch(r"\(([1-9]\d?)(\+[1-9]\d?)*\)", text), text
    # any object: a random model may keep adding keys until max_tokens; a finished one parses
    assert texts[5].startswith("{")
    if outs[5].outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(texts[5]), dict)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_padded_past_the_tokenizer(tmp_path, backend):
    """A model whose logits are wider than its tokenizer's vocabulary (600 vs 512 ids, as a
    padded lm_head): masks cover the tokenizer's ids only, the padding is never emitted, and
    outputs stay valid."""
    from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

    path = make_tiny_model(tmp_path, "llama", vocab_size=600)
    make_tiny_tokenizer(512).save_pretrained(path)
    llm = make_llm(path, structured_outputs_backend=backend)
    outputs = run_schemas(llm, 1.0)
    assert_valid_json(outputs)
    assert max(t for out in outputs for t in out.outputs[0].token_ids) < 512
    llm.shutdown()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_choice_is_reachable_by_sampling(llms, backend):
    llm = llms(backend)
    params = [
        SamplingParams(
            temperature=1.5,
            seed=s,
            max_tokens=16,
            structured_outputs=StructuredOutputsParams(choice=["A", "B", "C"]),
        )  # fmt: skip
        for s in range(24)
    ]
    texts = {o.outputs[0].text for o in llm.generate(["x"] * 24, params, use_tqdm=False)}
    assert texts == {"A", "B", "C"}


def test_unconstrained_requests_in_the_batch_are_unchanged(llm):
    plain = SamplingParams(temperature=0.0, max_tokens=24)
    alone = llm.generate(PROMPTS, plain, use_tqdm=False)
    mixed_params = [plain, json_params(SCHEMAS["nested_object"], 0.0)] * 2
    mixed = llm.generate(PROMPTS, mixed_params, use_tqdm=False)
    for i in (0, 2):
        assert mixed[i].outputs[0].token_ids == alone[i].outputs[0].token_ids


def test_same_seed_gives_same_constrained_output(llm):
    params = json_params(SCHEMAS["array_of_objects"], 1.0, seed=7)
    a = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].text
    b = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].text
    assert a == b


def test_n_samples_each_follow_the_grammar(llm):
    params = SamplingParams(
        n=4, temperature=1.0, seed=3, max_tokens=MAX_TOKENS,
        structured_outputs=StructuredOutputsParams(json=SCHEMAS["ref_defs"]),
    )  # fmt: skip
    out = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0]
    assert len(out.outputs) == 4
    for sample in out.outputs:
        jsonschema.validate(json.loads(sample.text), SCHEMAS["ref_defs"])


def test_grammar_cache_compiles_each_text_once(llm):
    manager = llm.llm_engine.engine_core.engine_core.scheduler.structured_output
    before = len(manager.compile_seconds)
    schema = {"type": "object", "properties": {"only_here": {"type": "boolean"}}, "required": ["only_here"]}  # fmt: skip
    llm.generate(PROMPTS, json_params(schema, 1.0), use_tqdm=False)
    llm.generate(PROMPTS, json_params(dict(schema), 0.0), use_tqdm=False)
    assert len(manager.compile_seconds) == before + 1


# ---- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "constraint, match",
    [
        ({"json": {"type": "objekt"}}, r"structured_outputs\.json is not a supported JSON Schema"),
        ({"json": {"type": "integer", "minimum": "x"}}, r"structured_outputs\.json"),
        ({"json": {"not": {"type": "string"}}}, r"keyword 'not'"),
        ({"json": {"$ref": "#/$defs/missing"}}, r"structured_outputs\.json"),
        ({"json": "{not json"}, r"structured_outputs\.json is not valid JSON"),
        ({"regex": "a(("}, r"structured_outputs\.regex is not a valid regular expression"),
        ({"choice": []}, r"structured_outputs\.choice=\[\] is invalid"),
        ({"grammar": "root ::= undefined_rule"}, r"structured_outputs\.grammar is not a valid"),
        ({"regex": "a", "choice": ["b"]}, r"exactly one of"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_constraints_are_value_errors_naming_the_field(llms, backend, constraint, match):
    llm = llms(backend)
    with pytest.raises(ValueError, match=match):
        params = SamplingParams(
            max_tokens=8, structured_outputs=StructuredOutputsParams(**constraint)
        )
        llm.generate(PROMPTS[:1], params, use_tqdm=False)
    # the engine keeps serving
    assert llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4), use_tqdm=False)[0].outputs


def test_compile_timeout_fails_only_that_request(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LMSERVE_GRAMMAR_COMPILE_TIMEOUT_S", "0.2")
    llm = make_llm(tiny_model_dir("llama"))
    manager = llm.llm_engine.engine_core.engine_core.scheduler.structured_output
    slow_compile = manager._compile

    def compile_slowly(params):
        if params.regex == "slow":
            import time

            time.sleep(1.0)
        return slow_compile(params)

    manager._compile = compile_slowly
    params = [
        SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(regex="slow")),
        SamplingParams(temperature=0.0, max_tokens=8),
        SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(regex="[ab]+")),
    ]
    outs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error"
    assert "did not compile within 0.2 s" in outs[0].outputs[0].stop_reason
    assert len(outs[1].outputs[0].token_ids) == 8
    assert re.fullmatch("[ab]+", outs[2].outputs[0].text)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    assert not scheduler.compiling and scheduler.num_constrained == 0


# ---- async scheduling, preemption, speculative decoding ------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_async_scheduling_keeps_outputs_valid_and_greedy_identical(tiny_model_dir, llms, backend):
    llm = llms(backend)
    async_llm = make_llm(
        tiny_model_dir("llama"), async_scheduling=True, structured_outputs_backend=backend
    )
    assert async_llm.llm_engine.config.scheduler_config.async_scheduling
    plain = SamplingParams(temperature=0.0, max_tokens=24)
    params = [json_params(s, 0.0) for s in SCHEMAS.values()] + [plain] * 3
    prompts = [PROMPTS[i % 4] for i in range(len(params))]
    got = async_llm.generate(prompts, params, use_tqdm=False)
    want = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert_valid_json(got[: len(SCHEMAS)])
    assert_valid_json(run_schemas(async_llm, 1.0))


def test_async_scheduling_decodes_constrained_requests_every_step(tiny_model_dir, llm):
    """Counted at the scheduler: with async scheduling, a constrained request is scheduled in
    every step from its prompt to its end (one token per step; at most one more step, sampled
    ahead of its stop), its masks made after the step in flight was collected (pending steps);
    greedy outputs equal those of sync scheduling."""
    async_llm = make_llm(tiny_model_dir("llama"), async_scheduling=True)
    scheduler = async_llm.llm_engine.engine_core.engine_core.scheduler
    steps = []
    schedule = scheduler.schedule

    def recording_schedule():
        out = schedule()
        if not out.is_empty:
            steps.append(out)
        return out

    scheduler.schedule = recording_schedule
    names = ["nested_object", "flat_required", "array_of_objects"]
    params = [json_params(SCHEMAS[n], 0.0) for n in names]
    params.append(SamplingParams(temperature=0.0, max_tokens=24))
    prompts = [PROMPTS[i % 4] for i in range(len(params))]
    got = async_llm.generate(prompts, params, use_tqdm=False)
    want = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert any(out.pending_structured_output_tokens for out in steps)
    lengths = []
    for out in got[: len(names)]:
        scheduled_in = [i for i, s in enumerate(steps) if out.request_id in s.num_scheduled_tokens]
        assert scheduled_in == list(range(scheduled_in[0], scheduled_in[0] + len(scheduled_in)))
        lengths.append(len(out.outputs[0].token_ids))
        assert lengths[-1] <= len(scheduled_in) <= lengths[-1] + 1
    assert max(lengths) >= 8  # long enough that skipping every other step would show
    assert scheduler.num_constrained == 0 and not scheduler.requests


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption_keeps_outputs_valid_and_greedy_identical(tiny_model_dir, llm, async_scheduling):
    """Async too: a request preempted with a token in flight (its masks pending) drops that
    token unseen and recomputes; its grammar never saw it."""
    small = make_llm(
        tiny_model_dir("llama"), max_model_len=384, num_gpu_blocks_override=24,
        max_num_batched_tokens=64, async_scheduling=async_scheduling,
    )  # fmt: skip
    got = run_schemas(small, 0.0)
    assert small.llm_engine.engine_core.engine_core.scheduler.num_preemptions > 0
    assert_valid_json(got)
    want = run_schemas(llm, 0.0)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


@pytest.mark.parametrize(
    "method, backend", [("ngram", "xgrammar"), ("draft_model", "xgrammar"), ("ngram", "guidance")]
)
def test_speculative_decoding_keeps_outputs_valid_and_greedy_identical(
    tiny_model_dir, llms, method, backend
):
    llm = llms(backend)
    model_dir = tiny_model_dir("llama")
    spec = NGRAM if method == "ngram" else {
        "method": "draft_model", "model": tiny_model_dir("llama", seed=1), "num_speculative_tokens": 3,
    }  # fmt: skip
    spec_llm = make_llm(model_dir, speculative_config=spec, structured_outputs_backend=backend)
    got = run_schemas(spec_llm, 0.0)
    want = run_schemas(llm, 0.0)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert_valid_json(got)
    assert_valid_json(run_schemas(spec_llm, 1.0))
    assert spec_llm.llm_engine.engine_core.engine_core.scheduler.num_constrained == 0


def test_draft_model_equal_to_target_accepts_grammar_valid_drafts(tiny_model_dir, llm):
    """A draft identical to the target proposes exactly what the masked target would pick
    when it happens to be allowed; the rest are cut by the grammar before verification, so
    greedy output still equals the non-speculative one token for token."""
    model_dir = tiny_model_dir("llama")
    spec = {"method": "draft_model", "model": model_dir, "num_speculative_tokens": 4}
    spec_llm = make_llm(model_dir, speculative_config=spec)
    got = run_schemas(spec_llm, 0.0)
    want = run_schemas(llm, 0.0)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
