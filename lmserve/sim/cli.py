"""`lmserve simulate`: a cluster of simulated engines behind the real router's code.

    lmserve simulate --profile h100-llama3-8b --replicas 8 \\
        --routing-logic roundrobin,prefix-aware,kv-aware \\
        --dataset-name multi-round-qa --request-rate 10 --duration 600 --output sim.json --plot sim.png
    lmserve simulate --target-ttft-p90 1.0 ...      the fewest replicas meeting the target
    lmserve simulate --autoscale keda ...           the Helm chart's rule picks the replicas
    lmserve simulate calibrate --results a.json b.json --out profile.json

Workload flags are `lmserve bench serve`'s (multi-round-qa: --request-rate is users per second;
each user sends --num-rounds requests). `calibrate` fits a profile from `lmserve bench latency`
or `bench serve` result files (see lmserve/sim/profile.py).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmserve.router.routing import ROUTING_LOGICS

DEFAULT_PROFILE = "h100-llama3-8b"


def init_simulate_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", nargs="?", choices=("run", "calibrate"), default="run",
                        help="run a simulation (default) or fit a profile")  # fmt: skip
    cal = parser.add_argument_group("calibrate")
    cal.add_argument("--results", nargs="+", default=[], metavar="JSON",
                     help="`lmserve bench latency --output-json` / `bench serve --save-result` "
                     "files to fit")  # fmt: skip
    cal.add_argument("--out", default=None, help="where to write the fitted profile")
    cal.add_argument("--name", default="calibrated", help="the fitted profile's name")
    cal.add_argument("--engines", type=int, default=1,
                     help="the `bench serve` results went through a round-robin router to this "
                     "many engines")  # fmt: skip
    eng = parser.add_argument_group("engines")
    eng.add_argument("--profile", default=DEFAULT_PROFILE,
                     help="built-in profile (h100-llama3-8b, cpu-tiny-llama) or a profile JSON")  # fmt: skip
    eng.add_argument(
        "--replicas", type=int, default=4, help="engines (the start, with --autoscale)"
    )
    eng.add_argument("--num-gpu-blocks", type=int, default=None)
    eng.add_argument("--max-num-seqs", type=int, default=None)
    eng.add_argument("--max-num-batched-tokens", type=int, default=None)
    eng.add_argument("--block-size", type=int, default=None)
    rt = parser.add_argument_group("router")
    rt.add_argument("--routing-logic", default="roundrobin",
                    help=f"comma-separated, each run on its own: {', '.join(ROUTING_LOGICS)}, "
                    "or all")  # fmt: skip
    rt.add_argument("--health-check-interval", type=float, default=None,
                    help="seconds between load scrapes (the router's default)")  # fmt: skip
    scale = parser.add_argument_group("autoscaling")
    scale.add_argument("--autoscale", choices=("off", "keda", "hpa"), default="off")
    scale.add_argument("--helm-values", default=None,
                       help="the chart's values.yaml (default: deploy/helm/lmserve/values.yaml "
                       "if present, else the chart's defaults)")  # fmt: skip
    scale.add_argument("--min-replicas", type=int, default=None)
    scale.add_argument("--max-replicas", type=int, default=None)
    scale.add_argument("--target-ttft-p90", type=float, default=None, metavar="SECONDS",
                       help="search the fewest replicas (up to --max-replicas, default 64) "
                       "whose TTFT p90 meets this, per routing logic")  # fmt: skip
    wl = parser.add_argument_group("workload")
    wl.add_argument("--dataset-name", default="multi-round-qa",
                    choices=("random", "prefix-repetition", "multi-round-qa", "trace"))  # fmt: skip
    wl.add_argument("--trace", default=None, help="trace file (JSON lines or CSV)")
    wl.add_argument("--request-rate", type=float, default=1.0,
                    help="arrivals per second (multi-round-qa: users per second)")  # fmt: skip
    wl.add_argument("--burstiness", type=float, default=1.0)
    wl.add_argument("--duration", type=float, default=None, help="simulated seconds of arrivals")
    wl.add_argument("--num-prompts", type=int, default=1000)
    wl.add_argument("--input-len", type=int, default=1024)
    wl.add_argument("--output-len", type=int, default=128)
    wl.add_argument("--prefix-len", type=int, default=256)
    wl.add_argument("--suffix-len", type=int, default=256)
    wl.add_argument("--num-prefixes", type=int, default=10)
    wl.add_argument("--num-users", type=int, default=10)
    wl.add_argument("--num-rounds", type=int, default=5)
    wl.add_argument("--system-prompt-len", type=int, default=1000)
    wl.add_argument("--num-system-prompts", type=int, default=1)
    wl.add_argument("--question-len", type=int, default=100)
    wl.add_argument("--answer-len", type=int, default=100)
    wl.add_argument("--user-request-interval", type=float, default=0.0,
                    help="seconds between a user's answer and its next question")  # fmt: skip
    wl.add_argument("--max-concurrency", type=int, default=None)
    wl.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--warmup", type=float, default=0.0,
                     help="leave requests sent in the first SECONDS out of the figures")  # fmt: skip
    out.add_argument("--max-sim-time", type=float, default=None, help="stop at this simulated time")
    out.add_argument("--output", default=None, help="write the results JSON here")
    out.add_argument("--plot", default=None, help="write a PNG plot here (needs matplotlib)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.mode == "calibrate":
        return calibrate(args)
    if args.plot:
        _require_matplotlib()
    logics = _logics(args.routing_logic)
    runs = []
    started = time.perf_counter()
    for logic in logics:
        t0 = time.perf_counter()
        if args.target_ttft_p90 is not None:
            summary = search_replicas(args, logic)
        else:
            summary = simulate(args, logic, args.replicas)
        summary["wall_s"] = time.perf_counter() - t0
        from lmserve.sim.report import format_summary

        print(format_summary(summary), flush=True)
        print(f"  simulated in {summary['wall_s']:.1f} s", flush=True)
        runs.append(summary)
    result = {
        "profile": _profile(args).to_json(),
        "workload": asdict(_workload(args)),
        "autoscale": args.autoscale,
        "runs": runs,
        "wall_s": time.perf_counter() - started,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if len(runs) > 1:
        print(format_table(runs))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
        print(f"results written to {args.output}")
    if args.plot:
        from lmserve.sim.report import plot

        plot(runs, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def simulate(args: argparse.Namespace, logic: str, replicas: int) -> dict[str, Any]:
    from lmserve.sim.cluster import Cluster, SimConfig, default_router_config
    from lmserve.sim.report import summarize

    router = default_router_config(
        **({"health_check_interval": args.health_check_interval}
           if args.health_check_interval else {})
    )  # fmt: skip
    config = SimConfig(
        routing_logic=logic,
        replicas=replicas,
        router=router,
        autoscale=_autoscale(args),
        max_sim_s=args.max_sim_time,
        warmup_s=args.warmup,
    )
    cluster = Cluster(config, _profile(args), _workload(args)).run()
    summary = summarize(cluster)
    summary["replicas"] = replicas
    return summary


def search_replicas(args: argparse.Namespace, logic: str) -> dict[str, Any]:
    """The fewest replicas whose TTFT p90 <= the target (bisection; latency falls as replicas
    are added), with every size tried recorded under `tried`."""
    target_ms = 1000 * args.target_ttft_p90
    tried: dict[int, float] = {}

    def p90(n: int) -> dict[str, Any]:
        s = simulate(args, logic, n)
        tried[n] = s.get("p90_ttft_ms", math.inf)
        print(f"  {logic}: {n} replicas -> TTFT p90 {tried[n]:.0f} ms", flush=True)
        return s

    high = args.max_replicas or 64
    best = p90(high)
    if tried[high] > target_ms:
        best["meets_target"] = False
        best["tried"] = tried
        return best
    low = 0  # known not to meet it (no replica serves nothing)
    while high - low > 1:
        mid = (low + high) // 2
        s = p90(mid)
        if tried[mid] <= target_ms:
            high, best = mid, s
        else:
            low = mid
    best["meets_target"] = True
    best["tried"] = dict(sorted(tried.items()))
    return best


def calibrate(args: argparse.Namespace) -> int:
    from lmserve.sim.profile import fit_profile

    if not args.results or not args.out:
        raise ValueError("lmserve simulate calibrate needs --results FILE... and --out PATH")
    results = [(Path(p).name, json.loads(Path(p).read_text())) for p in args.results]
    limits = {
        k: v
        for k, v in (("num_gpu_blocks", args.num_gpu_blocks), ("max_num_seqs", args.max_num_seqs),
                     ("max_num_batched_tokens", args.max_num_batched_tokens))
        if v is not None
    }  # fmt: skip
    profile = fit_profile(results, args.name, engines=args.engines, **limits)
    profile.save(args.out)
    print(json.dumps(profile.to_json(), indent=2))
    print(f"profile written to {args.out}")
    return 0


# ---- helpers ---------------------------------------------------------------------------------
def _logics(text: str) -> list[str]:
    logics = list(ROUTING_LOGICS) if text == "all" else [t.strip() for t in text.split(",")]
    for logic in logics:
        if logic not in ROUTING_LOGICS:
            raise ValueError(f"--routing-logic {logic!r}: choose from {', '.join(ROUTING_LOGICS)}")
    return logics


def _profile(args: argparse.Namespace):
    from lmserve.sim.profile import load_profile

    return load_profile(args.profile).with_overrides(
        num_gpu_blocks=args.num_gpu_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
    )


def _workload(args: argparse.Namespace):
    from lmserve.sim.workload import WorkloadSpec

    return WorkloadSpec(
        name=args.dataset_name,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        duration_s=args.duration,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        prefix_len=args.prefix_len,
        suffix_len=args.suffix_len,
        num_prefixes=args.num_prefixes,
        num_users=args.num_users,
        num_rounds=args.num_rounds,
        system_prompt_len=args.system_prompt_len,
        num_system_prompts=args.num_system_prompts,
        question_len=args.question_len,
        answer_len=args.answer_len,
        think_s=args.user_request_interval,
        max_concurrency=args.max_concurrency,
        trace_path=args.trace,
        seed=args.seed,
    )


def _autoscale(args: argparse.Namespace):
    if args.autoscale == "off":
        return None
    from lmserve.sim.autoscale import CHART_VALUES, AutoscalePolicy

    bounds = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas}
    path = Path(args.helm_values) if args.helm_values else CHART_VALUES
    if path.is_file():
        return AutoscalePolicy.from_chart(path, args.autoscale, **bounds)
    if args.helm_values:
        raise ValueError(f"--helm-values {args.helm_values!r} is not a file")
    defaults = AutoscalePolicy()
    return AutoscalePolicy(
        args.autoscale, defaults.target_waiting, defaults.polling_interval_s,
        defaults.scale_down_window_s if args.autoscale == "keda" else 360.0,
        args.min_replicas or defaults.min_replicas, args.max_replicas or defaults.max_replicas,
    )  # fmt: skip


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None


def format_table(runs: list[dict[str, Any]]) -> str:
    head = (f"{'logic':<13} {'replicas':>8} {'TTFT p50':>9} {'TTFT p90':>9} {'TTFT p99':>9} "
            f"{'ITL p50':>8} {'req/s':>8} {'hit rate':>8} {'busy':>5} {'GPU-h':>8}")  # fmt: skip
    lines = [head]
    for r in runs:
        lines.append(
            f"{r['routing_logic']:<13} {r['replicas']:>8} {r.get('p50_ttft_ms', 0):>9.0f} "
            f"{r.get('p90_ttft_ms', 0):>9.0f} {r.get('p99_ttft_ms', 0):>9.0f} "
            f"{r.get('p50_itl_ms', 0):>8.1f} {r['request_throughput']:>8.1f} "
            f"{r['prefix_cache_hit_rate']:>8.3f} {r['replica_busy']['mean']:>5.2f} "
            f"{r['gpu_hours']:>8.1f}"
        )  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="lmserve simulate")
    init_simulate_parser(parser)
    sys.exit(parser.parse_args().func(parser.parse_args()))
