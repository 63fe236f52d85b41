"""CPU cost of one scheduler step at full decode: `schedule()` and `update_from_output()`.

Fills a Scheduler with N running requests (default 256, 512-token prompts, already prefilled,
max_tokens large so none finishes), then times ~500 decode steps with a fake model runner. The
fake runner's output is built between the two calls and is *not* timed. Prints a table (mean,
p50, p99, max in ms) and writes JSON.

This is a CPU-only measurement of scheduler bookkeeping (no model, no GPU); it never asserts on
time. Run from the repository root:

    python benchmarks/scheduler_microbench.py            # the default workload
    python benchmarks/scheduler_microbench.py --profile  # plus a cProfile of the timed steps
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_machine_info

from lmserve.config import CacheConfig, SchedulerConfig  # noqa: E402
from lmserve.core.sched_output import ModelRunnerOutput, SchedulerOutput  # noqa: E402
from lmserve.core.scheduler import Scheduler  # noqa: E402
from lmserve.request import Request  # noqa: E402
from lmserve.sampling_params import SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "scheduler_microbench_cpu.json"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument(
        "--prompt-len-jitter",
        type=int,
        default=0,
        help="prompt lengths uniform in [prompt-len - j, prompt-len + j]; 0 puts every request "
        "on the same block boundary (all allocate and hash a block in the same step)",
    )
    p.add_argument("--shared-prefix-len", type=int, default=128, help="system prompt, cached")
    p.add_argument("--steps", type=int, default=500, help="timed decode steps")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--hash-algo", default="sha256", choices=["sha256", "xxhash"])
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--disable-gc", action="store_true", help="gc.disable() while timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="cProfile the timed steps (slower)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def fake_runner_output(scheduler: Scheduler, out: SchedulerOutput) -> ModelRunnerOutput:
    """One sampled token for every request whose known tokens are all computed, [] otherwise."""
    req_ids = list(out.num_scheduled_tokens)
    sampled = []
    for req_id in req_ids:
        request = scheduler.requests[req_id]
        done = request.num_computed_tokens >= request.num_tokens
        sampled.append([1000 + request.num_output_tokens % 30000] if done else [])
    return ModelRunnerOutput(req_ids, {r: i for i, r in enumerate(req_ids)}, sampled)


def build_scheduler(args: argparse.Namespace) -> Scheduler:
    rng = random.Random(args.seed)
    max_len = args.prompt_len + args.prompt_len_jitter + args.warmup_steps + args.steps + 64
    blocks_per_request = -(-max_len // args.block_size)
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=args.num_requests,
            max_num_batched_tokens=8192,
            max_model_len=max_len,
        ),
        CacheConfig(
            block_size=args.block_size,
            enable_prefix_caching=not args.no_prefix_caching,
            prefix_caching_hash_algo=args.hash_algo,
        ),
        num_gpu_blocks=args.num_requests * blocks_per_request + 64,  # never preempts
    )
    shared = [rng.randrange(3, 32000) for _ in range(args.shared_prefix_len)]
    for i in range(args.num_requests):
        jitter = rng.randint(-args.prompt_len_jitter, args.prompt_len_jitter)
        own = [rng.randrange(3, 32000) for _ in range(args.prompt_len + jitter - len(shared))]
        params = SamplingParams(max_tokens=1_000_000, ignore_eos=True)
        scheduler.add_request(Request(f"req-{i}", shared + own, params, eos_token_id=2))
    return scheduler


def prefill(scheduler: Scheduler) -> int:
    """Run (untimed) until every request has its first token and decodes one token a step."""
    steps = 0
    while any(r.num_output_tokens == 0 for r in scheduler.requests.values()):
        out = scheduler.schedule()
        scheduler.update_from_output(out, fake_runner_output(scheduler, out))
        steps += 1
    return steps


def timed_steps(scheduler: Scheduler, num_steps: int, num_requests: int) -> dict[str, list[int]]:
    """Per step: thread CPU time and wall time (ns) of schedule() and of update_from_output()."""
    times: dict[str, list[int]] = {
        k: [] for k in ("sched_cpu", "upd_cpu", "sched_wall", "upd_wall")
    }
    cpu, wall = time.thread_time_ns, time.perf_counter_ns
    for _ in range(num_steps):
        c0, w0 = cpu(), wall()
        out = scheduler.schedule()
        c1, w1 = cpu(), wall()
        runner_output = fake_runner_output(scheduler, out)  # not timed
        c2, w2 = cpu(), wall()
        scheduler.update_from_output(out, runner_output)
        c3, w3 = cpu(), wall()
        if len(out.num_scheduled_tokens) != num_requests or out.total_num_scheduled_tokens != (
            num_requests
        ):
            raise RuntimeError("not a full decode step: the workload is misconfigured")
        times["sched_cpu"].append(c1 - c0)
        times["upd_cpu"].append(c3 - c2)
        times["sched_wall"].append(w1 - w0)
        times["upd_wall"].append(w3 - w2)
    return times


def summarize(ns: list[int]) -> dict[str, float]:
    ms = sorted(t / 1e6 for t in ns)

    def pct(q: float) -> float:
        return ms[min(len(ms) - 1, round(q * (len(ms) - 1)))]

    return {
        "mean_ms": statistics.fmean(ms),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "min_ms": ms[0],
        "max_ms": ms[-1],
    }


def machine_info() -> dict[str, object]:
    return cpu_machine_info("cpu (no accelerator involved: scheduler bookkeeping only)")


def main() -> None:
    args = parse_args()
    scheduler = build_scheduler(args)
    num_prefill_steps = prefill(scheduler)
    timed_steps(scheduler, args.warmup_steps, args.num_requests)

    gc.collect()
    if args.disable_gc:
        gc.disable()
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    times = timed_steps(scheduler, args.steps, args.num_requests)
    if profiler:
        profiler.disable()
    gc.enable()

    total_cpu = [s + u for s, u in zip(times["sched_cpu"], times["upd_cpu"], strict=True)]
    total_wall = [s + u for s, u in zip(times["sched_wall"], times["upd_wall"], strict=True)]
    rows = {
        "schedule()": summarize(times["sched_cpu"]),
        "update_from_output()": summarize(times["upd_cpu"]),
        "schedule()+update_from_output()": summarize(total_cpu),
        "schedule()+update (wall)": summarize(total_wall),
    }
    stats = scheduler.kv_cache_manager.prefix_cache_stats

    print(
        f"\nscheduler microbench (CPU): {args.num_requests} running requests, "
        f"prompt {args.prompt_len}±{args.prompt_len_jitter}, block_size {args.block_size}, "
        f"prefix caching {'off' if args.no_prefix_caching else 'on (' + args.hash_algo + ')'}, "
        f"{args.steps} timed decode steps{' (cProfile on)' if profiler else ''}"
    )
    print(f"{'per step, thread CPU time':34s} {'mean':>8s} {'p50':>8s} {'p99':>8s} {'max':>8s}  ms")
    for name, s in rows.items():
        print(
            f"{name:34s} {s['mean_ms']:8.3f} {s['p50_ms']:8.3f} {s['p99_ms']:8.3f} "
            f"{s['max_ms']:8.3f}"
        )
    per_req_us = rows["schedule()+update_from_output()"]["mean_ms"] * 1e3 / args.num_requests
    print(f"= {per_req_us:.2f} us per running request per step (mean)")

    result = {
        "benchmark": "scheduler_microbench",
        "measurement": "CPU: thread CPU time (time.thread_time_ns) per decode step; "
        "wall time (perf_counter_ns) in the '(wall)' row; fake runner output not timed",
        "machine": machine_info(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "profile")},
        "num_prefill_steps": num_prefill_steps,
        "results_ms": rows,
        "us_per_request_per_step": per_req_us,
        "prefix_cache": {"queries": stats.queries, "hits": stats.hits, "hit_rate": stats.hit_rate},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if not args.profile:  # a profiled run's timings are inflated: don't overwrite the results
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    else:
        print("\ncProfile of the timed steps (fake runner included), by own time:")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
