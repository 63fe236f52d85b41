"""`lmserve bench throughput` (lmserve and HF backends) and `lmserve bench latency` on a tiny
model: they run, report, and both backends generate exactly the same number of tokens."""

from __future__ import annotations

import json

import pytest

from lmserve.bench.cli import main
from lmserve.bench.datasets import random_requests
from lmserve.bench.throughput import hf_batches

ENGINE = ["--device", "cpu", "--dtype", "float32", "--max-num-seqs", "8", "--disable-tqdm"]


def test_throughput_both_backends_generate_the_same_tokens(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    model = tiny_model_dir("llama")
    out = tmp_path / "tput.json"
    argv = ["throughput", model, "--backend", "both", "--input-len", "12", "--output-len", "6",
            "--range-ratio", "0.5", "--num-prompts", "10", "--hf-max-batch-size", "3",
            "--seed", "4", "--output-json", str(out), *ENGINE]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "[lmserve] Throughput:" in text and "[hf] Throughput:" in text and "lmserve / hf" in text
    doc = json.loads(out.read_text())
    lm, hf = doc["results"]
    assert (lm["backend"], hf["backend"]) == ("lmserve", "hf")
    requests = random_requests(AutoTokenizer.from_pretrained(model), 10, 12, 6, 0.5, seed=4)
    expected_output = sum(r.expected_output_len for r in requests)
    assert lm["total_output_tokens"] == hf["total_output_tokens"] == expected_output
    assert lm["total_prompt_tokens"] == hf["total_prompt_tokens"]
    assert lm["total_prompt_tokens"] == sum(r.prompt_len + 1 for r in requests)  # + BOS
    for r in (lm, hf):
        assert r["num_requests"] == 10 and r["elapsed_time"] > 0
        assert r["requests_per_second"] == pytest.approx(10 / r["elapsed_time"])
        assert r["output_tokens_per_second"] == pytest.approx(expected_output / r["elapsed_time"])
        assert r["tokens_per_second"] == pytest.approx(r["total_num_tokens"] / r["elapsed_time"])
    assert doc["lmserve_over_hf_output_tokens_per_second"] == pytest.approx(
        lm["output_tokens_per_second"] / hf["output_tokens_per_second"]
    )


def test_throughput_hf_greedy_on_a_sharegpt_file(tiny_model_dir, tmp_path):
    data = [
        {"conversations": [{"from": "human", "value": "The small engine hums along the road"},
                           {"from": "gpt", "value": "A farmer walks to the market with apples"}]},
        {"conversations": [{"from": "human", "value": "How far is the city tonight?"},
                           {"from": "gpt", "value": "Nobody knows, but the road is long."}]},
    ]  # fmt: skip
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "hf.json"
    argv = ["throughput", tiny_model_dir("llama"), "--backend", "hf", "--temperature", "0",
            "--dataset-path", str(path), "--num-prompts", "2", "--output-json", str(out), *ENGINE]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["backend"] == "hf" and doc["dataset_name"] == "sharegpt" and doc["num_requests"] == 2
    assert doc["total_output_tokens"] > 8


def test_throughput_lmserve_on_prefix_repetition(tiny_model_dir, tmp_path):
    out = tmp_path / "lm.json"
    argv = ["throughput", tiny_model_dir("llama"), "--dataset-name", "prefix-repetition",
            "--prefix-len", "32", "--suffix-len", "4", "--num-prefixes", "2", "--output-len", "3",
            "--num-prompts", "6", "--output-json", str(out), *ENGINE]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["backend"] == "lmserve" and doc["total_output_tokens"] == 18
    assert doc["total_prompt_tokens"] == 6 * (36 + 1)


def test_hf_batches_hold_one_output_length_each():
    batches = hf_batches([5, 9, 3, 7, 2], [4, 2, 4, 4, 2], max_batch_size=2)
    assert batches == [([4, 1], 2), ([2, 0], 4), ([3], 4)]


def test_latency_reports_iterations_and_decode_steps(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "latency.json"
    argv = ["latency", tiny_model_dir("llama"), "--batch-size", "2", "--input-len", "8",
            "--output-len", "4", "--num-iters", "3", "--num-iters-warmup", "1",
            "--output-json", str(out), *ENGINE]  # fmt: skip
    assert main(argv) == 0
    assert "Avg latency:" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert len(doc["latencies"]) == 3 and len(doc["ttfts"]) == 3
    assert len(doc["decode_step_latencies"]) == 3 * (4 - 1)  # one step per token after the first
    assert set(doc["percentiles"]) == {"10", "25", "50", "75", "90", "99"}
    assert doc["avg_latency"] == pytest.approx(sum(doc["latencies"]) / 3)
    assert all(t <= lat for t, lat in zip(doc["ttfts"], doc["latencies"]))
    assert doc["decode_step_percentiles"]["50"] > 0


def test_offline_bad_flags_exit_2(tiny_model_dir, capsys):
    model = tiny_model_dir("llama")
    assert main(["latency", model, "--batch-size", "0", *ENGINE]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert main(["throughput", model, "--dataset-name", "sharegpt", *ENGINE]) == 2
    assert "--dataset-path" in capsys.readouterr().err
