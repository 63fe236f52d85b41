"""The offline `LLM` interface: prompts, sampling basics, stop conditions, bad input."""

from __future__ import annotations

import pytest

from lmserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), dtype="float32", device="cpu", max_model_len=512)


def engine_is_idle(llm: LLM) -> bool:
    return not llm.llm_engine.has_unfinished_requests()


def test_skip_tokenizer_init_generates_from_token_ids(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), device="cpu", skip_tokenizer_init=True)
    out = llm.generate(
        {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4), use_tqdm=False
    )
    assert len(out[0].outputs[0].token_ids) == 4
    assert out[0].outputs[0].text == ""
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        llm.generate("hello", use_tqdm=False)


def test_same_seed_gives_same_sample_whatever_else_is_in_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": [10, 11, 12]}, seeded, use_tqdm=False)
    others = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    crowd = llm.generate(
        [
            {"prompt_token_ids": [40] * 30},
            {"prompt_token_ids": [10, 11, 12]},
            {"prompt_token_ids": [7, 8]},
        ],
        [others, seeded, others],
        use_tqdm=False,
    )
    assert crowd[1].outputs[0].token_ids == alone[0].outputs[0].token_ids


def test_unseeded_temperature_sampling_differs_from_greedy(llm):
    prompt = {"prompt_token_ids": list(range(20, 40))}
    greedy = (
        llm.generate(
            prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False
        )[0]
        .outputs[0]
        .token_ids
    )
    hot = [
        llm.generate(
            prompt, SamplingParams(temperature=5.0, max_tokens=16, ignore_eos=True), use_tqdm=False
        )[0]
        .outputs[0]
        .token_ids
        for _ in range(3)
    ]
    assert any(h != greedy for h in hot)


def test_outputs_come_back_in_prompt_order(llm):
    prompts = [{"prompt_token_ids": [i + 4] * (40 - 3 * i)} for i in range(10)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=3), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [p["prompt_token_ids"] for p in prompts]


def test_max_tokens_ends_with_length(llm):
    out = llm.generate(
        "The small engine", SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    assert len(out.token_ids) == 5
    assert out.finish_reason == "length"


def test_stop_token_id_ends_with_stop_and_reports_it(llm):
    prompt = {"prompt_token_ids": [10, 11, 12]}
    free = (
        llm.generate(
            prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
        )[0]
        .outputs[0]
        .token_ids
    )
    stop_id = free[3]
    out = llm.generate(
        prompt,
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids=[stop_id]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.token_ids == free[: free.index(stop_id) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)


def test_stop_string_truncates_text_and_stops_the_request(llm):
    prompt = "A farmer walks"
    full = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    stop = full.text[3:6]
    assert stop.strip(), "the tiny model produced whitespace only; pick another slice"
    out = llm.generate(
        prompt,
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.text == full.text[: full.text.index(stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert len(out.token_ids) < 20
    assert engine_is_idle(llm)


def test_n_samples_come_back_together(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": [9, 9, 9]}, params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


@pytest.mark.parametrize(
    "prompt, pattern",
    [
        ({"prompt_token_ids": []}, "empty"),
        ({"prompt_token_ids": [1, 99999]}, r"99999 is out of range \[0, 512\)"),
        ({"prompt_token_ids": [1, -1]}, "out of range"),
        ({"prompt_token_ids": [1, True, 2]}, r"token id True is out of range"),
        ({"prompt_token_ids": [1, 2.0]}, r"token id 2.0 is out of range"),
        ({"prompt_token_ids": "1 2 3"}, "list of ints"),
        ({"prompt_token_ids": [1] * 600}, "600 tokens, more than max_model_len=512"),
        (42, "a prompt must be"),
    ],
)
def test_bad_prompt_raises_and_queues_nothing(llm, prompt, pattern):
    good = {"prompt_token_ids": [1, 2, 3]}
    with pytest.raises(ValueError, match=pattern):
        llm.generate([good, prompt], use_tqdm=False)
    assert engine_is_idle(llm)  # the good prompt was not queued either


def test_sampling_params_list_must_match_prompts(llm):
    with pytest.raises(ValueError, match="2 entries but there are 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()], use_tqdm=False)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"temperature": -1}, r"temperature=-1 .*>= 0"),
        ({"top_p": 0}, r"top_p=0 .*\(0, 1\]"),
        ({"top_k": 0}, r"top_k=0"),
        ({"max_tokens": 0}, r"max_tokens=0"),
        ({"n": 0}, r"n=0"),
        ({"logprobs": 21}, r"logprobs=21 .*\[0, 20\]"),
        ({"stop": [""]}, r"stop=''"),
        ({"min_tokens": 5, "max_tokens": 2}, r"min_tokens=5 must be <= max_tokens=2"),
        ({"seed": 2**64}, r"seed=18446744073709551616 is invalid"),
        ({"seed": 1.5}, r"seed=1.5 is invalid: must be an integer"),
    ],
)
def test_sampling_params_validate_at_construction(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SamplingParams(**kwargs)


def test_progress_bar_is_shown_when_asked(llm, capsys):
    llm.generate(["hello", "world"], SamplingParams(max_tokens=2), use_tqdm=True)
    assert "Processed prompts" in capsys.readouterr().err


def test_dummy_weights_need_no_checkpoint(tiny_model_dir):
    llm = LLM(tiny_model_dir("qwen3"), load_format="dummy", device="cpu", dtype="bfloat16")
    out = llm.generate(
        {"prompt_token_ids": [3, 4, 5]},
        SamplingParams(max_tokens=3, ignore_eos=True),
        use_tqdm=False,
    )
    assert len(out[0].outputs[0].token_ids) == 3


def test_n_samples_share_the_prompt_blocks(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), device="cpu", max_model_len=512, block_size=16)
    engine = llm.llm_engine
    params = SamplingParams(n=4, temperature=1.0, max_tokens=4, ignore_eos=True)
    engine.add_request("r", {"prompt_token_ids": list(range(10, 50))}, params)  # 40 tokens
    engine.step()  # one step admits and prefills all four samples
    kv = engine.engine_core.engine_core.scheduler.kv_cache_manager
    tables = [kv.get_block_ids(f"r#{i}") for i in range(4)]
    # 2 full prompt blocks shared by all four, plus one partial block each: 6, not 12.
    assert kv.num_gpu_blocks - kv.num_free_blocks == 6
    assert all(t[:2] == tables[0][:2] for t in tables)
    assert len({t[2] for t in tables}) == 4
    while engine.has_unfinished_requests():
        engine.step()
    assert kv.num_free_blocks == kv.num_gpu_blocks
