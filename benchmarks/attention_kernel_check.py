"""One device run for the Triton attention backend: its tests, an error table against the float64
reference, and a timing table against the torch backend (no speed claim: a first, untuned kernel).

    python benchmarks/attention_kernel_check.py --out $OUT/attention_kernel_check.json

Timing: Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128), bf16, block_size
16, one layer's `forward` (cache write + attention), median of `triton.testing.do_bench`. The torch
backend's per-forward plan is built in the warm-up and reused, as layers 2..N reuse it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lmserve.attention.backend import AttentionMetadata  # noqa: E402
from lmserve.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from lmserve.attention.triton_backend import TritonAttentionBackend  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DEVICE = "cuda"  # the timing runs on the GPU; make_inputs also runs on "cpu" for dry runs


def run_tests(out_dir: str) -> dict:
    start = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rfEs",
        "tests/attention",
        "-p",
        "no:cacheprovider",
    ]
    if out_dir:
        cmd += ["--junitxml", os.path.join(out_dir, "pytest_attention.xml")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n", flush=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return {
        "returncode": proc.returncode,
        "summary": summary,
        "seconds": time.perf_counter() - start,
    }


def error_table() -> list[dict]:
    """Relative errors against the float64 torch reference on the tests' batches."""
    from tests.attention.test_triton_attention import DECODE, MIXED, check_against_reference

    rows = []
    for name, specs in (("mixed", MIXED), ("decode", DECODE)):
        for heads in ((32, 8), (14, 2), (8, 8)):
            for head_dim in (64, 128):
                for dtype in (torch.bfloat16, torch.float16, torch.float32):
                    error = check_against_reference(specs, *heads, head_dim, dtype, seed=7)
                    rows.append(
                        dict(
                            batch=name,
                            heads=f"{heads[0]}q/{heads[1]}kv",
                            head_dim=head_dim,
                            dtype=str(dtype).removeprefix("torch."),
                            rel_error=error,
                        )
                    )
    return rows


def make_inputs(specs: list[tuple[int, int]], dtype=torch.bfloat16):
    """Random inputs for (context, q_len) requests, built on the GPU (the caches are large)."""
    device = DEVICE
    seq_lens = [c + q for c, q in specs]
    blocks_per_req = [-(-n // BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks_per_req) + 1
    perm = torch.randperm(num_blocks, device=device).to(torch.int32)
    block_tables = torch.zeros(len(specs), max(blocks_per_req), dtype=torch.int32, device=device)
    slots, query_start_loc, used = [], [0], 0
    for i, ((context, q_len), n) in enumerate(zip(specs, blocks_per_req)):
        ids = perm[used : used + n]
        used += n
        block_tables[i, :n] = ids
        pos = torch.arange(context, context + q_len, device=device)
        slots.append(ids[pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)
        query_start_loc.append(query_start_loc[-1] + q_len)
    num_tokens = query_start_loc[-1]
    cache_shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    metadata = AttentionMetadata(
        num_reqs=len(specs),
        num_tokens=num_tokens,
        max_query_len=max(q for _, q in specs),
        max_seq_len=max(seq_lens),
        slot_mapping=torch.cat(slots),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables,
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens,
    )
    return (
        torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, device=device, dtype=dtype),
        torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=dtype),
        torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=dtype),
        (
            torch.randn(cache_shape, device=device, dtype=dtype),
            torch.randn(cache_shape, device=device, dtype=dtype),
        ),
        metadata,
    )


def time_backend(backend, inputs, scale: float) -> tuple[torch.Tensor, float]:
    """(output, median microseconds) of one layer's forward on `inputs`."""
    import dataclasses

    import triton

    query, key, value, kv_cache, metadata = inputs
    metadata = dataclasses.replace(metadata, backend_state=None)
    output = backend.forward(query, key, value, kv_cache, metadata, scale)  # plans, compiles

    def step():
        backend.forward(query, key, value, kv_cache, metadata, scale)

    return output, 1e3 * triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")


def time_case(name: str, specs: list[tuple[int, int]]) -> dict:
    inputs = make_inputs(specs)
    scale = HEAD_DIM**-0.5
    ref, torch_us = time_backend(TorchAttentionBackend(), inputs, scale)
    out, triton_us = time_backend(TritonAttentionBackend(), inputs, scale)
    ref = ref.double()
    kv_bytes = sum(c + q for c, q in specs) * NUM_KV_HEADS * HEAD_DIM * 2 * 2  # K and V, bf16
    return {
        "case": name,
        "torch_us": torch_us,
        "triton_us": triton_us,
        "speedup": torch_us / triton_us,
        "kv_read_GB": kv_bytes / 1e9,
        "triton_GBps": kv_bytes / (triton_us * 1e-6) / 1e9,
        "rel_diff_vs_torch": ((out.double() - ref).norm() / ref.norm()).item(),
    }


def timing_table() -> list[dict]:
    cases = []
    for batch in (1, 32, 128):
        for seq in (1024, 4096):
            cases.append((f"decode b={batch} seq={seq}", [(seq - 1, 1)] * batch))
    cases.append(("prefill 1x4096", [(0, 4096)]))
    cases.append(("mixed 4x512 chunk@1k + 64 decode@2k", [(1024, 512)] * 4 + [(2047, 1)] * 64))
    rows = []
    for name, specs in cases:
        rows.append(time_case(name, specs))
        torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="attention_kernel_check.json")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    import triton

    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    if not args.skip_tests:
        result["tests"] = run_tests(os.path.dirname(os.path.abspath(args.out)))
        save()
    result["errors"] = error_table()
    save()
    result["timing"] = timing_table()
    save()
    print(f"\n{result['device']}  tests: {result.get('tests', {}).get('summary')}")
    worst: dict[str, float] = {}
    for row in result["errors"]:
        worst[row["dtype"]] = max(worst.get(row["dtype"], 0.0), row["rel_error"])
    print("worst relative error vs float64:", {k: f"{v:.2e}" for k, v in worst.items()})
    print(f"{'case':40s} {'torch us':>10s} {'triton us':>10s} {'x':>6s} {'GB/s':>7s} {'diff':>8s}")
    for r in result["timing"]:
        print(
            f"{r['case']:40s} {r['torch_us']:10.1f} {r['triton_us']:10.1f} {r['speedup']:6.2f} "
            f"{r['triton_GBps']:7.0f} {r['rel_diff_vs_torch']:8.1e}"
        )


if __name__ == "__main__":
    main()
