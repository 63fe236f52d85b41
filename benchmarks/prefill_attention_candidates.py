"""Candidates for uncached prefill attention on the GPU, against our paged kernel: cuDNN's SDPA
(PyTorch's `CUDNN_ATTENTION` backend), FlashAttention-2 inside PyTorch (SDPA and
`torch.nn.attention.varlen.varlen_attn` where the torch has it), and a contiguous Triton kernel
that reads K/V from the projection's output instead of the paged cache, and the same per-head
tiles reading the paged cache (what the backend would ship).

    python benchmarks/prefill_attention_candidates.py --out $OUT/candidates.json

Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128), bf16. Times are medians
of `triton.testing.do_bench` for one layer's attention; TFLOP/s counts the causal work only.
Also times cuDNN's first call at lengths it has not seen (its per-shape plan build). Prints a
table and writes JSON; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.attention_kernel_check import HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, make_inputs  # noqa: E402
from benchmarks.prefill_attention import bench_us, causal_flops, rel  # noqa: E402
from lmserve.attention.triton_backend import triton_paged_attention, triton_write_kv_cache  # noqa: E402

CASES = {
    "1 x 7600 prompt": [7600],
    "4 x 2000 prompts": [2000] * 4,
    "1 x 2048 prompt": [2048],
    "3 x 2730 prompts": [2730] * 3,
}
CONTIG_TILES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
                (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 2)]  # fmt: skip


@triton.jit
def _tile_request(cu_ptr, num_reqs, BLOCK_M: tl.constexpr):
    """(request, its first token, its query length, the tile's first query) of this program's
    tile, last tile first: the last i with cu[i] // BLOCK_M + i <= tile."""
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    lo = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_ptr + mid) // BLOCK_M + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    req = lo - 1
    start = tl.load(cu_ptr + req).to(tl.int64)
    q_len = tl.load(cu_ptr + req + 1) - start
    first_q = (tile - (start // BLOCK_M + req)) * BLOCK_M
    return req, start, q_len, first_q


@triton.jit
def _softmax_update(qk, qk_scale, v, m_i, l_i, acc):
    """One key tile of online softmax: unscaled scores qk [BLOCK_M, BLOCK_N] (masked ones
    -1e30), values v [BLOCK_N, D]; returns the new (max, sum, accumulator), log2 domain."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc


def _contiguous_kernel():
    @triton.jit
    def kernel(
        out_ptr, q_ptr, k_ptr, v_ptr, cu_ptr, qk_scale, num_reqs,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    ):  # fmt: skip
        head = tl.program_id(1)
        req, start, q_len, first_q = _tile_request(cu_ptr, num_reqs, BLOCK_M)
        if first_q >= q_len:
            return
        rows = first_q + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, D)
        q = tl.load(
            q_ptr + (start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :],
            mask=rows[:, None] < q_len, other=0.0,
        )  # fmt: skip
        kv_head = head // GROUP
        k_base = k_ptr + start * stride_kt + kv_head * stride_kh
        v_base = v_ptr + start * stride_vt + kv_head * stride_vh
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        cols = tl.arange(0, BLOCK_N)
        interior = (first_q + 1) // BLOCK_N * BLOCK_N
        for s in range(0, interior, BLOCK_N):
            keys = s + cols
            k = tl.load(k_base + keys[None, :] * stride_kt + dims[:, None])  # [D, BLOCK_N]
            v = tl.load(v_base + keys[:, None] * stride_vt + dims[None, :])  # [BLOCK_N, D]
            m_i, l_i, acc = _softmax_update(tl.dot(q, k), qk_scale, v, m_i, l_i, acc)
        end = tl.minimum(first_q + BLOCK_M, q_len)
        for s in range(interior, end, BLOCK_N):
            keys = s + cols
            valid = keys < end
            k = tl.load(
                k_base + keys[None, :] * stride_kt + dims[:, None], mask=valid[None, :], other=0.0
            )
            v = tl.load(
                v_base + keys[:, None] * stride_vt + dims[None, :], mask=valid[:, None], other=0.0
            )
            qk = tl.where((keys[None, :] <= rows[:, None]) & valid[None, :], tl.dot(q, k), -1.0e30)
            m_i, l_i, acc = _softmax_update(qk, qk_scale, v, m_i, l_i, acc)
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + (start + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty), mask=rows[:, None] < q_len,
        )  # fmt: skip

    return kernel


def _paged_per_head_kernel():
    """The contiguous kernel's per-head tiles, but K/V read from the paged cache through the
    block table, with cached context before the queries (what lmserve's backend must do)."""

    @triton.jit
    def kernel(
        out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_ptr, seq_lens_ptr,
        qk_scale, num_reqs, stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs,
        stride_ch, stride_bt, block_size,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    ):  # fmt: skip
        head = tl.program_id(1)
        req, start, q_len, first_q = _tile_request(cu_ptr, num_reqs, BLOCK_M)
        if first_q >= q_len:
            return
        context = tl.load(seq_lens_ptr + req) - q_len
        rows = first_q + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, D)
        q = tl.load(
            q_ptr + (start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :],
            mask=rows[:, None] < q_len, other=0.0,
        )  # fmt: skip
        kv_off_head = (head // GROUP) * stride_ch
        table = block_tables_ptr + req.to(tl.int64) * stride_bt
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        cols = tl.arange(0, BLOCK_N)
        q_pos = context + rows
        interior = (context + first_q + 1) // BLOCK_N * BLOCK_N
        for s in range(0, interior, BLOCK_N):
            keys = s + cols
            blocks = tl.load(table + keys // block_size).to(tl.int64)
            off = blocks * stride_cb + (keys % block_size) * stride_cs + kv_off_head
            k = tl.load(k_cache_ptr + off[None, :] + dims[:, None])  # [D, BLOCK_N]
            v = tl.load(v_cache_ptr + off[:, None] + dims[None, :])  # [BLOCK_N, D]
            m_i, l_i, acc = _softmax_update(tl.dot(q, k), qk_scale, v, m_i, l_i, acc)
        end = context + tl.minimum(first_q + BLOCK_M, q_len)
        for s in range(interior, end, BLOCK_N):
            keys = s + cols
            valid = keys < end
            blocks = tl.load(table + keys // block_size, mask=valid, other=0).to(tl.int64)
            off = blocks * stride_cb + (keys % block_size) * stride_cs + kv_off_head
            k = tl.load(k_cache_ptr + off[None, :] + dims[:, None], mask=valid[None, :], other=0.0)
            v = tl.load(v_cache_ptr + off[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
            qk = tl.where((keys[None, :] <= q_pos[:, None]) & valid[None, :], tl.dot(q, k), -1.0e30)
            m_i, l_i, acc = _softmax_update(qk, qk_scale, v, m_i, l_i, acc)
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + (start + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty), mask=rows[:, None] < q_len,
        )  # fmt: skip

    return kernel


def paged_per_head_attention(q, key_cache, value_cache, metadata, scale, out, tile, kernel):
    bm, bn, warps, stages = tile
    grid = (q.shape[0] // bm + metadata.num_reqs, q.shape[1])
    kernel[grid](
        out, q, key_cache, value_cache, metadata.block_tables, metadata.query_start_loc,
        metadata.seq_lens, scale * 1.4426950408889634, metadata.num_reqs, q.stride(0),
        q.stride(1), out.stride(0), out.stride(1), key_cache.stride(0), key_cache.stride(1),
        key_cache.stride(2), metadata.block_tables.stride(0), key_cache.shape[1],
        GROUP=q.shape[1] // key_cache.shape[2], BLOCK_M=bm, BLOCK_N=bn, D=q.shape[2],
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def contiguous_attention(q, k, v, cu, num_reqs, scale, out, tile, kernel):
    bm, bn, warps, stages = tile
    grid = (q.shape[0] // bm + num_reqs, q.shape[1])
    kernel[grid](
        out, q, k, v, cu, scale * 1.4426950408889634, num_reqs,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        GROUP=q.shape[1] // k.shape[1], BLOCK_M=bm, BLOCK_N=bn, D=q.shape[2],
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def sdpa_parts(q, k, v, lens, backend, scale, gqa: bool):
    from torch.nn.attention import sdpa_kernel

    starts = [sum(lens[:i]) for i in range(len(lens))]
    group = q.shape[1] // k.shape[1]

    def run():
        outs = []
        with sdpa_kernel([backend]):
            for s, n in zip(starts, lens):
                qs = q[s : s + n].transpose(0, 1)[None]  # [1, heads, n, dim], strided view
                ks = k[s : s + n].transpose(0, 1)[None]
                vs = v[s : s + n].transpose(0, 1)[None]
                if not gqa:
                    ks = ks.repeat_interleave(group, dim=1)
                    vs = vs.repeat_interleave(group, dim=1)
                o = torch.nn.functional.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa
                )
                outs.append(o[0].transpose(0, 1))  # [n, heads, dim]
        return outs

    return run


def varlen_fn(q, k, v, cu, max_len, scale):
    """torch's varlen_attn, causal: its keywords differ across torch versions."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        kw["enable_gqa"] = True
    else:  # expand K/V to the query heads
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if "scale" in params:
        kw["scale"] = scale

    def run():
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)

    return run


def run_case(name, lens, kernel, paged_kernel) -> dict:
    from torch.nn.attention import SDPBackend

    specs = [(0, n) for n in lens]
    query, key, value, kv_cache, metadata = make_inputs(specs)
    triton_write_kv_cache(key, value, kv_cache[0], kv_cache[1], metadata.slot_mapping)
    scale = HEAD_DIM**-0.5
    flops = causal_flops(specs)
    row: dict = {"case": name, "lens": lens, "tflop": flops / 1e12}
    ref = triton_paged_attention(query, *kv_cache, metadata, scale)
    us = bench_us(lambda: triton_paged_attention(query, *kv_cache, metadata, scale))
    row["ours_paged"] = {"us": us, "tflops": flops / us / 1e6}
    cu = metadata.query_start_loc
    for tile in CONTIG_TILES:
        out = torch.empty_like(query)
        try:
            contiguous_attention(query, key, value, cu, len(lens), scale, out, tile, kernel)
            us = bench_us(
                lambda t=tile, o=out: contiguous_attention(
                    query, key, value, cu, len(lens), scale, o, t, kernel
                )
            )
            row[f"contig{list(tile)}"] = {
                "us": us,
                "tflops": flops / us / 1e6,
                "rel": rel(out, ref),
            }
        except Exception as e:
            row[f"contig{list(tile)}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    for tile in CONTIG_TILES:
        out = torch.empty_like(query)
        try:
            paged_per_head_attention(query, *kv_cache, metadata, scale, out, tile, paged_kernel)
            us = bench_us(
                lambda t=tile, o=out: paged_per_head_attention(
                    query, *kv_cache, metadata, scale, o, t, paged_kernel
                )
            )
            row[f"paged_head{list(tile)}"] = {
                "us": us,
                "tflops": flops / us / 1e6,
                "rel": rel(out, ref),
            }
        except Exception as e:
            row[f"paged_head{list(tile)}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    for label, backend, gqa in (
        ("cudnn_gqa", SDPBackend.CUDNN_ATTENTION, True),
        ("cudnn_expanded", SDPBackend.CUDNN_ATTENTION, False),
        ("flash_gqa", SDPBackend.FLASH_ATTENTION, True),
    ):
        try:
            fn = sdpa_parts(query, key, value, lens, backend, scale, gqa)
            t0 = time.perf_counter()
            out = torch.cat(fn())
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            us = bench_us(fn)
            row[label] = {
                "us": us,
                "tflops": flops / us / 1e6,
                "rel": rel(out, ref),
                "first_call_s": first,
            }
        except Exception as e:
            row[label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    try:
        fn = varlen_fn(query, key, value, cu, max(lens), scale)
        out = fn()
        us = bench_us(fn)
        row["varlen_fa2"] = {"us": us, "tflops": flops / us / 1e6, "rel": rel(out, ref)}
    except Exception as e:
        row["varlen_fa2"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    torch.cuda.empty_cache()
    return row


def cudnn_new_shapes() -> list:
    """cuDNN builds a plan per new shape: the first call's time at lengths never seen."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = []
    for n in (1000, 1001, 1500, 3001, 5003):
        q = torch.randn(1, NUM_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, NUM_KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        try:
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    torch.nn.functional.scaled_dot_product_attention(
                        q, k, k, is_causal=True, enable_gqa=True
                    )
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            out.append({"len": n, "first_s": times[0], "second_s": times[1]})
        except Exception as e:
            out.append({"len": n, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="prefill_attention_candidates.json")
    args = parser.parse_args()
    kernel, paged_kernel = _contiguous_kernel(), _paged_per_head_kernel()
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "shape": f"{NUM_HEADS}q/{NUM_KV_HEADS}kv heads, head_dim {HEAD_DIM}, bf16",
        "cudnn_new_shapes": cudnn_new_shapes(),
        "cases": [],
    }
    for name, lens in CASES.items():
        result["cases"].append(run_case(name, lens, kernel, paged_kernel))
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result["cudnn_new_shapes"]))
    print(f"\n{result['device']} (cuDNN {result['cudnn']}): TFLOP/s, causal work only")
    for row in result["cases"]:
        cells = [
            f"{k}={v['tflops']:.0f}" if "tflops" in v else f"{k}=ERR({v['error'][:80]})"
            for k, v in row.items() if isinstance(v, dict)
        ]  # fmt: skip
        print(f"{row['case']}:\n  " + "\n  ".join(cells))


if __name__ == "__main__":
    main()
