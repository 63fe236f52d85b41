"""The KV connector's CPU tier on the GPU (Llama-3-8B shape, dummy weights, bf16), one card,
one process, the tier off and on measured one after the other:

  TTFT       one 8,000-token prompt (max_tokens=1): recomputed (tier off) vs loaded from the
             CPU tier (tier on: the prompt was served once, then the GPU prefix cache reset)
  throughput 1000 x (256 in, 256 out) random prompts, tier off vs on: the cost of saving
             when nothing is ever reused

    python benchmarks/kv_offload_bench.py --out result.json [--prompt-len 8000] [--repeats 5]

Prints a table last and writes the JSON (card named). Never asserts on time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time

os.environ.setdefault("LMSERVE_ENABLE_MULTIPROCESSING", "0")  # reach the scheduler directly

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_shapes import SHAPES, write_shape  # noqa: E402
from machine import device_info  # noqa: E402

KV = {"kv_connector": "TieredConnector", "kv_connector_extra_config": {"cpu_size_gib": 48}}


def make_llm(path: str, kv: dict | None, max_model_len: int):
    from lmserve import LLM

    return LLM(
        path, load_format="dummy", dtype="bfloat16", device="cuda", skip_tokenizer_init=True,
        max_model_len=max_model_len, gpu_memory_utilization=0.85, kv_transfer_config=kv,
    )  # fmt: skip


def free(llm) -> None:
    llm.shutdown()
    gc.collect()
    torch.cuda.empty_cache()


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = SHAPES["8b"][1]["vocab_size"]
    return [[rng.randrange(1000, vocab) for _ in range(length)] for _ in range(n)]


def timed_first_token(llm, prompt: list[int]) -> tuple[float, int]:
    from lmserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, out.outputs[0].token_ids[0]


def reset_gpu_cache(llm) -> None:
    sched = scheduler_of(llm)
    if sched.kv_connector is not None:
        sched.kv_connector.store.flush()
    assert sched.kv_cache_manager.reset_prefix_cache()


def ttft(llm, ttft_prompts: list[list[int]], loaded: bool) -> dict:
    """Per prompt: the first token's time; with the tier, the second pass (loaded)."""
    timed_first_token(llm, ttft_prompts[0][:1000])  # warm-up (graphs, allocator)
    reset_gpu_cache(llm)
    first, second, tokens = [], [], []
    for prompt in ttft_prompts:
        t, token = timed_first_token(llm, prompt)
        first.append(t)
        reset_gpu_cache(llm)
        if loaded:
            t2, token2 = timed_first_token(llm, prompt)
            second.append(t2)
            tokens.append((token, token2))
            reset_gpu_cache(llm)
    result = {"computed_s": first, "median_computed_s": statistics.median(first)}
    if loaded:
        result.update(
            loaded_s=second,
            median_loaded_s=statistics.median(second),
            same_first_token=[a == b for a, b in tokens],
        )
    return result


def throughput(path: str, kv: dict | None, num_requests: int) -> dict:
    from lmserve.bench.throughput import run_lmserve

    engine = dict(
        load_format="dummy", dtype="bfloat16", device="cuda", skip_tokenizer_init=True,
        max_model_len=2048, gpu_memory_utilization=0.85, kv_transfer_config=kv,
    )  # fmt: skip
    requests = prompts(num_requests, 256, seed=1234)
    result = run_lmserve(path, engine, requests, [256] * num_requests, 0.0, use_tqdm=False)
    gc.collect()
    torch.cuda.empty_cache()
    return result.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="kv_offload_bench.json")
    parser.add_argument("--prompt-len", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    path = write_shape(tempfile.mkdtemp(), "8b")
    ttft_prompts = prompts(args.repeats, args.prompt_len, seed=7)
    max_len = args.prompt_len + 64
    result: dict = {"machine": device_info("cuda"), "shape": "llama3-8b", "dtype": "bfloat16",
                    "kv_transfer_config": KV, "prompt_len": args.prompt_len}  # fmt: skip

    llm = make_llm(path, None, max_len)
    result["ttft_tier_off"] = ttft(llm, ttft_prompts, loaded=False)
    free(llm)
    llm = make_llm(path, KV, max_len)
    result["ttft_tier_on"] = ttft(llm, ttft_prompts, loaded=True)
    free(llm)
    if not args.skip_throughput:
        result["throughput_tier_off"] = throughput(path, None, args.num_requests)
        result["throughput_tier_on"] = throughput(path, KV, args.num_requests)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print_table(result)


def print_table(result: dict) -> None:
    off, on = result["ttft_tier_off"], result["ttft_tier_on"]
    card = result["machine"].get("gpu", result["machine"].get("device"))
    print(f"\nKV offload, Llama-3-8B shape, bf16, {card}")
    print(f"{'measure':<44}{'value':>12}")
    rows = [
        (f"TTFT {result['prompt_len']} tok, recomputed (tier off), s", off["median_computed_s"]),
        ("TTFT, first pass with the tier (saves), s", on["median_computed_s"]),
        ("TTFT, loaded from the CPU tier, s", on["median_loaded_s"]),
        ("speed-up loaded vs recomputed (tier off)", off["median_computed_s"] / on["median_loaded_s"]),
        ("first token equal, loaded vs computed", f"{sum(on['same_first_token'])}/{len(on['same_first_token'])}"),
    ]  # fmt: skip
    if "throughput_tier_on" in result:
        t_off = result["throughput_tier_off"]["tokens_per_second"]
        t_on = result["throughput_tier_on"]["tokens_per_second"]
        rows += [
            ("throughput 1000x(256,256) tier off, tok/s", t_off),
            ("throughput 1000x(256,256) tier on, tok/s", t_on),
            ("tier on / off", t_on / t_off),
        ]
    for name, value in rows:
        text = f"{value:>12.4g}" if isinstance(value, float) else f"{value:>12}"
        print(f"{name:<44}{text}")


if __name__ == "__main__":
    main()
