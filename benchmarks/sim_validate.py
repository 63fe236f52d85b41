"""The simulator against a real cluster: 4 CPU engines + `lmserve router`, driven by
`lmserve bench serve`, then the same workload in `lmserve simulate` with a CPU profile.

    python benchmarks/sim_validate.py [--quick] [--calibrate] [--logics roundrobin,kv-aware]

1. Calibrate (with --calibrate, or when the profile file is missing), on random prompts (no
   shared prefix), never the validation's workload: `lmserve bench latency` (one engine
   in-process, one thread; batches of 1-16 prompts of 64-1,024 tokens) times exact prefill
   and decode steps; `lmserve bench serve` through a router to one engine at concurrency 1
   adds the request overhead; the fit `lmserve simulate calibrate` does gives the coefficients. The
   same through a round-robin router over all 4 at 4, 8, 16 gives `host_cores`, the cores the
   engines' steps effectively share on this machine. Written to
   lmserve/sim/profiles/cpu-tiny-llama.json.
2. For each routing logic: the real run (a fresh router in front of the same 4 engines, the
   multi-round-qa workload of `lmserve bench serve`, completions endpoint, ignore_eos; the
   engines' summed prefix-cache counters before/after give the hit rate), then the simulated
   run of the same workload with the profile, the same KV pool per engine and the router's
   defaults. Every real run uses a fresh seed, so no run finds another's prefixes.
Engines and router come from benchmarks/kv_aware_routing.py (a random Llama 4x256 with a
word-level tokenizer: one token per word, so lengths are exact).

Prints real vs simulated TTFT p50/p90, output tok/s and hit rate per logic, with the
relative differences; writes benchmarks/results/sim_validate_cpu.json. Never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kv_aware_routing as kvr  # noqa: E402
from machine import cpu_machine_info  # noqa: E402

from lmserve.sim.cluster import Cluster, SimConfig  # noqa: E402
from lmserve.sim.profile import fit_profile, load_profile  # noqa: E402
from lmserve.sim.report import summarize  # noqa: E402
from lmserve.sim.workload import WorkloadSpec  # noqa: E402
from tests.entrypoints.openai.conftest import API_KEY, MODEL_NAME  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULT_PATH = ROOT / "benchmarks" / "results" / "sim_validate_cpu.json"
PROFILE_PATH = ROOT / "lmserve" / "sim" / "profiles" / "cpu-tiny-llama.json"
LOGICS = ("roundrobin", "prefix-aware", "kv-aware")
ENGINE_ENV = {"OMP_NUM_THREADS": "1", "LMSERVE_ENABLE_MULTIPROCESSING": "1"}


def workload(quick: bool) -> dict:
    """multi-round-qa: users arrive at `rate`/s, each asks `rounds` questions in turn over one
    shared system prompt; `blocks` KV blocks per engine (a user's history fits several times,
    every user's history does not: where a user's rounds land decides its hits)."""
    if quick:
        return dict(users=16, rounds=3, system=128, question=48, answer=16, rate=4.0,
                    concurrency=8, blocks=96)  # fmt: skip
    return dict(users=32, rounds=4, system=256, question=64, answer=24, rate=3.0,
                concurrency=16, blocks=160)  # fmt: skip


def bench_serve(base_url: str, model: str, out: Path, *flags: str) -> dict:
    """`lmserve bench serve` in its own process (as a user runs it); its result JSON."""
    args = [sys.executable, "-m", "lmserve.bench.cli", "serve", "--base-url", base_url,
            "--endpoint", "/v1/completions", "--model", MODEL_NAME, "--tokenizer", model,
            "--api-key", API_KEY, "--ignore-eos", "--disable-tqdm",
            "--metric-percentiles", "50,90,99", "--save-result", str(out), *flags]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench serve failed: {done.stderr[-2000:]}")
    return json.loads(out.read_text())


# ---- 1. calibration ----------------------------------------------------------------------------
# `lmserve bench latency` (one engine in-process, one thread, as each served engine has): the
# exact step shapes (batch x prompt length), so the fit sees a decode step of B rows at a known
# context and a prefill of B x n tokens; prompts from 64 to 1,024 tokens separate the
# prefill's attention (pairs) from its per-token cost.
LATENCY_GRID = (  # (batch, input len)
    (1, 64), (1, 256), (1, 1024), (2, 128), (2, 512), (4, 128), (4, 512), (8, 128), (8, 512),
    (16, 256),
)  # fmt: skip
# Served at concurrency 1 through a router to one engine, as the validation's requests go:
# TTFT = the request overhead (the client's and the router's HTTP hops, tokenizing, the first
# token's way back) + one prefill the latency runs already time.
ONE_ENGINE = ((1, 64, 24, 12), (1, 256, 24, 12))  # (max concurrency, input, output, prompts)


CLUSTER = ((4, 128, 24, 32), (8, 128, 24, 48), (16, 128, 24, 64))  # through a round-robin router
HOST_CORES = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)


def sweep(url: str, model: str, runs, tmp: Path, tag: str) -> list[tuple[str, dict, tuple]]:
    found = []
    for i, (c, n_in, n_out, n) in enumerate(runs):
        seed = 40 + i + (100 if tag == "cluster" else 0)
        result = bench_serve(url, model, tmp / f"calibrate-{tag}-{i}.json", "--dataset-name",
                             "random", "--input-len", str(n_in), "--output-len", str(n_out),
                             "--num-prompts", str(n), "--max-concurrency", str(c),
                             "--request-rate", "inf", "--seed", str(seed))  # fmt: skip
        found.append((f"bench serve random c={c} in={n_in} out={n_out} ({tag})", result,
                      (c, n_in, n_out, n, seed)))  # fmt: skip
        print(f"calibration {tag} c={c} in={n_in}: TTFT p50 {result['median_ttft_ms']:.1f} ms, "
              f"ITL p50 {result['median_itl_ms']:.2f} ms", flush=True)  # fmt: skip
    return found


def bench_latency(model: str, batch: int, n_in: int, tmp: Path) -> tuple[str, dict]:
    """`lmserve bench latency` in its own process, one thread (as the engines run)."""
    out = tmp / f"latency-{batch}-{n_in}.json"
    args = [sys.executable, "-m", "lmserve.bench.cli", "latency", model, "--device", "cpu",
            "--dtype", "float32", "--batch-size", str(batch), "--input-len", str(n_in),
            "--output-len", "24", "--num-iters", "5", "--num-iters-warmup", "2",
            "--temperature", "0", "--num-gpu-blocks-override", "1024", "--max-model-len", "2048",
            "--disable-tqdm", "--output-json", str(out)]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **ENGINE_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"bench latency failed: {done.stderr[-2000:]}")
    result = json.loads(out.read_text())
    print(f"calibration latency batch={batch} in={n_in}: prefill {1000 * result['avg_ttft']:.1f} "
          f"ms, decode step {1000 * result['avg_decode_step_latency']:.2f} ms", flush=True)  # fmt: skip
    return f"bench latency batch={batch} in={n_in} out=24 (in-process, 1 thread)", result


def calibrate(engines, model: str, blocks: int, tmp: Path) -> dict:
    """Random prompts (no prefix shared), never the validation's workload:
    1. `bench latency` runs (exact steps) and served requests one at a time through a router
       to one engine (the other three idle): the step-time coefficients and the per-request
       overhead (`lmserve simulate calibrate` on those results);
    2. through a round-robin router over all four: every engine steps at once on this 2-core
       machine next to four API servers, the router and the client. `host_cores` (the cores
       engine steps effectively get) is the value whose simulation of these runs matches
       their TTFT and ITL medians best."""
    latency = [bench_latency(model, batch, n_in, tmp) for batch, n_in in LATENCY_GRID]
    proc, url = kvr.start_router("roundrobin", engines[:1], model, tmp)
    try:
        single = sweep(url, model, ONE_ENGINE, tmp, "one engine")
    finally:
        kvr.stop(proc)
    proc, url = kvr.start_router("roundrobin", engines, model, tmp)
    try:
        shared = sweep(url, model, CLUSTER, tmp, "cluster")
    finally:
        kvr.stop(proc)
    profile = fit_profile(
        latency + [(name, r) for name, r, _ in single],
        "cpu-tiny-llama",
        num_gpu_blocks=blocks,
        max_num_batched_tokens=8192,
        max_num_seqs=256,
        cold_start_s=_cpu_cold_start(),
    )
    errors = {h: _sharing_error(profile.with_overrides(host_cores=h), shared, len(engines))
              for h in HOST_CORES}  # fmt: skip
    best = min(errors, key=errors.get)
    sources = dict(profile.sources)
    sources["host_cores"] = (
        f"of {HOST_CORES}, the one whose simulation of the 4-engine round-robin sweep "
        f"(random prompts, --max-concurrency 4, 8, 16) fits its TTFT/ITL medians best "
        f"(rms log error {errors[best]:.3f})"
    )
    sources["cold_start_s"] = (
        "benchmarks/results/startup_default_model_cpu.json: second start, process -> first token"
    )
    sources["calibration"] = (
        "benchmarks/sim_validate.py --calibrate: lmserve serve (random Llama 4x256, float32, "
        "1 thread each, --num-gpu-blocks-override as the validation's), lmserve bench serve"
    )
    sources["machine"] = json.dumps(cpu_machine_info("cpu", engines="4 x lmserve serve"))
    profile = profile.with_overrides(host_cores=best, sources=sources)
    profile.save(PROFILE_PATH)
    print(f"host_cores errors {errors}; profile written to {PROFILE_PATH}: "
          f"{json.dumps(profile.to_json())[:400]}")  # fmt: skip
    return {
        "observations": [{"source": name, "median_ttft_ms": r["median_ttft_ms"],
                          "median_itl_ms": r["median_itl_ms"]} for name, r, _ in single + shared]
        + [{"source": name, "avg_ttft_ms": 1000 * r["avg_ttft"],
            "avg_decode_step_ms": 1000 * r["avg_decode_step_latency"]} for name, r in latency],
        "host_cores_rms_log_error": errors,
        "profile": profile.to_json(),
    }  # fmt: skip


def _sharing_error(profile, runs, replicas: int) -> float:
    """rms of log(simulated / measured) over the runs' TTFT and ITL medians."""
    import math

    errs = []
    for _, real, (c, n_in, n_out, n, seed) in runs:
        spec = WorkloadSpec("random", request_rate=math.inf, num_prompts=n, input_len=n_in,
                            output_len=n_out, max_concurrency=c, vocab_size=kvr.VOCAB, seed=seed)  # fmt: skip
        s = summarize(Cluster(SimConfig("roundrobin", replicas=replicas), profile, spec).run())
        errs += [math.log(s["p50_ttft_ms"] / real["median_ttft_ms"]),
                 math.log(s["p50_itl_ms"] / real["median_itl_ms"])]  # fmt: skip
    return math.sqrt(sum(e * e for e in errs) / len(errs))


def _cpu_cold_start() -> float:
    data = json.loads((ROOT / "benchmarks/results/startup_default_model_cpu.json").read_text())
    starts = data["second_starts"]["engine process"]
    return float(starts[0]["process_to_first_token_s"])


# ---- 2. real and simulated runs ----------------------------------------------------------------
def real_run(engines, logic: str, model: str, w: dict, seed: int, tmp: Path) -> dict:
    """`engines`: the router's backends (the other engines of the machine stay idle)."""
    proc, url = kvr.start_router(logic, engines, model, tmp)
    try:
        before = kvr.cache_counters(engines)
        finished_before = _finished_per_engine(engines)
        engine_before = _engine_counters(engines)
        result = bench_serve(url, model, tmp / f"real-{logic}-{seed}.json",
                             "--dataset-name", "multi-round-qa", "--num-users", str(w["users"]),
                             "--num-rounds", str(w["rounds"]),
                             "--system-prompt-len", str(w["system"]),
                             "--question-len", str(w["question"]),
                             "--answer-len", str(w["answer"]),
                             "--request-rate", str(w["rate"]),
                             "--max-concurrency", str(w["concurrency"]), "--seed", str(seed))  # fmt: skip
        after = kvr.cache_counters(engines)
        finished = [b - a for a, b in zip(finished_before, _finished_per_engine(engines))]
        engine = {k: v - engine_before[k] for k, v in _engine_counters(engines).items()}
    finally:
        kvr.stop(proc)
    hits, queries = after[0] - before[0], after[1] - before[1]
    return {
        "ttft_p50_ms": result["p50_ttft_ms"],
        "ttft_p90_ms": result["p90_ttft_ms"],
        "output_tok_s": result["output_throughput"],
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "itl_p50_ms": result["p50_itl_ms"],
        "e2el_p50_ms": result["p50_e2el_ms"],
        "completed": result["completed"],
        "duration_s": result["duration"],
        "requests_per_engine": finished,
        "itl_p90_ms": result["p90_itl_ms"],
        # what the engines' API servers saw (tokens as they arrived from the engine cores),
        # against which the client's figures above include the router's hop and the client
        "engine_itl_mean_ms": 1000 * engine["itl_sum"] / max(engine["itl_count"], 1),
        "engine_ttft_mean_ms": 1000 * engine["ttft_sum"] / max(engine["ttft_count"], 1),
        "engine_steps": engine["steps"],
        "engine_preemptions": engine["preemptions"],
    }


_ENGINE_COUNTERS = {
    "itl_sum": "lmserve:inter_token_latency_seconds_sum",
    "itl_count": "lmserve:inter_token_latency_seconds_count",
    "ttft_sum": "lmserve:time_to_first_token_seconds_sum",
    "ttft_count": "lmserve:time_to_first_token_seconds_count",
    "steps": "lmserve:iteration_tokens_total_count",
    "preemptions": "lmserve:num_preemptions_total",
}


def _engine_counters(engines) -> dict[str, float]:
    return {k: sum(e.metric(name) for e in engines) for k, name in _ENGINE_COUNTERS.items()}


def _finished_per_engine(engines) -> list[int]:
    return [int(e.metric("lmserve:request_success_total")) for e in engines]


def sim_run(
    logic: str, w: dict, seed: int, profile_path: str | Path = PROFILE_PATH, replicas: int = 4
) -> dict:
    profile = load_profile(str(profile_path)).with_overrides(num_gpu_blocks=w["blocks"])
    spec = sim_workload(w, seed)
    start = time.perf_counter()
    cluster = Cluster(SimConfig(logic, replicas=replicas), profile, spec).run()
    s = summarize(cluster)
    return {
        "ttft_p50_ms": s["p50_ttft_ms"],
        "ttft_p90_ms": s["p90_ttft_ms"],
        "output_tok_s": s["output_throughput"],
        "prefix_cache_hit_rate": s["prefix_cache_hit_rate"],
        "itl_p50_ms": s["p50_itl_ms"],
        "e2el_p50_ms": s["p50_e2el_ms"],
        "completed": s["completed"],
        "duration_s": s["duration_s"],
        "requests_per_engine": [r["requests"] for r in s["per_replica"]],
        "itl_p90_ms": s["p90_itl_ms"],
        "wall_s": time.perf_counter() - start,
    }


def sim_workload(w: dict, seed: int) -> WorkloadSpec:
    return WorkloadSpec(
        "multi-round-qa", request_rate=w["rate"], num_users=w["users"], num_rounds=w["rounds"],
        system_prompt_len=w["system"], question_len=w["question"], answer_len=w["answer"],
        max_concurrency=w["concurrency"], vocab_size=kvr.VOCAB, seed=seed,
    )  # fmt: skip


def compare(real: dict, sim: dict) -> dict:
    out = {}
    for key in ("ttft_p50_ms", "ttft_p90_ms", "output_tok_s"):
        out[key] = (sim[key] - real[key]) / real[key] if real[key] else None
    out["prefix_cache_hit_rate_points"] = 100 * (
        sim["prefix_cache_hit_rate"] - real["prefix_cache_hit_rate"]
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller workload")
    parser.add_argument("--calibrate", action="store_true", help="refit the CPU profile first")
    parser.add_argument("--logics", default=",".join(LOGICS))
    parser.add_argument("--repeats", type=int, default=1, help="real runs per logic (median)")
    parser.add_argument("--out", default=str(RESULT_PATH))
    parser.add_argument("--replicas", type=int, default=4,
                        help="engines behind the router (of the 4 started; a probe)")  # fmt: skip
    args = parser.parse_args()
    if not 1 <= args.replicas <= 4:
        parser.error(f"--replicas {args.replicas}: 1 to 4 (the engines this script starts)")
    w = workload(args.quick)
    logics = args.logics.split(",")
    results: dict = {"workload": w, "logics": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = kvr.build_model(tmp / "model")
        engines = kvr.start_engines(model, w["blocks"], tmp)
        try:
            if args.calibrate or not PROFILE_PATH.exists():
                results["calibration"] = calibrate(engines, model, w["blocks"], tmp)
            seed = 500
            for logic in logics:
                reals, sims = [], []
                for _ in range(args.repeats):  # the simulation replays each run's seed
                    seed += 1
                    reals.append(real_run(engines[: args.replicas], logic, model, w, seed, tmp))
                    sims.append(sim_run(logic, w, seed, replicas=args.replicas))
                    print("real", logic, json.dumps(reals[-1]), flush=True)
                    print("sim ", logic, json.dumps(sims[-1]), flush=True)
                real = {k: _median([r[k] for r in reals]) for k in reals[0]}
                sim = {k: _median([r[k] for r in sims]) for k in sims[0]}
                results["logics"][logic] = {"real": real, "sim": sim,
                                            "relative": compare(real, sim), "real_trials": reals,
                                            "sim_trials": sims}  # fmt: skip
        finally:
            for engine in engines:
                engine.stop()
    print_table(results)
    out = {"benchmark": "sim_validate",
           "machine": cpu_machine_info("cpu", engines="4 x lmserve serve (random Llama 4x256, "
                                       "float32, 1 thread each) + lmserve router + lmserve "
                                       "bench serve, all on this machine"),
           "profile": load_profile(str(PROFILE_PATH)).to_json(), "results": results}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {args.out}")


def _median(values: list) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def print_table(results: dict) -> None:
    print(f"\n{'logic':<13} {'':<5} {'TTFT p50':>9} {'TTFT p90':>9} {'out tok/s':>9} "
          f"{'hit rate':>8}")  # fmt: skip
    for logic, r in results["logics"].items():
        for name in ("real", "sim"):
            x = r[name]
            print(f"{logic:<13} {name:<5} {x['ttft_p50_ms']:>9.1f} {x['ttft_p90_ms']:>9.1f} "
                  f"{x['output_tok_s']:>9.1f} {x['prefix_cache_hit_rate']:>8.3f}")  # fmt: skip
        d = r["relative"]
        print(f"{logic:<13} {'diff':<5} {100 * d['ttft_p50_ms']:>+8.0f}% "
              f"{100 * d['ttft_p90_ms']:>+8.0f}% {100 * d['output_tok_s']:>+8.0f}% "
              f"{d['prefix_cache_hit_rate_points']:>+7.1f}pt")  # fmt: skip


if __name__ == "__main__":
    main()
