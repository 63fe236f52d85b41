"""Shared-prefix decode attention on the GPU: one layer's decode attention for a batch whose
requests share a prefix of KV blocks, with the plain per-request kernels and with the
shared-prefix (cascade) kernels. Llama-3-8B attention shape (32 query heads, 8 KV heads,
head_dim 128), bf16, block 16; each request has its own 32-100 suffix tokens after the prefix.

    python benchmarks/shared_prefix_decode.py --out $OUT/shared_prefix_decode.json

Each path is captured in a CUDA graph and timed by replaying it (median of
`triton.testing.do_bench`), as a decode step runs it: no host launch time. Also reports the KV bytes each path reads
(the plain path reads the prefix once per request) and the relative difference of the outputs.
Prints a table and writes JSON; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.attention_kernel_check import BLOCK_SIZE, HEAD_DIM, NUM_HEADS, NUM_KV_HEADS  # noqa: E402
from benchmarks.prefill_attention import bench_us, rel  # noqa: E402
from lmserve.attention.backend import AttentionMetadata  # noqa: E402
from lmserve.attention.triton_backend import triton_paged_attention  # noqa: E402

BATCHES = (8, 16, 64, 256)
PREFIXES = (512, 1904, 4000)


def make_case(num_reqs: int, prefix: int, seed: int = 0):
    rng = random.Random(seed)
    prefix_blocks = prefix // BLOCK_SIZE
    suffixes = [rng.randrange(32, 101) for _ in range(num_reqs)]
    seq_lens = [prefix_blocks * BLOCK_SIZE + s for s in suffixes]
    own = [-(-n // BLOCK_SIZE) - prefix_blocks for n in seq_lens]
    num_blocks = prefix_blocks + sum(own) + 1
    perm = torch.randperm(num_blocks - 1).add(1).to(torch.int32)  # block 0 stays spare
    shared_ids, used = perm[:prefix_blocks], prefix_blocks
    width = max(prefix_blocks + n for n in own)
    tables = torch.zeros(num_reqs, width, dtype=torch.int32)
    for i, n in enumerate(own):
        tables[i, :prefix_blocks] = shared_ids
        tables[i, prefix_blocks : prefix_blocks + n] = perm[used : used + n]
        used += n
    dev = "cuda"
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    caches = (
        torch.randn(shape, device=dev, dtype=torch.bfloat16),
        torch.randn(shape, device=dev, dtype=torch.bfloat16),
    )
    starts = list(range(num_reqs + 1))
    metadata = AttentionMetadata(
        num_reqs=num_reqs,
        num_tokens=num_reqs,
        max_query_len=1,
        max_seq_len=max(seq_lens),
        slot_mapping=torch.zeros(num_reqs, dtype=torch.int64, device=dev),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_tables=tables.to(dev),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )
    query = torch.randn(num_reqs, NUM_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    return query, caches, metadata, prefix_blocks * BLOCK_SIZE


def _graph(fn) -> torch.cuda.CUDAGraph:
    fn()  # compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def run_case(num_reqs: int, prefix: int) -> dict:
    query, caches, metadata, prefix_tokens = make_case(num_reqs, prefix)
    scale = HEAD_DIM**-0.5
    plain_out = torch.empty_like(query)
    shared_out = torch.empty_like(query)

    def plain():
        metadata.shared_prefix = None
        triton_paged_attention(query, *caches, metadata, scale, out=plain_out)

    shared_len = torch.tensor([prefix_tokens], dtype=torch.int32, device="cuda")

    def shared():
        metadata.shared_prefix = shared_len
        triton_paged_attention(query, *caches, metadata, scale, out=shared_out)

    plain_graph, shared_graph = _graph(plain), _graph(shared)
    row_bytes = NUM_KV_HEADS * HEAD_DIM * 2 * 2  # K and V, bf16, one token
    suffix_tokens = sum(metadata.seq_lens_cpu) - num_reqs * prefix_tokens
    result = {
        "num_reqs": num_reqs,
        "prefix_tokens": prefix_tokens,
        "suffix_tokens_total": suffix_tokens,
        "plain_us": bench_us(plain_graph.replay),
        "shared_us": bench_us(shared_graph.replay),
        "plain_kv_mb": (num_reqs * prefix_tokens + suffix_tokens) * row_bytes / 1e6,
        "shared_kv_mb_min": (prefix_tokens + suffix_tokens) * row_bytes / 1e6,
        "rel_diff": rel(shared_out, plain_out),
    }
    result["speedup"] = result["plain_us"] / result["shared_us"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="shared_prefix_decode.json")
    args = parser.parse_args()
    import triton

    rows = []
    for prefix in PREFIXES:
        for num_reqs in BATCHES:
            rows.append(run_case(num_reqs, prefix))
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": f"{NUM_HEADS}q/{NUM_KV_HEADS}kv heads, head_dim {HEAD_DIM}, bf16, block 16",
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{result['device']}: one layer's decode attention, shared prefix + own suffixes")
    print(
        f"{'prefix':>7} {'reqs':>5} {'plain us':>9} {'shared us':>10} {'speedup':>8} {'rel diff':>9}"
    )
    for r in rows:
        print(f"{r['prefix_tokens']:7d} {r['num_reqs']:5d} {r['plain_us']:9.1f} "
              f"{r['shared_us']:10.1f} {r['speedup']:7.2f}x {r['rel_diff']:9.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
