"""The simulator at scale: 1,000 (or 10,000) simulated H100 replicas, one simulated hour of
multi-round-qa, every routing logic side by side; wall time, CPU time and peak memory of each
run.

    python benchmarks/sim_scale.py [--replicas 1000] [--duration 3600] [--busy 0.7]
                                   [--logics roundrobin,least-loaded,session,prefix-aware,kv-aware]

Load: the user arrival rate that keeps replicas ~`--busy` busy (fraction of time a replica has a
step running, what nvidia-smi calls utilization) is found first on a small cluster
(--probe-replicas, 10 simulated minutes, round-robin, bisection on the rate per replica), then
scaled to --replicas. Each logic then runs in its own process (`lmserve simulate`, so its peak
RSS is its own) with --max-sim-time = --duration: the figures cover requests finished within
the simulated hour. Writes benchmarks/results/sim_scale_h100_<replicas>.json. Never asserts on
time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import cpu_machine_info  # noqa: E402

from lmserve.sim.cluster import Cluster, SimConfig  # noqa: E402
from lmserve.sim.profile import load_profile  # noqa: E402
from lmserve.sim.report import summarize  # noqa: E402
from lmserve.sim.workload import WorkloadSpec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOGICS = ("roundrobin", "least-loaded", "session", "prefix-aware", "kv-aware")
# multi-round chat: 20 system prompts (tenants/apps), 5 rounds, 10 s of reading/typing between
# an answer and the next question
WORKLOAD = dict(num_system_prompts=20, system_prompt_len=1000, num_rounds=5, question_len=100,
                answer_len=300, user_request_interval=10.0)  # fmt: skip


def spec(rate: float, duration: float) -> WorkloadSpec:
    w = WORKLOAD
    return WorkloadSpec("multi-round-qa", request_rate=rate, duration_s=duration,
                        num_system_prompts=w["num_system_prompts"],
                        system_prompt_len=w["system_prompt_len"], num_rounds=w["num_rounds"],
                        question_len=w["question_len"], answer_len=w["answer_len"],
                        think_s=w["user_request_interval"], seed=1)  # fmt: skip


def busy_at(rate_per_replica: float, replicas: int) -> float:
    profile = load_profile("h100-llama3-8b")
    cluster = Cluster(SimConfig("roundrobin", replicas=replicas, max_sim_s=600.0, warmup_s=120),
                      profile, spec(rate_per_replica * replicas, 600.0)).run()  # fmt: skip
    return summarize(cluster)["replica_busy"]["mean"]


def find_rate(target: float, replicas: int) -> tuple[float, float]:
    """Users/s per replica giving `target` busy (busy grows with the rate)."""
    low, high = 0.0, 0.2
    while busy_at(high, replicas) < target:
        low, high = high, high * 2
    for _ in range(10):
        mid = (low + high) / 2
        if busy_at(mid, replicas) < target:
            low = mid
        else:
            high = mid
    rate = (low + high) / 2
    return rate, busy_at(rate, replicas)


def run_logic(logic: str, replicas: int, rate: float, duration: float, tmp: Path) -> dict:
    out = tmp / f"{logic}.json"
    w = WORKLOAD
    args = [sys.executable, "-m", "lmserve.entrypoints.cli", "simulate", "--profile",
            "h100-llama3-8b", "--replicas", str(replicas), "--routing-logic", logic,
            "--dataset-name", "multi-round-qa", "--request-rate", f"{rate:.6f}",
            "--duration", str(duration), "--max-sim-time", str(duration),
            "--num-system-prompts", str(w["num_system_prompts"]),
            "--system-prompt-len", str(w["system_prompt_len"]),
            "--num-rounds", str(w["num_rounds"]), "--question-len", str(w["question_len"]),
            "--answer-len", str(w["answer_len"]),
            "--user-request-interval", str(w["user_request_interval"]), "--seed", "1",
            "--output", str(out)]  # fmt: skip
    load_start = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - start
    cpu_end = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU time is the figure other work on a shared machine disturbs least; the load average
    # says how shared it was
    cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    print(done.stdout, flush=True)
    result = json.loads(out.read_text())
    run = result["runs"][0]
    run.pop("per_replica")
    return {"wall_s": wall, "cpu_s": cpu, "load_average_1min_at_start": load_start,
            "load_average_1min_at_end": os.getloadavg()[0],
            "peak_rss_mib": result["peak_rss_mib"], **run}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=3600.0)
    parser.add_argument("--busy", type=float, default=0.7)
    parser.add_argument("--probe-replicas", type=int, default=20)
    parser.add_argument("--rate-per-replica", type=float, default=None,
                        help="skip the search: users/s per replica")  # fmt: skip
    parser.add_argument("--logics", default=",".join(LOGICS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.rate_per_replica is None:
        rate, busy = find_rate(args.busy, args.probe_replicas)
        print(f"{rate:.5f} users/s per replica -> {busy:.2f} busy on {args.probe_replicas} "
              "replicas", flush=True)  # fmt: skip
    else:
        # the probe's figure at this rate (a few seconds), so the result reads as a searched one
        rate, busy = args.rate_per_replica, busy_at(args.rate_per_replica, args.probe_replicas)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for logic in args.logics.split(","):
            runs[logic] = run_logic(logic, args.replicas, rate * args.replicas, args.duration,
                                    Path(tmp))  # fmt: skip
            r = runs[logic]
            print(
                f"== {logic}: wall {r['wall_s']:.0f} s, CPU {r['cpu_s']:.0f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                f"{r['completed']} requests, busy {r['replica_busy']['mean']:.2f}",
                flush=True,
            )
    print(f"\n{'logic':<13} {'wall s':>7} {'CPU s':>7} {'RSS MiB':>8} {'requests':>9} {'busy':>5} "
          f"{'TTFT p50':>9} {'TTFT p90':>9} {'ITL p50':>8} {'hit rate':>8}")  # fmt: skip
    for logic, r in runs.items():
        print(f"{logic:<13} {r['wall_s']:>7.0f} {r['cpu_s']:>7.0f} {r['peak_rss_mib']:>8.0f} {r['completed']:>9} "
              f"{r['replica_busy']['mean']:>5.2f} {r['p50_ttft_ms']:>9.0f} "
              f"{r['p90_ttft_ms']:>9.0f} {r['p50_itl_ms']:>8.1f} "
              f"{r['prefix_cache_hit_rate']:>8.3f}")  # fmt: skip
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"sim_scale_h100_{args.replicas}.json")
    out.write_text(json.dumps({
        "benchmark": "sim_scale",
        "machine": cpu_machine_info("cpu", engines="none: simulated"),
        "replicas": args.replicas, "duration_s": args.duration, "workload": WORKLOAD,
        "users_per_s": rate * args.replicas, "probe_busy": busy, "runs": runs,
    }, indent=2) + "\n")  # fmt: skip
    print(f"written {out}")


if __name__ == "__main__":
    main()
