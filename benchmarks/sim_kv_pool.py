"""How TTFT under overload depends on the KV pool, in the simulator: one H100 replica (the
`h100-llama3-8b` profile), `serve_vs_vllm.py`'s 64 req/s at half scale (400 prompts of 128-2,047
tokens, 64-511 out, Poisson arrivals), for several pool sizes and trace seeds.

    python benchmarks/sim_kv_pool.py --blocks 28031,28500,29667 --out pool.json

Each seed draws one trace (arrival times and lengths) used for every pool size. Prints a table
and writes JSON; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np


def write_trace(path: str, seed: int, rate: float, num_prompts: int) -> None:
    rng = np.random.default_rng(seed)
    now = 0.0
    with open(path, "w") as f:
        for _ in range(num_prompts):
            now += rng.exponential(1 / rate)
            item = {
                "timestamp": round(now, 6),
                "prompt_tokens": int(rng.integers(128, 2048)),
                "output_tokens": int(rng.integers(64, 512)),
            }
            f.write(json.dumps(item) + "\n")


def simulate(trace: str, blocks: int, max_num_seqs: int, out: str) -> dict:
    cmd = [
        sys.executable, "-m", "lmserve.entrypoints.cli", "simulate",
        "--profile", "h100-llama3-8b", "--replicas", "1", "--num-gpu-blocks", str(blocks),
        "--max-num-seqs", str(max_num_seqs), "--dataset-name", "trace", "--trace", trace,
        "--output", out,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        run = json.load(f)["runs"][0]
    keys = ("p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "output_throughput")
    row = {k: round(run[k], 1) for k in keys}
    # a prompt recomputed after a preemption finds its own blocks: the only hits here
    row["prefix_cache_hit_rate"] = round(run["prefix_cache_hit_rate"], 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="28031,28500,28839,29667")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rate", type=float, default=64.0)
    parser.add_argument("--num-prompts", type=int, default=400)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in map(int, args.seeds.split(",")):
            trace = os.path.join(tmp, f"trace{seed}.jsonl")
            write_trace(trace, seed, args.rate, args.num_prompts)
            for blocks in map(int, args.blocks.split(",")):
                row = simulate(trace, blocks, args.max_num_seqs, os.path.join(tmp, "r.json"))
                rows.append({"blocks": blocks, "seed": seed, **row})
                print(
                    f"blocks {blocks:>6}  seed {seed}  TTFT p50 {row['p50_ttft_ms']:>7.0f} "
                    f"p90 {row['p90_ttft_ms']:>7.0f} p99 {row['p99_ttft_ms']:>7.0f} ms  "
                    f"{row['output_throughput']:>6.0f} out tok/s  hit {row['prefix_cache_hit_rate']}",
                    flush=True,
                )
    result = {
        "benchmark": "simulated KV pool size vs TTFT under overload",
        "profile": "h100-llama3-8b",
        "rate": args.rate,
        "num_prompts": args.num_prompts,
        "max_num_seqs": args.max_num_seqs,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
