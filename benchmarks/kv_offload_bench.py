"""The KV connector's CPU tier on the GPU (Llama-3-8B shape, dummy weights, bf16), one card,
one process, the tier off and on measured one after the other:

  TTFT       one 8,000-token prompt (max_tokens=1): recomputed (tier off) vs loaded from the
             CPU tier (tier on: the prompt was served once, then the GPU prefix cache reset)
  throughput 1000 x (256 in, 256 out) random prompts, tier off vs on: the cost of saving
             when nothing is ever reused (two passes each side, new prompts every pass, so
             neither the GPU prefix cache nor the tier ever hits; pass 2 runs warm)
  roofline   pinned host -> device copy bandwidth for one prompt's KV: the floor of a load

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

KV = {"kv_connector": "TieredConnector", "kv_connector_extra_config": {"cpu_size_gib": 16}}


def make_llm(args, path: str, kv: dict | None, max_model_len: int):
    from lmserve import LLM

    return LLM(
        path, load_format="dummy", dtype="bfloat16", device=args.device, skip_tokenizer_init=True,
        max_model_len=max_model_len, gpu_memory_utilization=0.85, kv_transfer_config=kv,
    )  # fmt: skip


def free(llm) -> None:
    llm.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def prompts(args, n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = SHAPES[args.shape][1]["vocab_size"]
    return [[rng.randrange(1000, vocab) for _ in range(length)] for _ in range(n)]


def timed_first_token(llm, prompt: list[int]) -> tuple[float, int]:
    from lmserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    synchronize()
    start = time.perf_counter()
    (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, out.outputs[0].token_ids[0]


def worker_connector(llm):
    return llm.llm_engine.engine_core.engine_core.executor.worker.model_runner.kv_connector


def reset_gpu_cache(llm) -> None:
    """Forget the GPU pool's prefixes once every save is in the CPU tier."""
    if worker_connector(llm) is not None:
        worker_connector(llm).flush()
    assert scheduler_of(llm).kv_cache_manager.reset_prefix_cache()


class Probe:
    """What the workers report (bytes and seconds per tier) and the main thread's time in the
    connector's per-step calls (start_load_kv, wait_for_save, get_finished)."""

    def __init__(self, llm) -> None:
        from lmserve.kv_transfer.base import KVTransferStats

        self.stats = KVTransferStats()
        self.step_seconds = 0.0
        sched, connector = scheduler_of(llm), worker_connector(llm)
        original = sched.update_from_kv_connector

        def spy(output):
            if output is not None and output.stats is not None:
                self.stats.add(output.stats)
            return original(output)

        sched.update_from_kv_connector = spy
        for name in ("start_load_kv", "wait_for_save", "get_finished"):
            setattr(connector, name, self._timed(getattr(connector, name)))

    def _timed(self, method):
        def timed(*args):
            start = time.perf_counter()
            try:
                return method(*args)
            finally:
                self.step_seconds += time.perf_counter() - start

        return timed

    def to_dict(self) -> dict:
        from msgspec.structs import asdict

        return {
            "worker_stats": asdict(self.stats),
            "main_thread_connector_s": self.step_seconds,
        }


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


def throughput(args, path: str, kv: dict | None) -> dict:
    """num_requests x (256 in, 256 out), all at once, twice with new prompts (nothing is ever
    reused); with the tier, what it moved. `tokens_per_second` is the second (warm) pass."""
    from lmserve import SamplingParams

    llm = make_llm(args, path, kv, 2048)
    probe = Probe(llm) if kv is not None else None
    params = SamplingParams(temperature=0, max_tokens=256, min_tokens=256, ignore_eos=True)
    warm_up = [{"prompt_token_ids": p} for p in prompts(args, 8, 256, 999)]
    llm.generate(warm_up, params, use_tqdm=False)
    passes = []
    for seed in (1234, 1235):
        requests = [{"prompt_token_ids": p} for p in prompts(args, args.num_requests, 256, seed)]
        start = time.perf_counter()
        llm.generate(requests, params, use_tqdm=False)
        passes.append(args.num_requests * 512 / (time.perf_counter() - start))
    free(llm)
    result = {"tokens_per_second": passes[-1], "tokens_per_second_per_pass": passes}
    if probe is not None:
        result["probe"] = probe.to_dict()
    return result


def h2d_roofline(args, num_tokens: int) -> dict:
    """Pinned host -> device copy of one prompt's KV (all layers, keys and values) in chunk-sized
    pieces, as the CPU tier loads it: the bandwidth a load can reach and its time."""
    hf = SHAPES[args.shape][1]
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    # bytes of one 256-token chunk, bf16: [layers, 2, 256, kv heads, head_dim]
    chunk = hf["num_hidden_layers"] * 2 * 256 * hf["num_key_value_heads"] * head_dim * 2
    num_chunks = num_tokens // 256
    host = torch.empty((num_chunks, chunk), dtype=torch.uint8, pin_memory=True)
    device = torch.empty((2, chunk), dtype=torch.uint8, device=args.device)
    times = []
    for _ in range(5):
        synchronize()
        start = time.perf_counter()
        for j in range(num_chunks):
            device[j % 2].copy_(host[j], non_blocking=True)
        synchronize()
        times.append(time.perf_counter() - start)
    best = min(times)
    return {
        "bytes": num_chunks * chunk,
        "seconds": best,
        "gb_per_s": num_chunks * chunk / best / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="kv_offload_bench.json")
    parser.add_argument("--prompt-len", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    path = write_shape(tempfile.mkdtemp(), args.shape)
    ttft_prompts = prompts(args, args.repeats, args.prompt_len, seed=7)
    max_len = args.prompt_len + 64
    result: dict = {"machine": device_info(args.device), "shape": args.shape, "dtype": "bfloat16",
                    "kv_transfer_config": KV, "prompt_len": args.prompt_len}  # fmt: skip

    if args.device == "cuda":
        result["h2d_roofline"] = h2d_roofline(args, args.prompt_len)
    llm = make_llm(args, path, None, max_len)
    result["ttft_tier_off"] = ttft(llm, ttft_prompts, loaded=False)
    free(llm)
    llm = make_llm(args, path, KV, max_len)
    probe = Probe(llm)
    result["ttft_tier_on"] = ttft(llm, ttft_prompts, loaded=True)
    result["ttft_tier_on"]["probe"] = probe.to_dict()
    free(llm)
    if not args.skip_throughput:
        result["throughput_tier_off"] = throughput(args, path, None)
        result["throughput_tier_on"] = throughput(args, path, KV)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print_table(result)


def print_table(result: dict) -> None:
    off, on = result["ttft_tier_off"], result["ttft_tier_on"]
    card = result["machine"].get("gpu", result["machine"].get("device"))
    print(f"\nKV offload, {result['shape']} shape, bf16, {card}")
    print(f"{'measure':<44}{'value':>12}")
    rows = [
        (f"TTFT {result['prompt_len']} tok, recomputed (tier off), s", off["median_computed_s"]),
        ("TTFT, first pass with the tier (saves), s", on["median_computed_s"]),
        ("TTFT, loaded from the CPU tier, s", on["median_loaded_s"]),
        ("speed-up loaded vs recomputed (tier off)", off["median_computed_s"] / on["median_loaded_s"]),
        ("first token equal, loaded vs computed", f"{sum(on['same_first_token'])}/{len(on['same_first_token'])}"),
    ]  # fmt: skip
    stats = on["probe"]["worker_stats"]
    for kind in ("loaded", "saved"):
        nbytes, seconds = (
            stats[f"bytes_{kind}"].get("cpu", 0),
            stats[f"seconds_{kind}"].get("cpu", 0),
        )
        rows.append(
            (f"CPU tier {kind}: GB/s over {nbytes / 1e9:.1f} GB", nbytes / 1e9 / max(seconds, 1e-9))
        )
    rows.append(("main thread in connector calls, s", on["probe"]["main_thread_connector_s"]))
    if "h2d_roofline" in result:
        roof = result["h2d_roofline"]
        rows += [(f"pinned H2D GB/s, {roof['bytes'] / 1e9:.2f} GB in 256-token chunks", roof["gb_per_s"]),
                 ("  that copy alone, s (a load's floor)", roof["seconds"])]  # fmt: skip
    if "throughput_tier_on" in result:
        t_off = result["throughput_tier_off"]["tokens_per_second"]
        t_on = result["throughput_tier_on"]["tokens_per_second"]
        rows += [
            ("throughput (256 in, 256 out) tier off, tok/s", t_off),
            ("throughput (256 in, 256 out) tier on, tok/s", t_on),
            ("tier on / off", t_on / t_off),
            ("first passes, tier on / off",
             result["throughput_tier_on"]["tokens_per_second_per_pass"][0]
             / result["throughput_tier_off"]["tokens_per_second_per_pass"][0]),
            ("  main thread in connector calls, s",
             result["throughput_tier_on"]["probe"]["main_thread_connector_s"]),
        ]  # fmt: skip
    for name, value in rows:
        text = f"{value:>12.4g}" if isinstance(value, float) else f"{value:>12}"
        print(f"{name:<44}{text}")


if __name__ == "__main__":
    main()
