"""Decode speed with and without n-gram speculative decoding, same process, same model, same
requests — on a repetitive workload where prompt lookup can find the continuation.

    python benchmarks/spec_decode_bench.py                                  # default model
    python benchmarks/spec_decode_bench.py --device cuda --dtype bfloat16 --batch-sizes 1,8,32
    python benchmarks/spec_decode_bench.py --model DIR --load-format dummy --workload tokens

Workloads:
  repeat-text  chat prompts asking the model to repeat, or lightly edit, a given passage
               (needs a tokenizer; with real weights the answer copies the passage, so n-gram
               drafts from the prompt are mostly accepted);
  tokens       a block of random token ids repeated 3 times: repetitive at the token level,
               for random (dummy) weights, whose output is whatever the weights make it.
For each batch size the requests run in groups of that many (one `generate` call per group),
greedy, exactly `--output-len` tokens each (ignore_eos), prefix caching off so both engines
prefill everything. Decode tok/s = output tokens / (wall time - the prefill-only time of the
same groups, measured with max_tokens=1). Greedy outputs of the two engines are compared too
(identical in float32; in bf16 they may part where logits tie within rounding).

Prints a table and writes JSON (tok/s, speed-up, acceptance rate overall and by position, the
machine and card); asserts nothing about time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("LMSERVE_ENABLE_MULTIPROCESSING", "0")  # one process: free GPU memory

from machine import device_info  # noqa: E402

PASSAGES = [
    "The river town wakes slowly. Fishermen pull their boats onto the gravel, the baker "
    "lights the oven before dawn, and the school bell rings at eight. In the afternoon the "
    "wind turns, the market closes, and children race along the harbour wall to watch the "
    "ferry come in from the islands with crates of oranges, letters and tired travellers.",
    "To install the tool, download the archive, unpack it into a folder of your choice and "
    "add that folder to your PATH. Run the command once without arguments to create a "
    "configuration file in your home directory. Edit the file to set the server address, "
    "the user name and the number of retries, then run the command again to connect.",
    "def moving_average(values, window):\n    if window <= 0:\n        raise ValueError("
    "'window must be positive')\n    total = 0.0\n    result = []\n    for i, value in "
    "enumerate(values):\n        total += value\n        if i >= window:\n            total "
    "-= values[i - window]\n        result.append(total / min(i + 1, window))\n    return "
    "result\n",
    "Our meeting on Thursday covered three topics. First, the budget for the next quarter "
    "was approved with a small increase for travel. Second, the team agreed to move the "
    "release date by one week to finish testing. Third, everyone will share their notes "
    "in the shared folder before Monday so that the summary can be sent to the board.",
]
INSTRUCTIONS = [
    "Repeat the following text exactly, word for word:\n\n{text}",
    "Copy the following text, changing nothing except replacing every full stop with an "
    "exclamation mark:\n\n{text}",
]


def repeat_text_prompts(tokenizer: Any, num_prompts: int) -> list[list[int]]:
    prompts = []
    for i in range(num_prompts):
        text = PASSAGES[i % len(PASSAGES)]
        message = INSTRUCTIONS[(i // len(PASSAGES)) % len(INSTRUCTIONS)].format(text=text)
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer(text, add_special_tokens=False).input_ids
        else:
            ids = tokenizer(message + "\n\n").input_ids
        prompts.append(list(ids))
    return prompts


def token_prompts(vocab_size: int, num_prompts: int, block_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    low = min(16, vocab_size // 4)  # skip the usual special-token ids
    return [
        [rng.randrange(low, vocab_size) for _ in range(block_len)] * 3 for _ in range(num_prompts)
    ]


def run_engine(
    args: argparse.Namespace, prompts: list[list[int]], speculative_config: dict | None
) -> dict[str, Any]:
    """One engine: per batch size, wall and prefill-only times, outputs and spec stats."""
    import torch

    from lmserve import LLM, SamplingParams

    llm = LLM(
        args.model,
        dtype=args.dtype,
        device=args.device,
        load_format=args.load_format,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        enable_prefix_caching=False,
        speculative_config=speculative_config,
        # token ids in and out: a config-only folder (dummy weights) has no tokenizer
        skip_tokenizer_init=args.load_format == "dummy",
    )
    inputs = [{"prompt_token_ids": p} for p in prompts]
    decode = SamplingParams(
        temperature=0, max_tokens=args.output_len, min_tokens=args.output_len, ignore_eos=True
    )
    prefill = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def timed(params: SamplingParams, batch: int) -> tuple[float, list[list[int]]]:
        outputs = []
        start = time.perf_counter()
        for i in range(0, len(inputs), batch):
            outs = llm.generate(inputs[i : i + batch], params, use_tqdm=False)
            outputs += [list(o.outputs[0].token_ids) for o in outs]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, outputs

    timed(decode, max(args.batch_sizes))  # warm-up (graphs, allocator, kernels)
    runs = []
    for batch in args.batch_sizes:
        before = _copy(llm.get_spec_decode_stats())
        wall, outputs = timed(decode, batch)
        after = llm.get_spec_decode_stats()
        prefill_s, _ = timed(prefill, batch)
        num_out = sum(len(o) for o in outputs)
        decode_s = max(wall - prefill_s, 1e-9)
        run = {
            "batch_size": batch,
            "wall_s": wall,
            "prefill_s": prefill_s,
            "output_tokens": num_out,
            "output_tok_s": num_out / wall,
            "decode_tok_s": (num_out - len(outputs)) / decode_s,
            "outputs": outputs,
        }
        if after is not None:
            from lmserve.bench.spec_decode import difference

            run["spec_decode"] = difference(after, before).to_dict()
        runs.append(run)
    if args.profile_dir:
        for batch in args.batch_sizes:
            tag = f"{'ngram' if speculative_config else 'baseline'}_batch{batch}"
            _profile(lambda b=batch: timed(decode, b), args.profile_dir, tag, args.device)
    llm.shutdown()
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"runs": runs}


def _profile(run, out_dir: str, tag: str, device: str) -> None:
    """Where one timed pass's time goes: the host (cProfile, by own time) and the kernels
    (torch.profiler, by self device time and by self CPU time), as text files."""
    import cProfile
    import pstats

    import torch

    os.makedirs(out_dir, exist_ok=True)
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    with open(os.path.join(out_dir, f"{tag}_cprofile.txt"), "w") as f:
        pstats.Stats(profiler, stream=f).sort_stats("tottime").print_stats(45)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run()
    averages = prof.key_averages()
    with open(os.path.join(out_dir, f"{tag}_ops.txt"), "w") as f:
        for key in ("self_device_time_total", "self_cpu_time_total"):
            if key == "self_device_time_total" and len(activities) == 1:
                continue
            f.write(f"== by {key}\n{averages.table(sort_by=key, row_limit=35)}\n")


def _copy(stats):
    if stats is None:
        return None
    from lmserve.core.messages import SpecDecodeStats

    return SpecDecodeStats(
        stats.num_drafts,
        stats.num_draft_tokens,
        stats.num_accepted_tokens,
        list(stats.num_draft_tokens_per_pos),
        list(stats.num_accepted_tokens_per_pos),
    )


def build_prompts(args: argparse.Namespace) -> tuple[list[list[int]], str]:
    from lmserve.config import ModelConfig

    config = ModelConfig(model=args.model, load_format=args.load_format)
    workload = args.workload
    if workload == "auto":
        workload = "tokens" if args.load_format == "dummy" else "repeat-text"
    if workload == "tokens":
        return token_prompts(
            config.vocab_size, args.num_prompts, args.block_len, args.seed
        ), workload
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    return repeat_text_prompts(tokenizer, args.num_prompts), workload


def main() -> int:
    args = parse_args()
    prompts, workload = build_prompts(args)
    spec = {
        "method": "ngram",
        "num_speculative_tokens": args.num_speculative_tokens,
        "prompt_lookup_min": args.prompt_lookup_min,
        "prompt_lookup_max": args.prompt_lookup_max,
    }
    baseline = run_engine(args, prompts, None)
    ngram = run_engine(args, prompts, spec)
    rows = []
    for base, fast in zip(baseline["runs"], ngram["runs"]):
        rows.append(
            {
                "batch_size": base["batch_size"],
                "baseline": _strip(base),
                "ngram": _strip(fast),
                "speedup": fast["decode_tok_s"] / base["decode_tok_s"],
                "outputs_identical": base["outputs"] == fast["outputs"],
            }
        )
    print(_table(rows))
    document = {
        "benchmark": "spec_decode_bench",
        "model": args.model or "default (SmolLM2-135M-Instruct GGUF)",
        "dtype": args.dtype,
        "load_format": args.load_format,
        "workload": workload,
        "num_prompts": len(prompts),
        "mean_prompt_len": sum(map(len, prompts)) / len(prompts),
        "output_len": args.output_len,
        "speculative_config": spec,
        "machine": device_info(args.device),
        "runs": rows,
        "speedup": rows[0]["speedup"],  # at the first batch size
        "outputs_identical": all(r["outputs_identical"] for r in rows),
    }
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2)
        print(f"written to {args.output_json}")
    return 0


def _strip(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "outputs"}


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'batch':>5} {'base tok/s':>11} {'ngram tok/s':>12} {'speed-up':>9} "
        f"{'accept':>7} {'tok/verify':>10}  acceptance by position   same output"
    ]
    for r in rows:
        spec = r["ngram"].get("spec_decode") or {}
        by_pos = " ".join(f"{x:.2f}" for x in spec.get("acceptance_rate_per_pos", []))
        lines.append(
            f"{r['batch_size']:>5} {r['baseline']['decode_tok_s']:>11.1f} "
            f"{r['ngram']['decode_tok_s']:>12.1f} {r['speedup']:>8.2f}x "
            f"{spec.get('acceptance_rate', 0.0):>7.1%} {spec.get('mean_accepted_length', 1.0):>10.2f}"
            f"  {by_pos:<23}  {r['outputs_identical']}"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF folder, hub id or .gguf (default model)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="auto", help="auto | safetensors | dummy")
    p.add_argument("--workload", default="auto", choices=["auto", "repeat-text", "tokens"])
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--block-len", type=int, default=64, help="tokens workload: block length")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated, e.g. 1,8,32")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--prompt-lookup-min", type=int, default=2)
    p.add_argument("--prompt-lookup-max", type=int, default=5)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    p.add_argument(
        "--profile-dir", default=None, help="also write host and kernel profiles per batch size"
    )
    args = p.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    return args


if __name__ == "__main__":
    sys.exit(main())
