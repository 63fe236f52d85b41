"""The GPU fast path's figures on one GPU, in one run, next to their peers (dummy weights at real
shapes, bf16):

  decode      batch-1 decode tok/s for each shape: lmserve with CUDA graphs (async scheduling
              on, the default, and off; Triton GEMV on, the default, and off; programmatic
              dependent launch on, the default, and off), lmserve eager, HF
              transformers `generate`, and the memory-bandwidth roofline from a copy measured here;
  throughput  (--throughput) 1000 requests x (256 in, 256 out), ignore_eos, Llama-3-8B shape:
              lmserve total tok/s; HF `generate` on one static batch of 64 of the same requests;
  cold start  (--cold-start) `lmserve serve` (8B shape, dummy weights, graphs on) from launch to
              the first token of a completion.

    python benchmarks/gpu_fast_path.py --shapes 0.5b,8b --throughput --cold-start --out r.json

Prints a table and writes JSON; asserts nothing about time.
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

from benchmarks.cold_start import cold_start  # noqa: E402
from benchmarks.gpu_shapes import (  # noqa: E402
    SHAPES,
    batch1_decode_tok_s,
    copy_bandwidth_gbs,
    roofline_tok_s,
    write_shape,
)
from lmserve import LLM, SamplingParams  # noqa: E402

PROMPT_LEN, DECODE_TOKENS = 128, 128


def _free(llm) -> None:
    llm.shutdown()
    gc.collect()
    torch.cuda.empty_cache()


def lmserve_decode(path: str, gemv: bool = True, pdl: bool = True, **engine_kwargs) -> dict:
    """`gemv=False`: cuBLAS (F.linear) for every layer, the Triton GEMV turned off;
    `pdl=False`: Triton kernels launched without programmatic dependent launch."""
    os.environ["LMSERVE_DISABLE_GEMV"] = "0" if gemv else "1"
    os.environ["LMSERVE_DISABLE_PDL"] = "0" if pdl else "1"
    try:
        return _lmserve_decode(path, **engine_kwargs)
    finally:
        os.environ.pop("LMSERVE_DISABLE_GEMV")
        os.environ.pop("LMSERVE_DISABLE_PDL")


def _lmserve_decode(path: str, **engine_kwargs) -> dict:
    start = time.perf_counter()
    llm = LLM(
        path, load_format="dummy", dtype="bfloat16", device="cuda", skip_tokenizer_init=True,
        max_model_len=2048, gpu_memory_utilization=0.8, **engine_kwargs,
    )  # fmt: skip
    init_s = time.perf_counter() - start
    tok_s = batch1_decode_tok_s(llm, PROMPT_LEN, DECODE_TOKENS)
    _free(llm)
    return {"init_s": round(init_s, 1), "tok_s": round(tok_s, 1)}


def profile_decode(path: str, out_path: str) -> None:
    """cProfile of batch-1 graph decode: where the host time of a step goes."""
    import cProfile
    import pstats

    llm = LLM(
        path, load_format="dummy", dtype="bfloat16", device="cuda", skip_tokenizer_init=True,
        max_model_len=2048, gpu_memory_utilization=0.8,
    )  # fmt: skip
    prompt = [{"prompt_token_ids": list(range(1000, 1000 + PROMPT_LEN))}]
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    llm.generate(prompt, params, use_tqdm=False)
    profiler = cProfile.Profile()
    profiler.enable()
    llm.generate(prompt, params, use_tqdm=False)
    profiler.disable()
    with open(out_path, "w") as f:
        pstats.Stats(profiler, stream=f).sort_stats("tottime").print_stats(40)
    _free(llm)


def _hf_model(shape: str):
    import transformers

    cls_name, config, _ = SHAPES[shape]
    cfg = getattr(transformers, cls_name)(**config)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def hf_decode(shape: str) -> dict:
    model = _hf_model(shape)
    ids = torch.arange(1000, 1000 + PROMPT_LEN, device="cuda")[None]

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)  # fmt: skip
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(8)
    first = min(run(1) for _ in range(2))
    full = min(run(DECODE_TOKENS + 1) for _ in range(2))
    model = None  # the closure holds the cell: this frees the weights
    gc.collect()
    torch.cuda.empty_cache()
    return {"tok_s": round(DECODE_TOKENS / (full - first), 1)}


def _requests(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab) for _ in range(256)] for _ in range(n)]


def lmserve_throughput(path: str, num_requests: int) -> dict:
    from lmserve.bench.throughput import run_lmserve

    engine = dict(
        load_format="dummy", dtype="bfloat16", device="cuda", skip_tokenizer_init=True,
        max_model_len=2048, gpu_memory_utilization=0.9,
    )  # fmt: skip
    prompts = _requests(num_requests, SHAPES["8b"][1]["vocab_size"])
    result = run_lmserve(path, engine, prompts, [256] * num_requests, 0.0, use_tqdm=False)
    return result.to_dict()


def hf_throughput(batch: int) -> dict:
    model = _hf_model("8b")
    ids = torch.tensor(_requests(batch, SHAPES["8b"][1]["vocab_size"]), device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=256, min_new_tokens=256, do_sample=False,
                             pad_token_id=0)  # fmt: skip
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del model
    gc.collect()
    torch.cuda.empty_cache()
    generated = (out.shape[1] - ids.shape[1]) * batch
    return {
        "num_requests": batch,
        "elapsed_time": elapsed,
        "tokens_per_second": (ids.numel() + generated) / elapsed,
        "output_tokens_per_second": generated / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="0.5b,8b")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--hf-batch", type=int, default=64)
    parser.add_argument("--cold-start", action="store_true")
    parser.add_argument("--profile", default=None, help="write a cProfile of 0.5b decode here")
    parser.add_argument("--out", default="gpu_fast_path.json")
    args = parser.parse_args()
    bandwidth = copy_bandwidth_gbs()
    result: dict = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "copy_bandwidth_gbs": round(bandwidth, 1),
        "decode_batch1": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.profile:
            profile_decode(write_shape(tmp, "0.5b"), args.profile)
        for shape in filter(None, args.shapes.split(",")):
            path = write_shape(tmp, shape)
            row = {
                "roofline_tok_s": round(roofline_tok_s(bandwidth, shape), 1),
                "lmserve_graphs": lmserve_decode(path),  # async scheduling on (CUDA default)
                "lmserve_graphs_no_pdl": lmserve_decode(path, pdl=False),
                "lmserve_graphs_cublas": lmserve_decode(path, gemv=False),
                "lmserve_graphs_sync": lmserve_decode(path, async_scheduling=False),
                "lmserve_eager": lmserve_decode(path, enforce_eager=True),
                "hf": hf_decode(shape),
            }
            graphs = row["lmserve_graphs"]["tok_s"]
            row["graphs_over_roofline"] = round(graphs / row["roofline_tok_s"], 3)
            row["graphs_over_hf"] = round(graphs / row["hf"]["tok_s"], 2)
            result["decode_batch1"][shape] = row
            print(shape, json.dumps(row), flush=True)
        if args.throughput:
            path = write_shape(tmp, "8b")
            ours = lmserve_throughput(path, args.num_requests)
            hf = hf_throughput(args.hf_batch)
            result["throughput_8b_256_256"] = {
                "lmserve": ours,
                "hf_one_batch": hf,
                "lmserve_over_hf_total_tok_s": round(
                    ours["tokens_per_second"] / hf["tokens_per_second"], 2
                ),
            }
            print("throughput", json.dumps(result["throughput_8b_256_256"]), flush=True)
        if args.cold_start:
            result["cold_start_8b_serve"] = cold_start(write_shape(tmp, "8b"))
            print("cold start", json.dumps(result["cold_start_8b_serve"]), flush=True)
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
