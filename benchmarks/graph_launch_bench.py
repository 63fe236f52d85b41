"""Host cost of launching one captured CUDA graph: decode graphs and speculative decoding's verify
graphs, at a few batch sizes, with the GPU idle before each launch (as in a step that waited for
the previous one) and with the previous launch still running (as under async scheduling).

    python benchmarks/graph_launch_bench.py --shape 0.5b --out graph_launch.json

For each graph: the host time of `replay()` alone (median and p90 over --repeats launches) and
the GPU time of one replay (CUDA events). Run it with LMSERVE_DISABLE_PDL=1 as well to see what
programmatic dependent launch costs at launch. Prints a table, writes JSON;
asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("LMSERVE_ENABLE_MULTIPROCESSING", "0")

from gpu_shapes import write_shape  # noqa: E402
from machine import device_info  # noqa: E402


def _host_launch_us(graph, repeats: int, idle: bool) -> list[float]:
    import torch

    times = []
    for _ in range(repeats):
        if idle:
            torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        times.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    return times


def _gpu_us(graph, repeats: int) -> float:
    import torch

    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) * 1e3 / repeats


def measure(args) -> dict:
    from lmserve import LLM

    path = write_shape(tempfile.mkdtemp(), args.shape)
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2,
            "prompt_lookup_max": 5}  # fmt: skip
    llm = LLM(
        path, load_format="dummy", dtype="bfloat16", device="cuda", skip_tokenizer_init=True,
        max_model_len=2048, gpu_memory_utilization=0.5, speculative_config=spec,
    )  # fmt: skip
    graphs = llm.llm_engine.engine_core.engine_core.executor.worker.model_runner.graphs
    rows = []
    for kind, table in (("decode", graphs.full), ("verify", graphs.verify)):
        for size in args.sizes:
            if size not in table:
                continue
            graph = table[size].graph
            graph.replay()  # first launch uploads the graph
            idle = _host_launch_us(graph, args.repeats, idle=True)
            busy = _host_launch_us(graph, args.repeats, idle=False)
            rows.append(
                {
                    "graph": kind,
                    "batch": size,
                    "tokens": size * (1 if kind == "decode" else graphs.verify_query_len),
                    "host_launch_idle_us_p50": statistics.median(idle),
                    "host_launch_idle_us_p90": sorted(idle)[int(0.9 * len(idle))],
                    "host_launch_busy_us_p50": statistics.median(busy),
                    "gpu_us": _gpu_us(graph, args.repeats),
                }
            )
    llm.shutdown()
    return {"shape": args.shape, "k": args.k, "pdl": os.environ.get("LMSERVE_DISABLE_PDL") != "1",
            "rows": rows}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="0.5b")
    p.add_argument("--k", type=int, default=4, help="draft tokens: verify graphs hold 1 + k")
    p.add_argument("--sizes", default="1,8,32")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    result = {"benchmark": "graph_launch_bench", "machine": device_info("cuda"), **measure(args)}
    print(f"{'graph':>7} {'batch':>5} {'tokens':>6} {'host idle p50':>13} {'p90':>7} "
          f"{'host busy p50':>13} {'GPU us':>8}")  # fmt: skip
    for r in result["rows"]:
        print(f"{r['graph']:>7} {r['batch']:>5} {r['tokens']:>6} "
              f"{r['host_launch_idle_us_p50']:>13.1f} {r['host_launch_idle_us_p90']:>7.1f} "
              f"{r['host_launch_busy_us_p50']:>13.1f} {r['gpu_us']:>8.1f}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
