"""Prefill attention on the GPU: our Triton paged kernel at every tile shape we might pick, the
kernel as it was before the long-prompt changes (`--old-kernel FILE`, a copy of the old
`triton_backend.py`), and the peers on the same inputs: PyTorch SDPA (FlashAttention-2 inside
torch, contiguous K/V, so no paging cost) and vLLM's FlashAttention 3 over the same paged cache
when vLLM is importable.

    python benchmarks/prefill_attention.py --out $OUT/prefill_attention.json [--old-kernel F]

Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128), bf16, block_size 16.
Times are medians of `triton.testing.do_bench` for one layer's attention (the cache already
written); TFLOP/s counts the causal work only (4 * heads * head_dim per visible query-key pair).
Prints a table and writes JSON; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.attention_kernel_check import (  # noqa: E402
    HEAD_DIM,
    NUM_HEADS,
    NUM_KV_HEADS,
    make_inputs,
)
from lmserve.attention.triton_backend import (  # noqa: E402
    LONG_TILE,
    SHORT_TILE,
    _tile_config,
    triton_paged_attention,
    triton_write_kv_cache,
)

TILES = [
    SHORT_TILE, LONG_TILE, (128, 128, 8, 2), (128, 128, 8, 3), (128, 128, 4, 2), (128, 64, 8, 3),
    (256, 64, 8, 2), (256, 64, 16, 2), (256, 128, 16, 2), (64, 128, 4, 2),
]  # fmt: skip
CASES = {  # name: [(cached tokens before the step, query tokens)] per request
    "1 x 7600 prompt": [(0, 7600)],
    "4 x 2000 prompts": [(0, 2000)] * 4,
    "1 x 2048 prompt": [(0, 2048)],
    "16 x 100 after a 1900-token cached prefix": [(1900, 100)] * 16,
    "1 x 1900 prefix + 31 x 100 suffix": [(0, 1900)] + [(1900, 100)] * 31,
    "1 x 2048 chunk + 128 decodes at 2k": [(2048, 2048)] + [(2047, 1)] * 128,
    "4 x 512 chunks + 64 decodes at 2k": [(1024, 512)] * 4 + [(2047, 1)] * 64,
}


def _name(tile) -> str:
    return "auto" if tile is None else str(list(tile))


def causal_flops(specs) -> float:
    pairs = sum(q * c + q * (q + 1) / 2 for c, q in specs)
    return 4.0 * NUM_HEADS * HEAD_DIM * pairs


def bench_us(fn) -> float:
    import triton

    fn()
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def load_old_kernel(path: str):
    spec = importlib.util.spec_from_file_location("old_triton_backend", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.triton_paged_attention


def sdpa_inputs(query, kv_cache, metadata, specs):
    """Contiguous [1, heads, len, dim] K/V per request from the paged cache (whole prompts)."""
    key_cache, value_cache = kv_cache
    out = []
    for i, (context, q_len) in enumerate(specs):
        n = context + q_len
        ids = metadata.block_tables[i, : -(-n // key_cache.shape[1])].long()
        k = key_cache[ids].flatten(0, 1)[:n].transpose(0, 1)[None]  # [1, kv_heads, n, dim]
        v = value_cache[ids].flatten(0, 1)[:n].transpose(0, 1)[None]
        start = metadata.query_start_loc_cpu[i]
        q = query[start : start + q_len].transpose(0, 1)[None]  # [1, heads, q_len, dim]
        out.append((q.contiguous(), k.contiguous(), v.contiguous()))
    return out


def sdpa_peer(query, kv_cache, metadata, specs, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if any(c for c, _ in specs):
        return None, "SDPA's causal mask assumes no cached prefix"
    parts = sdpa_inputs(query, kv_cache, metadata, specs)

    def run():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return [
                torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=scale, enable_gqa=True
                )
                for q, k, v in parts
            ]

    outs = run()
    ref = torch.cat([o[0].transpose(0, 1) for o in outs])  # [tokens, heads, dim]
    return (bench_us(run), ref), None


def fa3_peer(query, kv_cache, metadata, scale):
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except Exception as e:  # vLLM not installed here
        return None, f"vllm_flash_attn: {type(e).__name__}: {e}"
    key_cache, value_cache = kv_cache
    out = torch.empty_like(query)

    def run():
        flash_attn_varlen_func(
            q=query, k=key_cache, v=value_cache, out=out,
            cu_seqlens_q=metadata.query_start_loc, max_seqlen_q=metadata.max_query_len,
            seqused_k=metadata.seq_lens, max_seqlen_k=metadata.max_seq_len,
            softmax_scale=scale, causal=True, block_table=metadata.block_tables, fa_version=3,
        )  # fmt: skip

    try:
        us = bench_us(run)
    except Exception as e:
        return None, f"flash_attn_varlen_func: {type(e).__name__}: {e}"
    return (us, out.clone()), None


def run_case(name: str, specs, old_kernel) -> dict:
    query, key, value, kv_cache, metadata = make_inputs(specs)
    triton_write_kv_cache(key, value, kv_cache[0], kv_cache[1], metadata.slot_mapping)
    scale = HEAD_DIM**-0.5
    flops = causal_flops(specs)
    row: dict = {"case": name, "specs": specs, "tflop": flops / 1e12, "ours": {}}
    chosen = _tile_config(NUM_HEADS // NUM_KV_HEADS, metadata.max_query_len, 128, query.dtype)
    row["chosen_tile"] = list(chosen)
    import time

    for tile in (SHORT_TILE, chosen):  # the first call compiles (once per tile shape)
        start = time.perf_counter()
        ref = triton_paged_attention(query, *kv_cache, metadata, scale, tile=tile)
        torch.cuda.synchronize()
        row.setdefault("first_call_s", {})[str(list(tile))] = time.perf_counter() - start
    ref = triton_paged_attention(query, *kv_cache, metadata, scale, tile=SHORT_TILE)
    for tile in [None, *TILES]:  # None: the automatic choice (with its decode-row launch)
        out = torch.empty_like(query)
        try:
            us = bench_us(
                lambda t=tile, o=out: triton_paged_attention(
                    query, *kv_cache, metadata, scale, o, tile=t
                )
            )
        except Exception as e:  # a shape that does not fit (shared memory, registers)
            row["ours"][_name(tile)] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        row["ours"][_name(tile)] = {
            "us": us,
            "tflops": flops / us / 1e6,
            "rel_diff_vs_short_tile": rel(out, ref),
        }
    if old_kernel is not None:
        us = bench_us(lambda: old_kernel(query, *kv_cache, metadata, scale))
        row["old_kernel"] = {"us": us, "tflops": flops / us / 1e6}
    for peer, (result, error) in (
        ("sdpa_flash", sdpa_peer(query, kv_cache, metadata, specs, scale)),
        ("vllm_fa3", fa3_peer(query, kv_cache, metadata, scale)),
    ):
        if result is None:
            row[peer] = {"error": error}
        else:
            us, out = result
            row[peer] = {"us": us, "tflops": flops / us / 1e6, "rel_diff_vs_ours": rel(ref, out)}
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="prefill_attention.json")
    parser.add_argument("--old-kernel", default=None, help="a copy of the old triton_backend.py")
    parser.add_argument("--cases", default=None, help="comma-separated case numbers (0-based)")
    args = parser.parse_args()
    import triton

    old = load_old_kernel(args.old_kernel) if args.old_kernel else None
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": f"{NUM_HEADS}q/{NUM_KV_HEADS}kv heads, head_dim {HEAD_DIM}, bf16, block 16",
        "cases": [],
    }
    chosen = list(CASES.items())
    if args.cases:
        chosen = [chosen[int(i)] for i in args.cases.split(",")]
    for name, specs in chosen:
        result["cases"].append(run_case(name, specs, old))
        print(json.dumps(result["cases"][-1]), flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"\n{result['device']}: TFLOP/s (causal work only)")
    for row in result["cases"]:
        ours = "  ".join(f"{k}={v['tflops']:.0f}" for k, v in row["ours"].items() if "tflops" in v)
        peers = "  ".join(
            f"{p}={row[p]['tflops']:.0f}" for p in ("old_kernel", "sdpa_flash", "vllm_fa3")
            if p in row and "tflops" in row[p]
        )  # fmt: skip
        print(f"{row['case']:44s} {ours}  |  {peers}")


if __name__ == "__main__":
    main()
