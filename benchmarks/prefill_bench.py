"""Prefill-dominated workloads on the GPU, for lmserve or vLLM (same offline API, same prompts),
Llama-3-8B shape, dummy weights, bf16, max_model_len 8192:

  ttft_7600      one uncached 7,600-token prompt, 1 output token: wall time of `generate`
                 (median of 5, each prompt fresh, after 2 warm-ups)
  prefill_heavy  500 requests x (2,000 in, 64 out), ignore_eos: total tok/s
  shared_prefix  64 requests sharing a 1,900-token prefix (+ 64 own tokens), 32 out, all at
                 once: wall time (median of 3, a fresh prefix each time)
  profile        (--profile, lmserve only) one 7,600-token prefill under torch.profiler: GPU
                 time by kind (GEMM, attention, KV write, the rest) and the GEMMs' TFLOP/s

    python benchmarks/prefill_bench.py --engine lmserve --out $OUT/prefill_lmserve.json --profile
    PYTHONPATH=/tmp/vsite python benchmarks/prefill_bench.py --engine vllm --out $OUT/v.json

Prints a table and writes JSON; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

VOCAB = 128256
# Llama-3-8B: weights touched per token in the layers (no embedding, lm_head on 1 row).
LAYER_PARAMS = 32 * (4096 * (4096 + 2 * 1024 + 4096) + 3 * 4096 * 14336)


def make_llm(engine: str, path: str, device: str):
    common = dict(
        load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, max_model_len=8192,
        gpu_memory_utilization=0.85,
    )  # fmt: skip
    if engine == "vllm":
        from vllm import LLM

        return LLM(model=path, **common)
    os.environ.setdefault("LMSERVE_ENABLE_MULTIPROCESSING", "0")
    from lmserve import LLM

    return LLM(path, device=device, **common)


def sampling(engine: str, max_tokens: int):
    if engine == "vllm":
        from vllm import SamplingParams
    else:
        from lmserve import SamplingParams
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, VOCAB - 1000) for _ in range(n)]


def timed(llm, prompts, params) -> float:
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start


# The sizes; --scale shrinks them for CPU dry runs.
SIZES = dict(long=7600, heavy_n=500, heavy_in=2000, heavy_out=64, shared_n=64, prefix=1900, own=64,
             shared_out=32)  # fmt: skip


def ttft_7600(llm, engine: str, rng: random.Random, z: dict) -> dict:
    params = sampling(engine, 1)
    for _ in range(2):
        timed(llm, [tokens(rng, z["long"])], params)
    runs = [timed(llm, [tokens(rng, z["long"])], params) for _ in range(5)]
    ms = 1e3 * statistics.median(runs)
    flops = 2 * LAYER_PARAMS * z["long"]
    return {"ms": ms, "runs_ms": [1e3 * r for r in runs], "layer_gemm_tflop": flops / 1e12}


def prefill_heavy(llm, engine: str, rng: random.Random, z: dict) -> dict:
    n, n_in, n_out = z["heavy_n"], z["heavy_in"], z["heavy_out"]
    params = sampling(engine, n_out)
    timed(llm, [tokens(rng, n_in) for _ in range(16)], params)  # warm-up, other prompts
    elapsed = timed(llm, [tokens(rng, n_in) for _ in range(n)], params)
    return {
        "elapsed_s": elapsed,
        "tok_s": n * (n_in + n_out) / elapsed,
        "output_tok_s": n * n_out / elapsed,
    }


def shared_prefix(llm, engine: str, rng: random.Random, z: dict) -> dict:
    params = sampling(engine, z["shared_out"])

    def batch():
        prefix = tokens(rng, z["prefix"])
        return [prefix + tokens(rng, z["own"]) for _ in range(z["shared_n"])]

    timed(llm, batch(), params)
    runs = [timed(llm, batch(), params) for _ in range(3)]
    return {"s": statistics.median(runs), "runs_s": runs}


def kind(name: str) -> str:
    n = name.lower()
    if "paged_attention" in n or "flash" in n or "fmha" in n:
        return "attention"
    if "write_kv" in n or "reshape_and_cache" in n:
        return "kv_write"
    if any(s in n for s in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "sm90_", "cublas")):
        return "gemm"
    return "other"


def gpu_time_by_kind(run) -> dict:
    """GPU kernel time of `run()` under torch.profiler, by kind, and the top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
    torch.cuda.synchronize()
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        by_kind[kind(event.name)] = by_kind.get(kind(event.name), 0.0) + event.device_time
        by_name[event.name] = by_name.get(event.name, 0.0) + event.device_time
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {
        "gpu_ms_by_kind": {k: v / 1e3 for k, v in by_kind.items()},
        "gpu_ms_total": sum(by_kind.values()) / 1e3,
        "top_kernels_ms": {k[:120]: v / 1e3 for k, v in top},
    }


def profile_prefill(llm, engine: str, rng: random.Random, z: dict) -> dict:
    """One long prefill (and its GEMMs' TFLOP/s), then one shared-prefix batch."""
    params = sampling(engine, 1)
    timed(llm, [tokens(rng, z["long"])], params)
    long = gpu_time_by_kind(lambda: timed(llm, [tokens(rng, z["long"])], params))
    gemm_ms = long["gpu_ms_by_kind"].get("gemm", float("nan"))
    long["gemm_tflops"] = 2 * LAYER_PARAMS * z["long"] / (gemm_ms * 1e-3) / 1e12
    prefix = tokens(rng, z["prefix"])
    batch = [prefix + tokens(rng, z["own"]) for _ in range(z["shared_n"])]
    shared = gpu_time_by_kind(lambda: timed(llm, batch, sampling(engine, z["shared_out"])))
    # A fifth of the prefill-heavy workload: GPU time against wall time shows the host's gaps.
    n = max(1, z["heavy_n"] // 5)
    prompts = [tokens(rng, z["heavy_in"]) for _ in range(n)]
    wall: list[float] = []
    heavy = gpu_time_by_kind(
        lambda: wall.append(timed(llm, prompts, sampling(engine, z["heavy_out"])))
    )
    heavy["wall_ms"] = 1e3 * wall[0]
    heavy["requests"] = n
    return {"long_prefill": long, "shared_prefix_batch": shared, "prefill_heavy_fifth": heavy}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=("lmserve", "vllm"), default="lmserve")
    parser.add_argument("--workloads", default="ttft_7600,shared_prefix,prefill_heavy")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default="prefill_bench.json")
    parser.add_argument("--shape", default="8b", help="gpu_shapes name (0.5b: CPU dry runs)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", type=float, default=1.0, help="<1: fewer, shorter prompts")
    args = parser.parse_args()
    import torch

    from benchmarks.gpu_shapes import write_shape

    path = write_shape(tempfile.mkdtemp(), args.shape)
    start = time.perf_counter()
    llm = make_llm(args.engine, path, args.device)
    result = {
        "engine": args.engine,
        "shape": args.shape,
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device,
        "torch": torch.__version__,
        "init_s": time.perf_counter() - start,
    }
    if args.engine == "vllm":
        import vllm

        result["vllm"] = vllm.__version__
    rng = random.Random(0)
    sizes = {k: max(1, int(v * args.scale)) for k, v in SIZES.items()}
    result["sizes"] = sizes
    todo = [w for w in args.workloads.split(",") if w]
    if args.profile:
        todo.append("profile")
    funcs = {
        "ttft_7600": ttft_7600,
        "prefill_heavy": prefill_heavy,
        "shared_prefix": shared_prefix,
        "profile": profile_prefill,
    }
    for name in todo:
        result[name] = funcs[name](llm, args.engine, rng, sizes)
        print(name, json.dumps(result[name]), flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"\n{args.engine} on {result['device']}")
    if "ttft_7600" in result:
        print(f"  TTFT 7,600-token prompt   {result['ttft_7600']['ms']:8.1f} ms")
    if "shared_prefix" in result:
        print(f"  64 x shared 1,900 prefix  {result['shared_prefix']['s']:8.3f} s")
    if "prefill_heavy" in result:
        print(f"  500 x (2000 in, 64 out)   {result['prefill_heavy']['tok_s']:8.0f} tok/s")
    for workload, profiled in result.get("profile", {}).items():
        kinds = {k: round(v, 1) for k, v in profiled["gpu_ms_by_kind"].items()}
        print(f"  GPU ms by kind, {workload}: {kinds}")
    os._exit(0)  # vLLM's engine process and our threads: no slow interpreter teardown


if __name__ == "__main__":
    main()
