"""`lmserve bench serve` against a real `lmserve serve` on a tiny model (a subprocess)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import jsonschema
import pytest

pytest.importorskip("lmserve.entrypoints.openai.server")

from lmserve.bench.cli import main  # noqa: E402
from tests.bench.test_serve import SCHEMA_PATH  # noqa: E402

STARTUP_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def live_server(tiny_model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LMSERVE_ENABLE_MULTIPROCESSING": "1"}
    cmd = [sys.executable, "-m", "lmserve.entrypoints.cli", "serve", tiny_model_dir("llama"),
           "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
           "--disable-access-log", "--uvicorn-log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"lmserve serve exited: {proc.stdout.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "lmserve serve did not start"
            time.sleep(0.2)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_bench_serve_against_lmserve_serve(live_server, tmp_path, endpoint):
    out = tmp_path / "live.json"
    rc = main(["serve", "--base-url", live_server, "--endpoint", endpoint, "--input-len", "16",
               "--output-len", "6", "--num-prompts", "6", "--ignore-eos", "--disable-tqdm",
               "--save-result", str(out), "--save-detailed"])  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    with open(SCHEMA_PATH) as f:
        jsonschema.validate(result, json.load(f))
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["total_output_tokens"] == 6 * 6  # ignore_eos: the server's usage says 6 each
    assert result["total_input_tokens"] == 6 * 16
    assert 0 < result["mean_ttft_ms"] < result["mean_e2el_ms"]
    assert result["mean_tpot_ms"] > 0 and result["mean_itl_ms"] > 0


@pytest.mark.slow
def test_multi_round_qa_against_lmserve_serve(live_server):
    rc = main(["serve", "--base-url", live_server, "--endpoint", "/v1/chat/completions",
               "--dataset-name", "multi-round-qa", "--num-users", "2", "--num-rounds", "2",
               "--system-prompt-len", "24", "--question-len", "6", "--answer-len", "4",
               "--disable-tqdm"])  # fmt: skip
    assert rc == 0
