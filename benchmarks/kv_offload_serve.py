"""Multi-round chat through `lmserve serve` with and without the KV connector's CPU tier, on one
GPU (Llama-3-8B shape, dummy weights, bf16), with a GPU KV pool too small for every user's
history, so earlier rounds are evicted and come back from the CPU tier or are recomputed.

The default workload is LMCache's multi-round QA benchmark scaled to one card: a shared system
prompt, then a long context of each user's own (`--user-history-len`, LMCache's
`--user-history-prompt`), then rounds of question and answer.

    python benchmarks/kv_offload_serve.py --out-dir DIR [--num-users 20] [--num-rounds 4]

Each side: start `lmserve serve`, run `lmserve bench serve --dataset-name multi-round-qa`,
stop the server. The model folder gets a word-level tokenizer over the model's whole
vocabulary (`w0 w1 ...`), so any generated id detokenizes and re-tokenizes to itself.
Prints a table last and writes DIR/kv_offload_serve.json (card named). Never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_shapes import SHAPES, write_shape  # noqa: E402
from machine import device_info  # noqa: E402
from server_proc import start_lmserve  # noqa: E402


def kv_config(cpu_size_gib: float) -> dict:
    return {"kv_connector": "TieredConnector",
            "kv_connector_extra_config": {"cpu_size_gib": cpu_size_gib}}  # fmt: skip


def add_word_tokenizer(path: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="w2").save_pretrained(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, path: str, port: int, kv: dict | None, log) -> subprocess.Popen:
    serve_args = [
        path, "--load-format", "dummy", "--dtype", "bfloat16",
        "--max-model-len", str(args.max_model_len),
        "--num-gpu-blocks-override", str(args.num_gpu_blocks),
        "--disable-access-log", "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    if kv is not None:
        serve_args += ["--kv-transfer-config", json.dumps(kv)]
    return start_lmserve(serve_args, port, log)


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def kv_hit_tokens(text: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "lmserve:kv_offload_hit_tokens_total"
    )


def run_side(args, path: str, kv: dict | None, name: str) -> dict:
    port = free_port()
    result_path = os.path.join(args.out_dir, f"bench_{name}.json")
    with open(os.path.join(args.out_dir, f"server_{name}.log"), "w") as log:
        proc = start_server(args, path, port, kv, log)
        try:
            bench = [
                sys.executable, "-m", "lmserve.bench.cli", "serve",
                "--base-url", f"http://127.0.0.1:{port}", "--tokenizer", path,
                "--dataset-name", "multi-round-qa", "--num-users", str(args.num_users),
                "--num-rounds", str(args.num_rounds),
                "--system-prompt-len", str(args.system_prompt_len),
                "--user-history-len", str(args.user_history_len),
                "--question-len", str(args.question_len), "--answer-len", str(args.answer_len),
                "--request-rate", "inf", "--max-concurrency", str(args.max_concurrency),
                "--ignore-eos", "--metric-percentiles", "50,90,99", "--disable-tqdm",
                "--save-result", result_path,
            ]  # fmt: skip
            subprocess.run(bench, check=True, stdout=log, stderr=subprocess.STDOUT)
            hits = kv_hit_tokens(metrics_text(port))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    with open(result_path) as f:
        result = json.load(f)
    result["kv_offload_hit_tokens"] = hits
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=".")
    parser.add_argument("--num-users", type=int, default=20)
    parser.add_argument("--num-rounds", type=int, default=4)
    parser.add_argument("--system-prompt-len", type=int, default=1000)
    parser.add_argument("--user-history-len", type=int, default=5000)
    parser.add_argument("--question-len", type=int, default=100)
    parser.add_argument("--answer-len", type=int, default=100)
    parser.add_argument("--max-concurrency", type=int, default=8)
    # 4,096 blocks x 16 = 65,536 tokens: room for the 8 requests in flight (about 6,800 tokens
    # each by the last round) and a little cache; every user's history (136,000 tokens in all)
    # needs twice that, and the CPU tier holds it. (A pool smaller than the requests in flight
    # measures queueing for blocks, not the tier.)
    parser.add_argument("--num-gpu-blocks", type=int, default=4096)
    parser.add_argument("--cpu-size-gib", type=float, default=24)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    path = write_shape(tempfile.mkdtemp(), args.shape)
    add_word_tokenizer(path, SHAPES[args.shape][1]["vocab_size"])
    kv = kv_config(args.cpu_size_gib)
    sides = {"tier_off": run_side(args, path, None, "tier_off"),
             "tier_on": run_side(args, path, kv, "tier_on")}  # fmt: skip
    import torch

    summary = {
        "machine": device_info("cuda" if torch.cuda.is_available() else "cpu"),
        "shape": args.shape, "dtype": "bfloat16", "kv_transfer_config": kv,
        "workload": vars(args), **sides,
    }  # fmt: skip
    with open(os.path.join(args.out_dir, "kv_offload_serve.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print_table(summary)


def print_table(summary: dict) -> None:
    off, on = summary["tier_off"], summary["tier_on"]
    card = summary["machine"].get("gpu", summary["machine"]["device"])
    print(f"\nmulti-round-qa through lmserve serve, {summary['shape']} shape, bf16, {card}")
    print(f"{'measure':<34}{'tier off':>12}{'tier on':>12}{'off / on':>10}")
    for key, label in [("median_ttft_ms", "TTFT p50, ms"), ("p90_ttft_ms", "TTFT p90, ms"),
                       ("p99_ttft_ms", "TTFT p99, ms"), ("mean_e2el_ms", "E2E latency mean, ms")]:  # fmt: skip
        print(f"{label:<34}{off[key]:>12.1f}{on[key]:>12.1f}{off[key] / on[key]:>10.2f}")
    back_off, back_on = off["returning_rounds_ttft_ms"], on["returning_rounds_ttft_ms"]
    for key, label in [("p50", "TTFT p50, rounds after the 1st, ms"),
                       ("p90", "TTFT p90, rounds after the 1st, ms")]:  # fmt: skip
        print(f"{label:<34}{back_off[key]:>12.1f}{back_on[key]:>12.1f}{back_off[key] / back_on[key]:>10.2f}")  # fmt: skip
    for key, label in [("output_throughput", "output tok/s"), ("request_throughput", "req/s")]:
        print(f"{label:<34}{off[key]:>12.1f}{on[key]:>12.1f}{off[key] / on[key]:>10.2f}")
    print(f"{'tokens loaded from the CPU tier':<34}{off['kv_offload_hit_tokens']:>12.0f}"
          f"{on['kv_offload_hit_tokens']:>12.0f}")  # fmt: skip
    print(f"{'completed / failed':<34}{off['completed']:>7}/{off['failed']:<4}{on['completed']:>7}/{on['failed']:<4}")  # fmt: skip


if __name__ == "__main__":
    main()
