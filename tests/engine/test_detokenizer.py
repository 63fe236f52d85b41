"""Incremental detokenization: correct across multi-byte characters and merges, stop strings
found across token boundaries, and never a partial stop string in a streamed delta."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lmserve import LLM, SamplingParams
from lmserve.engine.detokenizer import IncrementalDetokenizer
from lmserve.sampling_params import RequestOutputKind


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def stream(tokenizer, ids, prompt=(1,), **params):
    """Feed ids one at a time; returns (deltas, final detokenizer, stop string or None)."""
    detok = IncrementalDetokenizer(tokenizer, list(prompt), SamplingParams(**params))
    deltas, stop = [], None
    for token_id in ids:
        stop = detok.update([token_id])
        deltas.append(detok.get_delta(finished=stop is not None))
        if stop is not None:
            break
    else:
        deltas.append(detok.get_delta(finished=True))
    return deltas, detok, stop


def test_multibyte_characters_split_across_tokens_decode_whole(tokenizer):
    text = "Héllo wörld, naïve café — 東京"
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, detok, _ = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert any(d == "" for d in deltas[:-1])  # some token ended mid-character


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(tokenizer):
    ids = tokenizer.encode("the small engine hums along", add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert "all eng" not in pieces  # the stop string really spans several tokens
    deltas, detok, stop = stream(tokenizer, ids, stop=["all eng"])
    assert stop == "all eng"
    assert detok.output_text == "the sm"
    assert "".join(deltas) == "the sm"
    assert not any("a" in d for d in deltas)  # not even the stop string's first letter leaked


def test_include_stop_str_in_output_keeps_it(tokenizer):
    ids = tokenizer.encode("the small engine hums along", add_special_tokens=False)
    deltas, detok, _ = stream(tokenizer, ids, stop=["all eng"], include_stop_str_in_output=True)
    assert detok.output_text == "the small eng" == "".join(deltas)


def test_text_without_a_stop_is_streamed_whole(tokenizer):
    ids = tokenizer.encode("numbers like 12, 256 and 1024", add_special_tokens=False)
    deltas, detok, stop = stream(tokenizer, ids, stop=["zebra"])
    assert stop is None
    assert "".join(deltas) == detok.output_text == "numbers like 12, 256 and 1024"


@pytest.mark.parametrize("skip, expected_tail", [(True, "bread"), (False, "bread</s>")])
def test_skip_special_tokens(tokenizer, skip, expected_tail):
    ids = tokenizer.encode("bread", add_special_tokens=False) + [tokenizer.eos_token_id]
    _, detok, _ = stream(tokenizer, ids, skip_special_tokens=skip)
    assert detok.output_text == expected_tail


def test_streamed_deltas_through_the_engine_stop_before_a_split_stop_string(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), dtype="float32", device="cpu", max_model_len=256)
    tokenizer = llm.get_tokenizer()
    prompt = {"prompt_token_ids": [1, 60, 61, 62, 63]}
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    full = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0]
    # A stop string made of the end of token 3 and the start of token 4.
    pieces = [tokenizer.decode(full.token_ids[:k]) for k in range(len(full.token_ids) + 1)]
    k = next(
        k
        for k in range(2, len(pieces) - 1)
        if len(pieces[k]) - len(pieces[k - 1]) >= 2 and len(pieces[k + 1]) - len(pieces[k]) >= 2
    )
    stop = pieces[k][-2:] + pieces[k + 1][len(pieces[k]) : len(pieces[k]) + 1]
    assert stop not in pieces[k] and full.text.find(stop) >= len(pieces[k]) - 2

    engine = llm.llm_engine
    params = SamplingParams(
        temperature=0,
        max_tokens=16,
        ignore_eos=True,
        stop=[stop],
        output_kind=RequestOutputKind.DELTA,
    )
    engine.add_request("s", prompt, params)
    deltas, last = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.outputs[0].text)
            last = out
    expected = full.text[: full.text.find(stop)]
    assert "".join(deltas) == expected
    assert all(stop not in d for d in deltas)
    assert last.finished and last.outputs[0].finish_reason == "stop"
    assert last.outputs[0].stop_reason == stop
