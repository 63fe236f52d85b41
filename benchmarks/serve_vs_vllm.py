"""Online serving, lmserve against vLLM on the same card: each server is started with its
defaults (8B shape, dummy weights, bf16), then `lmserve bench serve` sends it the same random
prompts (same seed: 128-2,047 tokens in, 64-511 out, ignore_eos) at each request rate, one rate
after another: TTFT p50/p99, ITL p50/p99 and output tok/s per rate. One server runs at a time.

    python benchmarks/serve_vs_vllm.py --server lmserve --model-dir DIR --out lmserve.json
    PYTHONPATH=/tmp/vsite python benchmarks/serve_vs_vllm.py --server vllm ... --out vllm.json
    python benchmarks/serve_vs_vllm.py --compare lmserve.json vllm.json --out both.json

DIR holds config.json and a tokenizer (both servers read the tokenizer from it). Prints a table
and writes JSON; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time

import httpx

RATES = {"4": 160, "16": 400, "64": 800, "inf": 500}  # request rate: prompts sent at it
METRICS = ("p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms", "output_throughput")
DATASET = [
    "--dataset-name", "random", "--input-len", "1088", "--range-ratio", "0.88235",
    "--output-len", "288", "--output-range-ratio", "0.7777", "--ignore-eos", "--seed", "0",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(server: str, model_dir: str, port: int) -> list[str]:
    common = ["--load-format", "dummy", "--dtype", "bfloat16", "--port", str(port)]
    common += ["--host", "127.0.0.1", "--max-model-len", "4096"]
    if server == "lmserve":
        return [sys.executable, "-m", "lmserve.entrypoints.cli", "serve", model_dir, *common]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir, *common]


def _server_env(pythonpath: str | None) -> dict[str, str]:
    """The server process's environment: ours, with its own PYTHONPATH when given."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return env


def _wait_healthy(proc: subprocess.Popen, port: int, timeout_s: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return time.perf_counter() - start
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server not healthy after {timeout_s} s")


# The servers' own view of each request (vLLM's metric names; lmserve's under `lmserve:`): the
# mean per rate, to tell the engine's queueing and prefill from the front end's share of TTFT.
SERVER_HISTOGRAMS = (
    "time_to_first_token_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
    "request_decode_time_seconds", "e2e_request_latency_seconds",
)  # fmt: skip


SERVER_COUNTERS = ("num_preemptions",)  # counted per rate (total, 0)


def _histogram_totals(port: int) -> dict[str, tuple[float, float]]:
    """(sum, count) of each SERVER_HISTOGRAMS entry the server exports, summed over labels,
    and (total, 0) of each SERVER_COUNTERS entry."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    totals: dict[str, tuple[float, float]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name.split(":", 1)[-1]
        if name in SERVER_COUNTERS:
            total = sum(s.value for s in family.samples if s.name.endswith("_total"))
            totals[name] = (totals.get(name, (0.0, 0.0))[0] + total, 0.0)
            continue
        if name not in SERVER_HISTOGRAMS:
            continue
        total, count = totals.get(name, (0.0, 0.0))
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
        totals[name] = (total, count)
    return totals


def _server_means_ms(before: dict, after: dict) -> dict[str, float]:
    """Mean milliseconds of each histogram over the requests between two scrapes, and how
    much each counter grew."""
    means = {}
    for name, (total, count) in after.items():
        total0, count0 = before.get(name, (0.0, 0.0))
        if name in SERVER_COUNTERS:
            means[f"server_{name}"] = total - total0
        elif count > count0:
            means[f"server_mean_{name.removesuffix('_seconds')}_ms"] = round(
                1000 * (total - total0) / (count - count0), 2
            )
    return means


def _bench(port: int, rate: str, num_prompts: int, result_path: str) -> dict:
    cmd = [
        sys.executable, "-m", "lmserve.entrypoints.cli", "bench", "serve",
        "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
        "--request-rate", rate, "--num-prompts", str(num_prompts), *DATASET,
        "--metric-percentiles", "50,99", "--disable-tqdm", "--save-result", result_path,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(result_path) as f:
        return json.load(f)


def run_server(
    server: str,
    model_dir: str,
    rates: list[str],
    log_path: str,
    scale: float = 1.0,
    server_pythonpath: str | None = None,
    server_args: tuple[str, ...] = (),
) -> dict:
    port = _free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*_server_command(server, model_dir, port), *server_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_server_env(server_pythonpath),
        )
    result: dict = {"server": server, "rates": {}}
    try:
        result["start_to_healthy_s"] = round(_wait_healthy(proc, port, 900), 1)
        with tempfile.TemporaryDirectory() as tmp:
            _bench(port, "inf", 16, os.path.join(tmp, "warmup.json"))  # first-request costs
            for rate in rates:
                num_prompts = max(2, round(RATES[rate] * scale))
                before = _histogram_totals(port)
                full = _bench(port, rate, num_prompts, os.path.join(tmp, f"{rate}.json"))
                row = {m: full.get(m) for m in (*METRICS, "mean_ttft_ms")}
                row.update(completed=full.get("completed"), num_prompts=num_prompts)
                row.update(_server_means_ms(before, _histogram_totals(port)))
                result["rates"][rate] = row
                print(server, rate, json.dumps(row), flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return result


def _versions(server: str, server_pythonpath: str | None) -> dict:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    info = {"device": device, "torch": torch.__version__}
    if server == "vllm":
        code = "import vllm; print(vllm.__version__)"
        env = _server_env(server_pythonpath)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        info["vllm"] = out.stdout.strip()
    return info


def _model_summary(model_dir: str) -> dict:
    """The shape both servers ran, and the tokenizer's vocabulary: ids past it decode to no text,
    which would make streamed chunks (and so TTFT/ITL) look sparser than the tokens generated."""
    from tokenizers import Tokenizer

    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    summary = {k: config.get(k) for k in (*keys, "intermediate_size", "vocab_size")}
    tok_path = os.path.join(model_dir, "tokenizer.json")
    if os.path.exists(tok_path):
        summary["tokenizer_vocab_size"] = Tokenizer.from_file(tok_path).get_vocab_size()
    return summary


# The KV pool each server reports at start-up: under overload its size decides how many
# requests run at once and how many are preempted (the 64/s TTFT p99 gap was this).
KV_POOL_LINES = (
    re.compile(r"KV cache: \d+ blocks x \d+ tokens = (\d+) tokens"),  # lmserve
    re.compile(r"GPU KV cache size: ([\d,]+) tokens"),  # vLLM
)


def kv_cache_tokens(log_path: str) -> int | None:
    """The KV pool in tokens from a server log (None when no line says it)."""
    with open(log_path, errors="replace") as f:
        for line in f:
            for pattern in KV_POOL_LINES:
                found = pattern.search(line)
                if found:
                    return int(found.group(1).replace(",", ""))
    return None


def compare(ours: dict, theirs: dict) -> dict:
    """Per rate and metric: both figures and lmserve's speed relative to vLLM (>1: lmserve
    better; latencies as vLLM's / ours, throughput as ours / vLLM's)."""
    table = {}
    for rate, row in ours["rates"].items():
        peer = theirs["rates"].get(rate)
        if not peer:
            continue
        table[rate] = {}
        for metric in METRICS:
            a, b = row[metric], peer[metric]
            ratio = a / b if metric == "output_throughput" else b / a
            table[rate][metric] = {"lmserve": a, "vllm": b, "lmserve_advantage": round(ratio, 3)}
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", choices=("lmserve", "vllm"))
    parser.add_argument("--model-dir")
    parser.add_argument("--rates", default="4,16,64,inf")
    parser.add_argument("--scale", type=float, default=1.0, help="of each rate's prompts")
    parser.add_argument(
        "--server-pythonpath", default=None, help="PYTHONPATH of the server process only"
    )
    parser.add_argument(
        "--server-args", default="", help="more flags for the server, one shell-quoted string"
    )
    parser.add_argument("--compare", nargs=2, metavar=("LMSERVE_JSON", "VLLM_JSON"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not args.compare:
        if args.server is None or args.model_dir is None:
            parser.error("give --server and --model-dir (or --compare A.json B.json)")
        if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
            parser.error(f"--model-dir {args.model_dir}: no config.json there")
        unknown = [r for r in args.rates.split(",") if r not in RATES]
        if unknown:
            parser.error(f"--rates: {unknown} not among {list(RATES)}")
    if args.compare:
        ours, theirs = (json.load(open(p)) for p in args.compare)
        result = {"lmserve": ours, "vllm": theirs, "comparison": compare(ours, theirs)}
        print(f"{'rate':>5} {'metric':<18}{'lmserve':>10}{'vllm':>10}{'advantage':>11}")
        for rate, rows in result["comparison"].items():
            for metric, r in rows.items():
                print(
                    f"{rate:>5} {metric:<18}{r['lmserve']:>10.1f}{r['vllm']:>10.1f}"
                    f"{r['lmserve_advantage']:>10.3f}x"
                )
    else:
        rates = args.rates.split(",")
        result = run_server(
            args.server,
            args.model_dir,
            rates,
            args.out + ".server.log",
            args.scale,
            args.server_pythonpath,
            tuple(shlex.split(args.server_args)),
        )
        result["server_args"] = args.server_args
        result["kv_cache_tokens"] = kv_cache_tokens(args.out + ".server.log")
        result.update(_versions(args.server, args.server_pythonpath))
        result["model_config"] = _model_summary(args.model_dir)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
