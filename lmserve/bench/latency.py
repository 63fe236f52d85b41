"""`lmserve bench latency`: how long one fixed batch takes, end to end and per engine step.

    lmserve bench latency MODEL --batch-size 8 --input-len 128 --output-len 64 \\
        --num-iters 10 --num-iters-warmup 2 --output-json latency.json

Each iteration sends `--batch-size` requests of `--input-len` random prompt token ids (fresh ids
every iteration, so the prefix cache does not turn later prefills into cache hits) that each
generate exactly `--output-len` tokens (ignore_eos), and drives the engine step by step, timing:
    latency      the whole batch, first request queued -> last token
    ttft         until every request of the batch has its first token (the prefill steps)
    decode step  every engine step after that; each gives one more token to every running
                 request, so it is the per-output-token latency
Warm-up iterations run first and are not counted.

`--output-json` writes vLLM's avg_latency, latencies (s, one per iteration) and percentiles
({"10": s, "25": ..., "99": ...}), plus avg_ttft, ttfts, avg_decode_step_latency,
decode_step_percentiles, decode_step_latencies (s, every timed decode step), and the settings;
with `--speculative-config`, spec_decode (draft and accepted tokens, acceptance rates; all
iterations, warm-up included). A decode step then gives each request 1..k+1 tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lmserve.bench.spec_decode import format_spec_decode
from lmserve.sampling_params import RequestOutputKind, SamplingParams

PERCENTILES = (10, 25, 50, 75, 90, 99)


@dataclass(slots=True)
class IterationTiming:
    latency: float  # s, whole batch
    ttft: float  # s, until every request has its first token
    decode_steps: list[float] = field(default_factory=list)  # s per decode step


def run_iteration(
    llm: Any, prompts: list[list[int]], params: SamplingParams, tag: str
) -> IterationTiming:
    """Queue `prompts` and step the engine until all finish, timing every step."""
    engine = llm.llm_engine
    request_ids = [f"{tag}-{i}" for i in range(len(prompts))]
    tokens = dict.fromkeys(request_ids, 0)
    start = time.perf_counter()
    for request_id, ids in zip(request_ids, prompts):
        engine.add_request(request_id, {"prompt_token_ids": ids}, params)
    ttft = None
    decode_steps = []
    step_start = time.perf_counter()
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        if ttft is not None:
            decode_steps.append(now - step_start)
        for out in outputs:  # DELTA: the tokens this step added
            tokens[out.request_id] += len(out.outputs[0].token_ids)
        if ttft is None and all(tokens.values()):
            ttft = now - start
        step_start = now
    latency = time.perf_counter() - start
    return IterationTiming(latency, latency if ttft is None else ttft, decode_steps)


def random_prompts(
    rng: np.random.Generator,
    vocab_size: int,
    special_ids: list[int],
    batch_size: int,
    input_len: int,
) -> list[list[int]]:
    """batch_size lists of input_len token ids, none of them special."""
    pool = np.setdiff1d(np.arange(vocab_size), np.asarray(special_ids, dtype=np.int64))
    return rng.choice(pool, size=(batch_size, input_len)).tolist()


def percentiles_of(values: list[float]) -> dict[str, float]:
    if not values:
        return {str(p): 0.0 for p in PERCENTILES}
    return {str(p): float(np.percentile(values, p)) for p in PERCENTILES}


def add_latency_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("latency")
    group.add_argument("--batch-size", type=int, default=8)
    group.add_argument("--input-len", type=int, default=32)
    group.add_argument("--output-len", type=int, default=128)
    group.add_argument("--num-iters", type=int, default=30)
    group.add_argument("--num-iters-warmup", type=int, default=10)
    group.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    group.add_argument("--output-json", default=None, metavar="PATH")
    group.add_argument("--disable-tqdm", action="store_true")


def main(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> int:
    """`lmserve bench latency`; engine_kwargs are the parsed engine flags."""
    from lmserve import LLM

    for name in ("batch_size", "input_len", "output_len", "num_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.num_iters_warmup < 0:
        raise ValueError(f"--num-iters-warmup {args.num_iters_warmup} must be >= 0")
    llm = LLM(args.model, **engine_kwargs)
    try:
        timings = _measure(llm, args)
        spec_stats = llm.get_spec_decode_stats()  # all iterations, warm-up included
    finally:
        llm.shutdown()
    result = _result(args, timings)
    if spec_stats is not None:
        result["spec_decode"] = spec_stats.to_dict()
    print(_format(result))
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


def _measure(llm: Any, args: argparse.Namespace) -> list[IterationTiming]:
    tokenizer = llm.get_tokenizer()
    special_ids = list(getattr(tokenizer, "all_special_ids", None) or [])
    vocab_size = llm.config.model_config.vocab_size
    rng = np.random.default_rng(args.seed)
    params = SamplingParams(
        temperature=args.temperature,
        top_p=1.0,
        max_tokens=args.output_len,
        min_tokens=args.output_len,
        ignore_eos=True,
        output_kind=RequestOutputKind.DELTA,
    )
    timings = []
    total = args.num_iters_warmup + args.num_iters
    for it in tqdm(range(total), desc="Iterations", disable=args.disable_tqdm, dynamic_ncols=True):
        prompts = random_prompts(rng, vocab_size, special_ids, args.batch_size, args.input_len)
        timing = run_iteration(llm, prompts, params, tag=f"latency-{it}")
        if it >= args.num_iters_warmup:
            timings.append(timing)
    return timings


def _result(args: argparse.Namespace, timings: list[IterationTiming]) -> dict[str, Any]:
    latencies = [t.latency for t in timings]
    ttfts = [t.ttft for t in timings]
    steps = [s for t in timings for s in t.decode_steps]
    return {
        "model": args.model,
        "batch_size": args.batch_size,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_iters": args.num_iters,
        "num_iters_warmup": args.num_iters_warmup,
        "temperature": args.temperature,
        "avg_latency": float(np.mean(latencies)),
        "latencies": latencies,
        "percentiles": percentiles_of(latencies),
        "avg_ttft": float(np.mean(ttfts)),
        "ttfts": ttfts,
        "avg_decode_step_latency": float(np.mean(steps)) if steps else 0.0,
        "decode_step_percentiles": percentiles_of(steps),
        "decode_step_latencies": steps,
    }


def _format(result: dict[str, Any]) -> str:
    lines = [
        f"Avg latency: {result['avg_latency']:.4f} s "
        f"(batch {result['batch_size']}, {result['input_len']} in, {result['output_len']} out)",
        f"Avg time to first token (whole batch): {result['avg_ttft'] * 1000:.2f} ms",
        f"Avg decode step (per output token): {result['avg_decode_step_latency'] * 1000:.2f} ms",
        f"{'percentile':>10} {'latency s':>12} {'decode step ms':>15}",
    ]
    for p in PERCENTILES:
        latency = result["percentiles"][str(p)]
        step = result["decode_step_percentiles"][str(p)] * 1000
        lines.append(f"{p:>10} {latency:>12.4f} {step:>15.3f}")
    if result.get("spec_decode"):
        lines.append(format_spec_decode(result["spec_decode"]))
    return "\n".join(lines)
