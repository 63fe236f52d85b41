"""Tensor parallelism on a multi-GPU machine, in one run:

1. correctness: a small random Llama in bf16, greedy with each TP against TP=1 by vLLM's rule
   (at the first position where tokens differ, each side's token is in the other's top-5);
2. speed, per TP size: start-up time, batch-1 decode tok/s of the Llama-3-8B shape (and the 70B
   shape with --tps-70b), next to the memory-bandwidth roofline from a copy measured in the same
   run, and with --throughput N offline throughput on N x (256 in, 256 out).

    python benchmarks/tp_gpu_check.py --tps 4,2,1 --tps-70b 4 --throughput 1000 --out r.json

TP=2 runs first (its workers are processes that free their GPUs on exit); TP=1 runs in this
process afterwards. No claim is made here beyond the printed figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("LMSERVE_ENABLE_MULTIPROCESSING", "0")

from benchmarks.gpu_shapes import (  # noqa: E402
    batch1_decode_tok_s,
    copy_bandwidth_gbs,
    roofline_tok_s,
    write_shape,
)  # noqa: E402
from lmserve import LLM, SamplingParams  # noqa: E402
from tests.engine.test_hf_parity import make_prompts  # noqa: E402
from tests.tiny_models import make_tiny_model  # noqa: E402


def greedy_with_logprobs(path: str, tp: int, prompts) -> list:
    llm = LLM(
        path,
        device="cuda",
        dtype="bfloat16",
        tensor_parallel_size=tp,
        gpu_memory_utilization=0.3,
        max_num_batched_tokens=128,
    )
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    result = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return result


def parity(tmp: str, tp: int) -> dict:
    path = make_tiny_model(
        os.path.join(tmp, f"llama-{tp}"),
        "llama",
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    prompts = make_prompts()
    tp2 = greedy_with_logprobs(path, tp, prompts)
    tp1 = greedy_with_logprobs(path, 1, prompts)
    identical, top5_ok = 0, 0
    for (ids1, lp1), (ids2, lp2) in zip(tp1, tp2):
        if ids1 == ids2:
            identical += 1
            top5_ok += 1
            continue
        pos = next(i for i, (a, b) in enumerate(zip(ids1, ids2)) if a != b)
        top5_ok += ids1[pos] in lp2[pos] and ids2[pos] in lp1[pos]
    return {
        "tp": tp,
        "vs": 1,
        "prompts": len(prompts),
        "identical": identical,
        "top5_rule_holds": top5_ok,
    }


def tp_run(tmp: str, tp: int, shape: str, num_requests: int) -> dict:
    """One engine: start-up time, batch-1 decode tok/s, and (num_requests > 0) offline
    throughput on num_requests x (256 in, 256 out) random token ids, ignore_eos."""
    path = write_shape(tmp, shape)
    start = time.perf_counter()
    llm = LLM(
        path,
        load_format="dummy",
        dtype="bfloat16",
        device="cuda",
        tensor_parallel_size=tp,
        skip_tokenizer_init=True,
        max_model_len=2048,
        gpu_memory_utilization=0.85,
    )
    init_s = time.perf_counter() - start
    tok_s = batch1_decode_tok_s(llm)
    result = {
        "shape": shape,
        "tp": tp,
        "init_s": round(init_s, 1),
        "decode_tok_s": round(tok_s, 1),
    }
    if num_requests:
        rng = random.Random(0)
        prompts = [
            {"prompt_token_ids": [rng.randrange(1000, 128000) for _ in range(256)]}
            for _ in range(num_requests)
        ]
        params = SamplingParams(temperature=0, max_tokens=256, min_tokens=256, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        result["throughput"] = {
            "num_requests": num_requests,
            "elapsed_s": round(elapsed, 2),
            "total_tok_s": round((256 * num_requests + generated) / elapsed, 1),
            "output_tok_s": round(generated / elapsed, 1),
        }
    llm.shutdown()
    llm = None  # free its GPU memory before the next configuration
    gc.collect()
    torch.cuda.empty_cache()
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="tp_gpu_check.json")
    parser.add_argument("--tps", default="2,1", help="TP sizes for the 8B shape, largest first")
    parser.add_argument("--tps-70b", default="", help="TP sizes for the 70B shape (>= 4 GPUs)")
    parser.add_argument("--throughput", type=int, default=0, help="requests x (256, 256)")
    parser.add_argument("--throughput-70b", type=int, default=0, help="same, 70B shape")
    args = parser.parse_args()
    tps = [int(t) for t in args.tps.split(",")]
    tps_70b = [int(t) for t in args.tps_70b.split(",") if t]
    bandwidth = copy_bandwidth_gbs()
    result = {
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch": torch.__version__,
        "attention_backend": "triton, CUDA graphs (full decode + piecewise)",
        "copy_bandwidth_gbs": round(bandwidth, 1),
        "roofline_tok_s": {
            f"{shape}_tp{tp}": round(roofline_tok_s(bandwidth, shape, tp), 1)
            for shape, sizes in (("8b", tps), ("70b", tps_70b))
            for tp in sizes
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        result["parity_bf16_vs_tp1"] = [parity(tmp, tp) for tp in tps if tp > 1]
        runs = [tp_run(tmp, tp, "70b", args.throughput_70b) for tp in tps_70b]
        runs += [tp_run(tmp, tp, "8b", args.throughput) for tp in tps]
        result["runs"] = runs
        result["scaling_8b"] = _scaling([r for r in runs if r["shape"] == "8b"])
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


def _scaling(runs: list[dict]) -> dict:
    """Speed-up over TP=1 and efficiency (speed-up / TP) of decode and throughput."""
    base = next((r for r in runs if r["tp"] == 1), None)
    if base is None:
        return {}
    out = {}
    for r in runs:
        entry = {"decode_speedup": round(r["decode_tok_s"] / base["decode_tok_s"], 2)}
        entry["decode_efficiency"] = round(entry["decode_speedup"] / r["tp"], 2)
        if "throughput" in r and "throughput" in base:
            speedup = r["throughput"]["total_tok_s"] / base["throughput"]["total_tok_s"]
            entry["throughput_speedup"] = round(speedup, 2)
            entry["throughput_efficiency"] = round(speedup / r["tp"], 2)
        out[f"tp{r['tp']}"] = entry
    return out


if __name__ == "__main__":
    main()
