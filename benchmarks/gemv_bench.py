"""The small-batch GEMV (lmserve/model/layers/gemv.py) against `F.linear` (cuBLAS) at the
Llama-3-8B and Qwen2.5-0.5B weight shapes, bf16: microseconds per call, achieved bandwidth
(weight bytes / time) and its fraction of the device's copy bandwidth.

    python benchmarks/gemv_bench.py --out $OUT/gemv_bench.json
    python benchmarks/gemv_bench.py --shapes 8b_o_proj,0.5b_down --sweep   # tune the heuristic

(--sweep compiles ~150 kernels once, then times ~30-130 configs per shape: minutes per shape.)

Timing: each implementation's calls are captured in one CUDA graph -- as batch-1 decode runs --
cycling over enough copies of the weight (>= 256 MB together) that no call finds its weight in
L2 (50 MB on an H100), as in decode where each layer's weights were evicted since last token.
Time per call = (graph replay time, CUDA events) / calls; the median of `--reps` replays after a
warm-up. --sweep also times a grid of launch configs per shape and reports the best next to the
heuristic's pick. Prints tables and writes JSON; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.gpu_shapes import copy_bandwidth_gbs  # noqa: E402
from benchmarks.machine import write_result  # noqa: E402
from lmserve.model.layers.fused_ops import silu_and_mul  # noqa: E402
from lmserve.model.layers.gemv import (  # noqa: E402
    GemvConfig,
    gemv_config,
    gemv_linear,
    gemv_silu_and_mul,
)

# (out_features, in_features) of each bf16 weight.
SHAPES = {
    "8b_qkv": (6144, 4096),
    "8b_o_proj": (4096, 4096),
    "8b_gate_up": (28672, 4096),
    "8b_down": (4096, 14336),
    "8b_lm_head": (128256, 4096),
    "0.5b_qkv": (1152, 896),
    "0.5b_o_proj": (896, 896),
    "0.5b_gate_up": (9728, 896),
    "0.5b_down": (896, 4864),
    "0.5b_lm_head": (151936, 896),
    # The gated MLP projections through `gemv_silu_and_mul` (the peer: F.linear, then the
    # SiLU-and-mul kernel).
    "8b_gate_up_silu": (28672, 4096),
    "0.5b_gate_up_silu": (9728, 896),
}


def _is_gated(shape: str) -> bool:
    return shape.endswith("_silu")


def _peer_gated(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return silu_and_mul(F.linear(x, w))


MULTI_ROW_SHAPES = ["8b_qkv", "8b_down", "0.5b_gate_up", "0.5b_down"]  # also at M = 2, 4, 8
WORKING_SET_BYTES = 256 << 20  # weight copies cycled per graph: >> L2
MIN_CALLS = 64  # calls per graph replay


def time_per_call_us(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,  # [M, K]
    weights: list[torch.Tensor],  # copies of one [N, K] weight
    reps: int,
) -> float:
    """Median over `reps` CUDA-graph replays of >= MIN_CALLS calls, cycling `weights`."""
    calls = len(weights) * -(-MIN_CALLS // len(weights))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile, pick cuBLAS algorithms, fill the allocator
        for w in weights[:2]:
            fn(x, w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(x, weights[i % len(weights)])
    graph.replay()  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def _weights(n: int, k: int) -> list[torch.Tensor]:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    copies = max(2, -(-WORKING_SET_BYTES // (w.numel() * w.element_size())))
    return [w] + [w.clone() for _ in range(copies - 1)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def measure(shape: str, m: int, copy_gbs: float, reps: int, num_sms: int) -> dict:
    n, k = SHAPES[shape]
    weights = _weights(n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)  # [M, K]
    weight_gb = n * k * 2 / 1e9
    row = {"shape": shape, "m": m, "n": n, "k": k, "weight_mb": round(weight_gb * 1e3, 2)}
    gated = _is_gated(shape)
    row["config"] = dataclasses.asdict(gemv_config(m, n, k, num_sms, gated=gated))
    ours, peer = (gemv_silu_and_mul, _peer_gated) if gated else (gemv_linear, F.linear)
    reference = x.float() @ weights[0].float().T  # [m, n]
    if gated:
        gate, up = reference.to(x.dtype).chunk(2, dim=-1)
        reference = F.silu(gate) * up
    row["rel_err_gemv"] = _rel(ours(x, weights[0]), reference)
    row["rel_err_f_linear"] = _rel(peer(x, weights[0]), reference)
    for name, fn in (("gemv", ours), ("f_linear", peer)):
        us = time_per_call_us(fn, x, weights, reps)
        row[f"{name}_us"] = round(us, 2)
        row[f"{name}_gbs"] = round(weight_gb / (us * 1e-6), 1)
        row[f"{name}_frac_copy"] = round(weight_gb / (us * 1e-6) / copy_gbs, 3)
    row["speedup"] = round(row["f_linear_us"] / row["gemv_us"], 3)
    del weights
    torch.cuda.empty_cache()
    return row


def sweep_configs(n: int, k: int, num_sms: int) -> list[GemvConfig]:
    """A grid around the heuristic: tile width and depth, pipeline depth, warps, split-K."""
    configs = []
    tiles = [(16, 2), (32, 2), (32, 4), (64, 4)]  # (block_n, num_warps): no warp re-reads a tile
    for (bn, warps), bk, stages, split in itertools.product(
        tiles, (128, 256, 512), (3, 4, 6), (1, 2, 4, 8)
    ):
        c = GemvConfig(bn, bk, split, warps, stages)
        if split > 1 and (
            -(-k // bk) // split < 2  # splits of < 2 iterations
            or n * k * 2 < (2 << 20)  # a weight read in about a launch latency
            or -(-n // bn) >= 2 * num_sms  # rows alone fill the GPU twice over
        ):
            continue
        if c.smem_bytes() <= 200 << 10:
            configs.append(c)
    return configs


def parse_configs(text: str) -> list[GemvConfig]:
    """'16,256,2,2,4;32,256,1,2,4' -> GemvConfigs (block_n, block_k, split_k, warps, stages)."""
    return [GemvConfig(*map(int, item.split(","))) for item in text.split(";") if item]


def sweep(
    shape: str,
    m: int,
    copy_gbs: float,
    reps: int,
    num_sms: int,
    configs: list[GemvConfig] | None = None,  # None: `sweep_configs`' grid
) -> dict:
    n, k = SHAPES[shape]
    weights = _weights(n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    weight_gb = n * k * 2 / 1e9
    ours = gemv_silu_and_mul if _is_gated(shape) else gemv_linear
    results = []
    for c in configs or sweep_configs(n, k, num_sms):
        us = time_per_call_us(lambda x, w, c=c: ours(x, w, None, c), x, weights, reps)
        results.append((us, c))
    results.sort(key=lambda r: r[0])
    picked = gemv_config(m, n, k, num_sms, gated=_is_gated(shape))
    picked_us = next((us for us, c in results if c == picked), None)
    if picked_us is None:
        picked_us = time_per_call_us(ours, x, weights, reps)
    del weights
    torch.cuda.empty_cache()

    def entry(us: float, c: GemvConfig) -> dict:
        frac = round(weight_gb / (us * 1e-6) / copy_gbs, 3)
        return {"us": round(us, 2), "frac_copy": frac, "config": dataclasses.asdict(c)}

    return {
        "shape": shape,
        "m": m,
        "heuristic": entry(picked_us, picked),
        "best": [entry(us, c) for us, c in results[:5]],
        "num_configs": len(results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gemv_bench.json")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated SHAPES keys")
    parser.add_argument("--rows", default="2,4,8", help="extra M for MULTI_ROW_SHAPES ('' none)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--sweep", action="store_true", help="also time a grid of configs (M=1)")
    parser.add_argument(
        "--configs",
        default="",
        help="with --sweep, time only these: 'block_n,block_k,split_k,warps,stages;...'",
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    shapes = args.shapes.split(",")
    extra_rows = [int(r) for r in args.rows.split(",") if r]
    props = torch.cuda.get_device_properties(0)
    copy_gbs = copy_bandwidth_gbs()
    import triton

    result = {
        "device": props.name,
        "num_sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_gbs": round(copy_gbs, 1),
        "timing": f"CUDA-graph replays of >= {MIN_CALLS} calls cycling weight copies "
        f">= {WORKING_SET_BYTES >> 20} MB; median of {args.reps}; bf16, no bias",
        "rows": [],
    }
    print(f"{props.name}: copy bandwidth {copy_gbs:.0f} GB/s (1 GiB copy_, read + write)")
    header = (
        f"{'shape':<14}{'M':>3}{'MB':>9} | {'gemv us':>9}{'GB/s':>8}{'%copy':>7} | "
        f"{'F.linear us':>12}{'GB/s':>8}{'%copy':>7} | {'speedup':>7}  config"
    )
    print(header)
    print("-" * len(header))
    for shape in shapes:
        for m in [1] + (extra_rows if shape in MULTI_ROW_SHAPES else []):
            r = measure(shape, m, copy_gbs, args.reps, props.multi_processor_count)
            result["rows"].append(r)
            c = r["config"]
            print(
                f"{shape:<14}{m:>3}{r['weight_mb']:>9.1f} | {r['gemv_us']:>9.1f}"
                f"{r['gemv_gbs']:>8.0f}{r['gemv_frac_copy']:>7.0%} | {r['f_linear_us']:>12.1f}"
                f"{r['f_linear_gbs']:>8.0f}{r['f_linear_frac_copy']:>7.0%} | "
                f"{r['speedup']:>7.2f}  n{c['block_n']} k{c['block_k']} s{c['split_k']} "
                f"w{c['num_warps']} st{c['num_stages']}",
                flush=True,
            )
    if args.sweep:
        result["sweep"] = []
        print("\nsweep (M=1): heuristic vs best of the grid")
        for shape in shapes:
            s = sweep(
                shape, 1, copy_gbs, max(5, args.reps // 3), props.multi_processor_count,
                parse_configs(args.configs) or None,
            )  # fmt: skip
            result["sweep"].append(s)
            best = s["best"][0]
            print(
                f"{shape:<14} heuristic {s['heuristic']['us']:>8.1f} us "
                f"({s['heuristic']['frac_copy']:.0%})  best {best['us']:>8.1f} us "
                f"({best['frac_copy']:.0%}) {best['config']}",
                flush=True,
            )
    write_result(args.out, result)


if __name__ == "__main__":
    main()
