"""Speculative decoding in `lmserve bench` output: throughput and latency print and save the
figures; `bench serve` reads them from lmserve's /metrics (difference over the run) into a
result that still satisfies the result schema; and benchmarks/spec_decode_bench.py runs on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from prometheus_client import REGISTRY, generate_latest

import lmserve.bench
from lmserve.bench.cli import main
from lmserve.bench.spec_decode import difference, scrape_spec_decode
from lmserve.core.messages import SchedulerStats, SpecDecodeStats

ENGINE = ["--device", "cpu", "--dtype", "float32", "--max-num-seqs", "8", "--disable-tqdm"]
NGRAM = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}'
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_throughput_reports_spec_decode(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "tput.json"
    argv = ["throughput", tiny_model_dir("llama"), "--input-len", "16", "--output-len", "12",
            "--num-prompts", "6", "--temperature", "0", "--output-json", str(out),
            "--speculative-config", NGRAM, *ENGINE]  # fmt: skip
    assert main(argv) == 0
    assert "Speculative decoding:" in capsys.readouterr().out
    stats = json.loads(out.read_text())["spec_decode"]
    assert stats["num_draft_tokens"] >= stats["num_accepted_tokens"] >= 0
    assert len(stats["acceptance_rate_per_pos"]) == len(stats["num_draft_tokens_per_pos"])


def test_bench_latency_reports_spec_decode(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "latency.json"
    argv = ["latency", tiny_model_dir("llama"), "--batch-size", "2", "--input-len", "8",
            "--output-len", "8", "--num-iters", "1", "--num-iters-warmup", "0",
            "--output-json", str(out), "--speculative-config", NGRAM, *ENGINE]  # fmt: skip
    assert main(argv) == 0
    assert "Acceptance rate by draft position" in capsys.readouterr().out
    assert "acceptance_rate" in json.loads(out.read_text())["spec_decode"]


def test_bench_serve_reads_the_run_from_metrics(monkeypatch):
    """What a run added is the difference of the counters (others may be on the page)."""
    from lmserve.metrics.stats import StatsRecorder

    def get(url, headers, timeout):
        assert url == "http://server/metrics"
        return 200, generate_latest(REGISTRY).decode()

    monkeypatch.setattr(lmserve.bench, "http_get", get)
    recorder = StatsRecorder(model_name="bench-serve")
    step = SpecDecodeStats()
    step.observe(3, 2)
    recorder.on_scheduler_stats(SchedulerStats(spec_decode=step))
    before = scrape_spec_decode("http://server")
    assert before is not None and before.num_draft_tokens >= 3
    recorder.on_scheduler_stats(SchedulerStats(spec_decode=step))
    recorder.on_scheduler_stats(SchedulerStats(spec_decode=step))
    run = difference(scrape_spec_decode("http://server"), before)
    assert (run.num_drafts, run.num_draft_tokens, run.num_accepted_tokens) == (2, 6, 4)
    assert run.acceptance_rate_per_pos()[:3] == [1.0, 1.0, 0.0]
    _check_schema(run.to_dict())


def test_scrape_without_spec_decode_counters_is_none(monkeypatch):
    monkeypatch.setattr(
        lmserve.bench, "http_get", lambda url, headers, timeout: (200, "# nothing\n")
    )
    assert scrape_spec_decode("http://server") is None
    monkeypatch.setattr(lmserve.bench, "http_get", lambda url, headers, timeout: (404, ""))
    assert scrape_spec_decode("http://server") is None


def _check_schema(spec_decode: dict) -> None:
    import jsonschema

    from tests.bench.test_serve import SCHEMA_PATH

    with open(SCHEMA_PATH) as f:
        schema = json.load(f)
    sub = {**schema["properties"]["spec_decode"], "$defs": schema["$defs"]}
    jsonschema.validate(spec_decode, sub)


@pytest.mark.slow
def test_spec_decode_benchmark_script_runs_on_cpu(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "spec_decode_bench.py"),
           "--model", tiny_model_dir("llama"), "--device", "cpu", "--dtype", "float32",
           "--num-prompts", "2", "--output-len", "16", "--prompt-lookup-min", "1",
           "--batch-sizes", "1,2", "--output-json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "speed-up" in done.stdout
    doc = json.loads(out.read_text())
    assert [r["batch_size"] for r in doc["runs"]] == [1, 2]
    first = doc["runs"][0]
    assert first["ngram"]["spec_decode"]["num_draft_tokens"] > 0
    assert first["baseline"]["decode_tok_s"] > 0 and doc["speedup"] > 0
    assert doc["outputs_identical"] is True  # float32: greedy outputs agree
    assert doc["machine"]["device"] == "cpu"
