"""Benchmark datasets: lengths are exact TOKEN counts, shared prefixes are really shared."""

from __future__ import annotations

import json

import pytest

from lmserve.bench.datasets import (
    candidate_token_ids,
    encode,
    multi_round_qa_sessions,
    prefix_repetition_requests,
    random_requests,
    random_text,
    sharegpt_requests,
)


@pytest.fixture(scope="module")
def tokenizer():
    from tests.tiny_models import make_tiny_tokenizer

    return make_tiny_tokenizer()  # byte-level BPE, 512 ids


@pytest.fixture(scope="module")
def default_model_tokenizer(default_model):
    """The default model's real 49k-id BPE tokenizer (skipped when it is not installed)."""
    from transformers import AutoTokenizer

    from lmserve.model.loader import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(default_model))


@pytest.mark.parametrize("input_len", [1, 2, 7, 64, 300])
def test_random_prompts_encode_to_exactly_the_requested_length(tokenizer, input_len):
    requests = random_requests(tokenizer, 20, input_len, output_len=5, seed=3)
    assert [len(encode(tokenizer, r.prompt)) for r in requests] == [input_len] * 20
    assert all(r.prompt_len == input_len and r.expected_output_len == 5 for r in requests)
    if input_len >= 7:
        assert len({r.prompt for r in requests}) == 20  # all different


def test_random_prompts_are_exact_for_a_real_bpe_vocabulary(default_model_tokenizer):
    requests = random_requests(default_model_tokenizer, 10, 128, output_len=4, seed=0)
    assert {len(encode(default_model_tokenizer, r.prompt)) for r in requests} == {128}


def test_random_range_ratio_spreads_lengths_and_keeps_them_exact(tokenizer):
    requests = random_requests(tokenizer, 200, 40, output_len=10, range_ratio=0.5, seed=1)
    input_lens = [r.prompt_len for r in requests]
    output_lens = [r.expected_output_len for r in requests]
    assert min(input_lens) >= 20 and max(input_lens) <= 60 and len(set(input_lens)) > 10
    assert min(output_lens) >= 5 and max(output_lens) <= 15 and len(set(output_lens)) > 5
    assert all(len(encode(tokenizer, r.prompt)) == r.prompt_len for r in requests)


def test_random_output_lengths_take_their_own_range_ratio(tokenizer):
    # The issue-23 serving mix: prompts 128-2,047 tokens, outputs 64-511.
    requests = random_requests(
        tokenizer, 300, 1088, 288, range_ratio=0.88235, seed=2, output_range_ratio=0.7777
    )
    input_lens = [r.prompt_len for r in requests]
    output_lens = [r.expected_output_len for r in requests]
    assert 128 <= min(input_lens) and max(input_lens) <= 2047
    assert 64 <= min(output_lens) < 100 and 480 < max(output_lens) <= 511


def test_random_requests_are_deterministic_for_a_seed(tokenizer):
    a = random_requests(tokenizer, 5, 16, 4, seed=7)
    b = random_requests(tokenizer, 5, 16, 4, seed=7)
    c = random_requests(tokenizer, 5, 16, 4, seed=8)
    assert a == b and a != c


def test_random_text_pool_leaves_out_special_and_lone_byte_tokens(tokenizer):
    pool = set(candidate_token_ids(tokenizer).tolist())
    assert not pool & set(tokenizer.all_special_ids)
    assert all(encode(tokenizer, tokenizer.decode([i])) == [i] for i in pool)


def test_prefix_repetition_prompts_share_their_prefix_tokens(tokenizer):
    requests = prefix_repetition_requests(
        tokenizer, 22, prefix_len=30, suffix_len=10, num_prefixes=4, output_len=6, seed=2
    )
    assert len(requests) == 22
    ids = [encode(tokenizer, r.prompt) for r in requests]
    assert {len(i) for i in ids} == {40}
    assert all(r.prompt_len == 40 and r.expected_output_len == 6 for r in requests)
    groups: dict[tuple[int, ...], int] = {}
    for i in ids:
        groups[tuple(i[:30])] = groups.get(tuple(i[:30]), 0) + 1
    assert sorted(groups.values()) == [5, 5, 6, 6]  # 22 over 4 prefixes
    assert len({tuple(i[30:]) for i in ids}) == 22  # every suffix its own
    # shuffled: the first prefix's prompts are not all at the front
    first = tuple(ids[0][:30])
    assert [tuple(i[:30]) == first for i in ids] != sorted(
        (tuple(i[:30]) == first for i in ids), reverse=True
    )


def test_random_text_with_a_prefix_keeps_the_prefix_ids(tokenizer):
    import numpy as np

    rng = np.random.default_rng(0)
    _, prefix = random_text(tokenizer, rng, 12)
    for _ in range(20):
        text, ids = random_text(tokenizer, rng, 17, prefix_ids=prefix)
        assert encode(tokenizer, text) == ids and ids[:12] == prefix and len(ids) == 17


def _write_sharegpt(path, tokenizer):
    data = [
        {  # first human turn, then the first gpt turn after it
            "id": "a",
            "conversations": [
                {"from": "system", "value": "be brief and kind to everyone"},
                {"from": "human", "value": "The small engine hums along the valley road"},
                {"from": "gpt", "value": "A farmer walks to the market with a basket"},
                {"from": "human", "value": "ignored second question of the dialogue"},
            ],
        },
        {
            "id": "short",
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello there friend"},
            ],
        },
        {
            "id": "no-answer",
            "conversations": [{"from": "human", "value": "Where is the library of maps"}],
        },
        {
            "id": "b",
            "conversations": [
                {"from": "gpt", "value": "a gpt turn before any human turn is skipped"},
                {"from": "human", "value": "How far is the city from the river"},
                {
                    "from": "gpt",
                    "value": "Nobody knows exactly, but the road is long and the night is cold.",
                },
            ],
        },
        "not even a dict",
    ]
    path.write_text(json.dumps(data))
    return data


def test_sharegpt_takes_first_human_turn_and_first_gpt_turns_token_count(tokenizer, tmp_path):
    path = tmp_path / "sharegpt.json"
    _write_sharegpt(path, tokenizer)
    requests = sharegpt_requests(tokenizer, str(path), num_requests=2, seed=0)
    by_prompt = {r.prompt: r for r in requests}
    assert set(by_prompt) == {
        "The small engine hums along the valley road",
        "How far is the city from the river",
    }
    a = by_prompt["The small engine hums along the valley road"]
    assert a.prompt_len == len(encode(tokenizer, a.prompt))
    assert a.expected_output_len == len(
        encode(tokenizer, "A farmer walks to the market with a basket")
    )
    b = by_prompt["How far is the city from the river"]
    answer = "Nobody knows exactly, but the road is long and the night is cold."
    assert b.expected_output_len == len(encode(tokenizer, answer))


def test_sharegpt_output_len_override_and_oversampling(tokenizer, tmp_path):
    path = tmp_path / "sharegpt.json"
    _write_sharegpt(path, tokenizer)
    requests = sharegpt_requests(tokenizer, str(path), num_requests=5, output_len=7, seed=0)
    assert len(requests) == 5  # 2 usable pairs, repeated
    assert {r.expected_output_len for r in requests} == {7}
    assert len({r.prompt for r in requests}) == 2


def test_sharegpt_bad_files_raise_value_error(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="not a file"):
        sharegpt_requests(tokenizer, str(tmp_path / "missing.json"), 1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        sharegpt_requests(tokenizer, str(bad), 1)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="no usable"):
        sharegpt_requests(tokenizer, str(empty), 1)


def test_multi_round_qa_sessions_share_the_system_prompt_and_grow_the_history(tokenizer):
    sessions = multi_round_qa_sessions(
        tokenizer, num_users=3, num_rounds=4, system_prompt_len=50, question_len=12, answer_len=9
    )
    assert len(sessions) == 3 and {s.num_rounds for s in sessions} == {4}
    assert len({s.system_prompt for s in sessions}) == 1
    assert len(encode(tokenizer, sessions[0].system_prompt)) == 50
    assert all(len(encode(tokenizer, q)) == 12 for s in sessions for q in s.questions)
    assert all(s.question_lens == [12] * 4 and s.answer_len == 9 for s in sessions)
    assert len({q for s in sessions for q in s.questions}) == 12

    s = sessions[1]
    answers = ["first answer", "second answer"]
    messages = s.messages(2, answers)
    assert [m["role"] for m in messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert messages[0]["content"] == s.system_prompt
    assert [m["content"] for m in messages[1::2][:3]] == [
        s.questions[0],
        s.questions[1],
        s.questions[2],
    ]
    assert [messages[2]["content"], messages[4]["content"]] == answers
    assert s.messages(1, answers) == messages[:4]  # each round extends the last
    assert s.prompt_text(2, answers) == "\n".join(m["content"] for m in messages)


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_requests=0), dict(input_len=0), dict(output_len=0), dict(range_ratio=1.0)],
)
def test_bad_random_arguments_raise_value_error(tokenizer, kwargs):
    args = dict(num_requests=2, input_len=8, output_len=4, range_ratio=0.0) | kwargs
    with pytest.raises(ValueError):
        random_requests(tokenizer, **args)


def test_multi_round_qa_user_history_is_per_user_and_follows_the_shared_system_prompt(tokenizer):
    sessions = multi_round_qa_sessions(
        tokenizer, num_users=2, num_rounds=2, system_prompt_len=20, question_len=5,
        answer_len=4, user_history_len=40,
    )  # fmt: skip
    assert all(len(encode(tokenizer, s.history)) == 40 for s in sessions)
    assert sessions[0].history != sessions[1].history
    for s in sessions:
        system = s.messages(1, ["an answer"])[0]["content"]
        assert system == f"{s.system_prompt}\n{s.history}"
        assert s.prompt_text(0, []).startswith(system)
    plain = multi_round_qa_sessions(tokenizer, 1, 1, 20, 5, 4)
    assert (
        plain[0].history == "" and plain[0].messages(0, [])[0]["content"] == plain[0].system_prompt
    )
    with pytest.raises(ValueError, match="user_history_len"):
        multi_round_qa_sessions(tokenizer, 1, 1, 20, 5, 4, user_history_len=-1)
