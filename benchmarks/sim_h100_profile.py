"""Derive the simulator's H100 profile (Llama-3-8B shape, bf16) from our H100 measurements.

    python benchmarks/sim_h100_profile.py

No H100 is needed: every coefficient comes from a result already measured on one, and the
profile records which (its `sources`):
  per_context_token_s  batch-1 decode: 5714 us/step at ~256 tokens of context
                       (results/decode_step_breakdown_h100.json) vs 162.7 tok/s after 7,600
                       prompt tokens (../shared/DESIGN.md section 9, 2026-12-06)
  base_s, per_token_s  that batch-1 step, and one uncached 8,000-token prefill, 231 ms median
                       (results/kv_offload_bench_h100_first_version.json, tier off)
  per_row_s            the only free one left: chosen (bisection) so that the simulated
                       `bench throughput` 1000 x (256 in, 256 out) on one engine takes what it
                       took, 22.04 s (results/gpu_fast_path_throughput_h100_run3.json)
  num_gpu_blocks, cold_start_s   the fresh-machine cold start's log: 26,494 blocks, first token
                       27.2 s after launch (results/gpu_cold_start_h100_fresh_machine.json)
  request_overhead_s   the kv-aware router's end-to-end overhead p50, 2.06 ms
                       (results/kv_aware_routing_cpu.json; the engine's own HTTP path is in
                       the TTFTs above only where they were served)
Then a check it was not fitted to: the multi-round-qa serve run of
results/kv_offload_serve_h100.json (tier off), simulated with the same workload; printed and
stored under `checks`. Writes lmserve/sim/profiles/h100-llama3-8b.json.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from lmserve.sim.cluster import Cluster, SimConfig
from lmserve.sim.profile import StepProfile
from lmserve.sim.report import summarize
from lmserve.sim.workload import WorkloadSpec

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "lmserve" / "sim" / "profiles" / "h100-llama3-8b.json"
DESIGN_DECODE_AFTER_7600_TOK_S = 162.7  # ../shared/DESIGN.md section 9
SHORT_CONTEXT = 256  # decode_step_breakdown: a 128-token prompt, then the timed decode


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def measured() -> dict:
    step = load("decode_step_breakdown_h100.json")["shapes"]["8b"]["step_us"] / 1e6
    prefill = load("kv_offload_bench_h100_first_version.json")
    cold = load("gpu_cold_start_h100_fresh_machine.json")["cold_start_8b_serve"]
    blocks = next(
        int(m.group(1)) for line in cold["log"] if (m := re.search(r"KV cache: (\d+) blocks", line))
    )
    throughput = load("gpu_fast_path_throughput_h100_run3.json")["throughput_8b_256_256"]
    overhead = load("kv_aware_routing_cpu.json")["results"]["router_overhead"]["kv-aware"]
    return {
        "decode_step_s": step,
        "prefill_len": prefill["prompt_len"],
        "prefill_s": prefill["ttft_tier_off"]["median_computed_s"],
        "num_gpu_blocks": blocks,
        "cold_start_s": cold["first_token_s"],
        "throughput_elapsed_s": throughput["lmserve"]["elapsed_time"],
        "request_overhead_s": overhead["end_to_end_overhead_p50_ms"] / 1000,
    }


def profile_for(m: dict, per_row: float) -> StepProfile:
    ctx = (1 / DESIGN_DECODE_AFTER_7600_TOK_S - m["decode_step_s"]) / (7600 - SHORT_CONTEXT)
    # decode, 1 row: base + row + ctx * short;  prefill of L tokens: base + (tok + ctx) * L
    n = m["prefill_len"]
    base = m["decode_step_s"] - per_row - ctx * SHORT_CONTEXT
    per_token = (m["prefill_s"] - base - ctx * n) / n
    return StepProfile(
        name="h100-llama3-8b",
        base_s=base,
        per_token_s=per_token,
        per_row_s=per_row,
        per_context_token_s=ctx,
        max_num_batched_tokens=8192,
        max_num_seqs=256,
        num_gpu_blocks=m["num_gpu_blocks"],
        request_overhead_s=m["request_overhead_s"],
        cold_start_s=m["cold_start_s"],
    )


def simulated_throughput_s(profile: StepProfile) -> float:
    spec = WorkloadSpec("random", request_rate=math.inf, num_prompts=1000, input_len=256,
                        output_len=256, seed=3)  # fmt: skip
    cluster = Cluster(SimConfig("roundrobin", replicas=1), profile.with_overrides(
        request_overhead_s=0.0), spec).run()  # fmt: skip
    return cluster.end_s


def fit_per_row(m: dict) -> float:
    low, high = 0.0, 1e-4
    for _ in range(30):
        mid = (low + high) / 2
        if simulated_throughput_s(profile_for(m, mid)) < m["throughput_elapsed_s"]:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def check_multi_round(profile: StepProfile) -> dict:
    """results/kv_offload_serve_h100.json, tier off: measured vs simulated."""
    data = load("kv_offload_serve_h100.json")
    w, real = data["workload"], data["tier_off"]
    spec = WorkloadSpec("multi-round-qa", request_rate=math.inf, num_users=w["num_users"],
                        num_rounds=w["num_rounds"], system_prompt_len=w["system_prompt_len"],
                        question_len=w["question_len"], answer_len=w["answer_len"],
                        max_concurrency=w["max_concurrency"], seed=0)  # fmt: skip
    cluster = Cluster(SimConfig("roundrobin", replicas=1),
                      profile.with_overrides(num_gpu_blocks=w["num_gpu_blocks"]), spec).run()  # fmt: skip
    sim = summarize(cluster)
    keys = ("p50_ttft_ms", "p90_ttft_ms", "mean_itl_ms", "output_throughput")
    return {
        "source": "results/kv_offload_serve_h100.json tier_off (multi-round-qa, 1 engine)",
        "measured": {k: real[k] for k in keys},
        "simulated": {k: sim[k] for k in keys},
    }


def main() -> None:
    m = measured()
    per_row = fit_per_row(m)
    profile = profile_for(m, per_row)
    sources = {
        "per_context_token_s": "(1/162.7 tok/s [DESIGN.md s9, batch-1 decode after 7,600 "
        "prompt tokens] - 5714 us [decode_step_breakdown_h100.json, 8b step_us, ~256 context])"
        " / (7600 - 256)",
        "base_s": "decode_step_breakdown_h100.json 8b step_us (batch-1 decode step, 5714 us) "
        "less one row and its context",
        "per_token_s": f"kv_offload_bench_h100_first_version.json: uncached {m['prefill_len']}-"
        f"token prefill {m['prefill_s'] * 1000:.1f} ms (median, tier off), one step",
        "per_row_s": "bisection: simulated `bench throughput` 1000 x (256, 256) on one engine "
        f"takes {m['throughput_elapsed_s']:.2f} s as measured "
        "(gpu_fast_path_throughput_h100_run3.json)",
        "num_gpu_blocks": "gpu_cold_start_h100_fresh_machine.json log (KV cache blocks)",
        "cold_start_s": "gpu_cold_start_h100_fresh_machine.json first_token_s (launch -> first "
        "token, fresh machine)",
        "request_overhead_s": "kv_aware_routing_cpu.json router_overhead kv-aware "
        "end_to_end_overhead_p50_ms (the router hop)",
        "max_num_batched_tokens": "SchedulerConfig default with chunked prefill (8192)",
        "max_num_seqs": "SchedulerConfig default (256; the log's graphs cover batch 1..256)",
    }
    profile = profile.with_overrides(sources=sources)
    check = check_multi_round(profile)
    data = profile.to_json()
    data["checks"] = [check]
    data["simulated_throughput_elapsed_s"] = simulated_throughput_s(profile)
    OUT.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2))
    print(f"written {OUT}")


if __name__ == "__main__":
    main()
