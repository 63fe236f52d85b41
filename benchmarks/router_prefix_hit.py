"""Prefix-cache hit rate of three CPU engines behind the router: prefix-aware vs round-robin.

    python benchmarks/router_prefix_hit.py

Starts three `lmserve serve` engines on a tiny random Llama (the test suite's, built on the
fly) and, for each workload and routing logic, a router in front of them; runs
`lmserve bench serve --dataset-name multi-round-qa` through the router and reads the engines'
own counters (lmserve:prefix_cache_hits / _queries, summed over the three, before and after).
Each run uses a fresh dataset seed, so no run finds the previous one's prefixes.

Workloads: "long-turns-2-rounds" is tests/router/test_live_cluster.py's; "no-system" has 3
rounds (round-robin's chance to find an earlier round of the user grows with the rounds);
"short-system" adds an 8-token shared system prompt; "long-system" has a 64-token shared system prompt and 5 rounds, where round-robin
also hits often (every engine soon holds the system prompt, and a user's later rounds often
find one of its earlier rounds on their engine), so the gap narrows.
Prints a table; writes benchmarks/results/router_prefix_hit_cpu.json. Never asserts.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machine import cpu_machine_info  # noqa: E402

from lmserve.bench.cli import main as bench_main  # noqa: E402
from tests.entrypoints.openai.conftest import API_KEY, start_server  # noqa: E402
from tests.router.conftest import running_router  # noqa: E402
from tests.tiny_models import make_tiny_model  # noqa: E402

RESULT_PATH = os.path.join(os.path.dirname(__file__), "results", "router_prefix_hit_cpu.json")
WORKLOADS = {
    "long-turns-2-rounds": dict(users=24, rounds=2, system=0, question=160, answer=8, rate=4),
    "no-system": dict(users=12, rounds=3, system=0, question=64, answer=16, rate=4),
    "short-system": dict(users=12, rounds=3, system=8, question=64, answer=16, rate=4),
    "long-system": dict(users=10, rounds=5, system=64, question=32, answer=16, rate=4),
}
LOGICS = ("roundrobin", "prefix-aware")


def counters(engines) -> tuple[float, float]:
    hits = sum(e.metric("lmserve:prefix_cache_hits_total") for e in engines)
    queries = sum(e.metric("lmserve:prefix_cache_queries_total") for e in engines)
    return hits, queries


def run(engines, logic: str, workload: dict, seed: int) -> dict:
    with running_router(
        [e.url for e in engines], routing_logic=logic, backend_api_key=API_KEY
    ) as router:
        before = counters(engines)
        rc = bench_main(["serve", "--base-url", router.url, "--endpoint", "/v1/chat/completions",
                         "--dataset-name", "multi-round-qa", "--num-users", str(workload["users"]),
                         "--num-rounds", str(workload["rounds"]), "--request-rate", str(workload["rate"]),
                         "--system-prompt-len", str(workload["system"]),
                         "--question-len", str(workload["question"]),
                         "--answer-len", str(workload["answer"]), "--ignore-eos",
                         "--seed", str(seed), "--disable-tqdm"])  # fmt: skip
        assert rc == 0, f"bench serve failed through the {logic} router"
        after = counters(engines)
    hits, queries = after[0] - before[0], after[1] - before[1]
    return {"hit_tokens": hits, "query_tokens": queries, "hit_rate": hits / queries}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "tiny-llama")
        with ThreadPoolExecutor(3) as pool:
            engines = list(pool.map(lambda _: start_server(model, log_dir=Path(tmp)), range(3)))
        try:
            results, seed = {}, 1000
            for name, workload in WORKLOADS.items():
                results[name] = {"workload": workload}
                for logic in LOGICS:
                    seed += 1
                    results[name][logic] = run(engines, logic, workload, seed)
                results[name]["ratio"] = (
                    results[name]["prefix-aware"]["hit_rate"]
                    / results[name]["roundrobin"]["hit_rate"]
                )
        finally:
            for engine in engines:
                engine.stop()
    print(f"\n{'workload':<14} {'round-robin':>12} {'prefix-aware':>13} {'ratio':>6}")
    for name, r in results.items():
        print(f"{name:<14} {r['roundrobin']['hit_rate']:>12.3f} {r['prefix-aware']['hit_rate']:>13.3f} {r['ratio']:>6.2f}")  # fmt: skip
    out = {
        "benchmark": "router_prefix_hit",
        "machine": cpu_machine_info("cpu", engines="3 x lmserve serve, tiny random Llama, float32"),
        "metric": "engines' summed lmserve:prefix_cache_hits / lmserve:prefix_cache_queries",
        "results": results,
    }
    os.makedirs(os.path.dirname(RESULT_PATH), exist_ok=True)
    with open(RESULT_PATH, "w") as f:
        json.dump(out, f, indent=2)
    print(f"written {RESULT_PATH}")


if __name__ == "__main__":
    main()
