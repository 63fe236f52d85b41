"""`lmserve bench serve` against a stand-in OpenAI-compatible server (tests/bench/fake_server.py):
sensible numbers, the JSON schema, the plot, multi-round history, and clear errors."""

from __future__ import annotations

import asyncio
import json
import math
import os

import jsonschema
import numpy as np
import pytest

from lmserve.bench.cli import main
from lmserve.bench.datasets import encode
from tests.bench.fake_server import FakeServer
from tests.ports import free_port

SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "../../lmserve/bench/result_schema.json")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tokenizer folder (the tiny model's byte-level BPE) for the datasets."""
    from tests.tiny_models import make_tiny_tokenizer

    path = str(tmp_path_factory.mktemp("tok"))
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def schema():
    with open(SCHEMA_PATH) as f:
        return json.load(f)


def run_bench(server_url: str, tokenizer_dir: str | None, *extra: str) -> int:
    argv = ["serve", "--base-url", server_url, "--disable-tqdm", "--seed", "1"]
    if tokenizer_dir:
        argv += ["--tokenizer", tokenizer_dir]
    return main(argv + list(extra))


def test_completions_benchmark_reports_sensible_numbers(tokenizer_dir, schema, tmp_path, capsys):
    result_path, plot_path = tmp_path / "result.json", tmp_path / "latency.png"
    with FakeServer(first_delay_s=0.05, chunk_delay_s=0.01) as server:
        rc = run_bench(
            server.base_url, tokenizer_dir,
            "--dataset-name", "random", "--input-len", "16", "--output-len", "5",
            "--num-prompts", "8", "--goodput", "ttft:10000", "tpot:10000",
            "--save-result", str(result_path), "--save-detailed", "--plot", str(plot_path),
        )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "Mean TTFT (ms):" in out
    result = json.loads(result_path.read_text())
    jsonschema.validate(result, schema)
    assert (result["completed"], result["failed"]) == (8, 0)
    assert result["total_input_tokens"] == 8 * 16
    assert result["total_output_tokens"] == 8 * 5  # the server's usage
    assert result["model_id"] == "fake-model" and result["backend"] == "openai"
    assert result["request_rate"] == "inf" and result["max_concurrency"] is None
    assert 45 <= result["mean_ttft_ms"] < 2000  # first chunk after 50 ms
    assert 8 <= result["median_itl_ms"] < 500  # 10 ms between chunks
    assert 8 <= result["median_tpot_ms"] < 500
    assert result["mean_e2el_ms"] >= 85  # 50 + 4 x 10 ms
    assert result["mean_e2el_ms"] > result["mean_ttft_ms"]
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert result["request_throughput"] == pytest.approx(8 / result["duration"])
    assert [len(i) for i in result["itls"]] == [4] * 8
    assert result["errors"] == [""] * 8
    assert result["max_concurrent_requests"] >= 2  # rate inf: all at once
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the test request plus the 8; every one streams with usage and the requested max_tokens
    assert len(server.log) == 9
    for call in server.log:
        body = call.body
        assert body["model"] == "fake-model" and body["max_tokens"] == 5
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert isinstance(body["prompt"], str)
    texts = {c.answer for c in server.log}
    assert set(result["generated_texts"]) <= texts


def test_chat_benchmark_with_max_concurrency_and_poisson_arrivals(tokenizer_dir, schema, tmp_path):
    result_path = tmp_path / "chat.json"
    with FakeServer(first_delay_s=0.02, chunk_delay_s=0.005, send_usage=False) as server:
        rc = run_bench(
            server.base_url, tokenizer_dir,
            "--endpoint", "/v1/chat/completions", "--input-len", "8", "--output-len", "3",
            "--num-prompts", "10", "--request-rate", "200", "--burstiness", "0.5",
            "--max-concurrency", "2", "--ignore-eos", "--extra-body", '{"top_k": 5}',
            "--save-result", str(result_path), "--save-detailed",
        )  # fmt: skip
    assert rc == 0
    result = json.loads(result_path.read_text())
    jsonschema.validate(result, schema)
    assert result["backend"] == "openai-chat" and result["completed"] == 10
    assert result["request_rate"] == 200 and result["burstiness"] == 0.5
    assert result["max_concurrent_requests"] <= 2
    body = server.log[-1].body
    assert body["messages"][0]["role"] == "user" and body["max_completion_tokens"] == 3
    assert body["ignore_eos"] is True and body["top_k"] == 5
    # no usage from the server: output tokens are counted with the tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text, n in zip(result["generated_texts"], result["output_lens"]):
        assert n == len(encode(tok, text)) > 0


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_multi_round_qa_carries_the_servers_answers(tokenizer_dir, schema, tmp_path, endpoint):
    result_path = tmp_path / "mrqa.json"
    with FakeServer(first_delay_s=0.02, chunk_delay_s=0.002) as server:
        rc = run_bench(
            server.base_url, tokenizer_dir,
            "--endpoint", endpoint, "--dataset-name", "multi-round-qa",
            "--num-users", "3", "--num-rounds", "3", "--system-prompt-len", "20",
            "--question-len", "8", "--answer-len", "4", "--user-request-interval", "0.01",
            "--save-result", str(result_path),
        )  # fmt: skip
    assert rc == 0
    result = json.loads(result_path.read_text())
    jsonschema.validate(result, schema)
    assert result["completed"] == 9 and result["num_users"] == 3 and result["num_rounds"] == 3
    assert [r["round"] for r in result["per_round"]] == [0, 1, 2]
    prompt_lens = [r["mean_prompt_len"] for r in result["per_round"]]
    assert prompt_lens[0] < prompt_lens[1] < prompt_lens[2]  # the history grows
    assert result["max_concurrent_requests"] == 3  # users run concurrently
    calls = server.log[1:]  # after the test request
    assert len(calls) == 9
    if endpoint == "/v1/chat/completions":
        by_user: dict[str, list] = {}
        for call in calls:
            messages = call.body["messages"]
            assert messages[0]["role"] == "system"
            by_user.setdefault(messages[1]["content"], []).append(call)
        assert len(by_user) == 3 and len({c.body["messages"][0]["content"] for c in calls}) == 1
        for user_calls in by_user.values():
            assert [len(c.body["messages"]) for c in user_calls] == [2, 4, 6]
            for k in (1, 2):  # round k carries the answers the server gave in rounds < k
                earlier = [c.answer for c in user_calls[:k]]
                assistant = [m["content"] for m in user_calls[k].body["messages"][2::2]]
                assert assistant == earlier
                assert user_calls[k].received >= user_calls[k - 1].finished  # in order
    else:  # one text: the earlier answers appear in it, each finished before it was sent
        carried = []
        for call in calls:
            answers = [c for c in calls if c.answer and c.answer in call.body["prompt"]]
            assert all(c.finished <= call.received for c in answers)
            carried.append(len(answers))
        assert sorted(carried) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_tokenizer_is_found_from_the_model_cards_root(tokenizer_dir, capsys):
    with FakeServer(first_delay_s=0.0, chunk_delay_s=0.0, model_root=tokenizer_dir) as server:
        rc = run_bench(server.base_url, None, "--input-len", "4", "--output-len", "2",
                       "--num-prompts", "2")  # fmt: skip
    assert rc == 0, capsys.readouterr().err


def test_unreachable_endpoint_exits_2_with_one_line(tokenizer_dir, capsys):
    rc = run_bench(f"http://127.0.0.1:{free_port()}", tokenizer_dir, "--num-prompts", "1")
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmserve bench: error: cannot connect to") and "\n" not in err


@pytest.mark.parametrize(
    "mode, message",
    [
        ("non_json", "neither an SSE stream nor JSON"),
        ("no_choices", "no 'choices'"),
        ("bad_models", "did not answer an OpenAI model list"),
    ],
)
def test_non_openai_answers_exit_2_with_the_reason(tokenizer_dir, capsys, mode, message):
    with FakeServer(mode=mode) as server:
        rc = run_bench(server.base_url, tokenizer_dir, "--input-len", "4", "--output-len", "2",
                       "--num-prompts", "2")  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmserve bench: error:") and message in err and "\n" not in err


def test_bad_flags_exit_2(tokenizer_dir, capsys):
    assert run_bench("http://127.0.0.1:1", tokenizer_dir, "--goodput", "foo:1") == 2
    assert "--goodput" in capsys.readouterr().err
    assert run_bench("http://127.0.0.1:1", tokenizer_dir, "--request-rate", "0") == 2


def test_arrivals_follow_the_gamma_process(monkeypatch):
    from lmserve.bench import serve

    slept: list[float] = []

    async def fake_sleep(seconds):
        slept.append(seconds)

    monkeypatch.setattr(serve.asyncio, "sleep", fake_sleep)

    async def collect(rate, burstiness):
        rng = np.random.default_rng(5)
        return [i async for i in serve.arrivals(list(range(6)), rate, burstiness, rng)]

    assert asyncio.run(collect(math.inf, 1.0)) == list(range(6)) and slept == []
    assert asyncio.run(collect(4.0, 0.5)) == list(range(6))
    expected = np.random.default_rng(5).gamma(shape=0.5, scale=1 / (4.0 * 0.5), size=5)
    assert slept == pytest.approx(expected.tolist())


def test_explicit_model_works_without_a_model_list(tokenizer_dir):
    with FakeServer(mode="bad_models", first_delay_s=0.0, chunk_delay_s=0.0) as server:
        rc = run_bench(server.base_url, tokenizer_dir, "--model", "mine", "--input-len", "4",
                       "--output-len", "2", "--num-prompts", "2")  # fmt: skip
    assert rc == 0
    assert {c.body["model"] for c in server.log} == {"mine"}
