"""What structured outputs cost: output throughput with half the requests JSON-Schema
constrained, against the same requests unconstrained, and grammar compile times (p50/p99) for
the test schemas.

    # CPU, the default model (SmolLM2-135M-Instruct GGUF)
    python benchmarks/structured_output_bench.py
    # GPU: the Llama-3-8B shape with dummy weights, bf16, 256 concurrent requests, the default
    # model's tokenizer (JSON needs real characters: a word-level tokenizer cannot spell it)
    python benchmarks/structured_output_bench.py --shape 8b --load-format dummy \\
        --device cuda --num-requests 256

Three timed runs send the same prompts with the same sampling (temperature 1; request i
seeded with i unless --unseeded):
  - `unconstrained`: every request ignores EOS and writes exactly --max-tokens;
  - the constrained run (e.g. `50%_json_schema`): every other request constrained by a test
    schema; those stop where their grammar ends, so this run has fewer output tokens and its
    batch shrinks as it goes;
  - `length_matched`: the constrained run's requests without their constraint, each writing
    (EOS ignored) exactly as many tokens as it wrote constrained — the same work, minus the
    grammar. The headline `relative_throughput` compares the constrained run with this one;
    `relative_throughput_vs_full_length` (the old figure) compares it with `unconstrained`.
With --repeats N the three runs go round N times and each keeps its median round (a GPU run
of 256 requests lasts about a second, so one round is noisy). Throughput is output tokens per
second; `mean_step_ms` is the run's time over the engine steps
it took. Grammars are compiled (and cached) before the timed runs; compile times are measured
separately, each schema once, on a fresh compiler. Prints a table and writes JSON under
benchmarks/results/; never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: the test schemas
from machine import device_info  # noqa: E402

from tests.structured_output.schemas import SCHEMAS  # noqa: E402


def default_tokenizer_dir(tmp: str) -> str:
    """The default model's tokenizer, saved as a folder (converting the GGUF once)."""
    from transformers import AutoTokenizer

    from lmserve.config import ModelConfig

    model_config = ModelConfig()  # the default model, converted into the cache folder
    tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer)
    path = os.path.join(tmp, "tokenizer")
    tokenizer.save_pretrained(path)
    return path


def model_path(args, tmp: str) -> str | None:
    """None = the default model; else a shape folder with the default model's tokenizer."""
    if args.shape is None:
        return None
    from gpu_shapes import write_shape

    path = write_shape(tmp, args.shape)
    from transformers import AutoTokenizer

    source = args.tokenizer or default_tokenizer_dir(tmp)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return path


def make_params(
    num_requests: int, constrained_share: float, max_tokens: int, seeded: bool = True
) -> list:
    from lmserve import SamplingParams
    from lmserve.sampling_params import StructuredOutputsParams

    schemas = list(SCHEMAS.values())
    params = []
    for i in range(num_requests):
        # spread evenly: with share 0.5, every other request
        constrained = int((i + 1) * constrained_share) > int(i * constrained_share)
        params.append(
            SamplingParams(
                temperature=1.0,
                seed=i if seeded else None,
                max_tokens=max_tokens,
                ignore_eos=not constrained,
                structured_outputs=(
                    StructuredOutputsParams(json=schemas[i % len(schemas)]) if constrained else None
                ),
            )
        )
    return params


def length_matched(params: list, lengths: list[int]) -> list:
    """`params` without their constraints, each request writing exactly `lengths[i]` tokens
    (EOS ignored): the constrained run's work without the grammar."""
    from lmserve import SamplingParams

    return [
        SamplingParams(
            temperature=p.temperature,
            seed=p.seed,
            max_tokens=max(n, 1),
            ignore_eos=True,
        )
        for p, n in zip(params, lengths)
    ]


class StepCounter:
    """Counts the engine steps that computed tokens, from the stats each step's outputs carry
    (one message per step, in or out of process)."""

    def __init__(self, llm) -> None:
        client = llm.llm_engine.engine_core
        self.get_output = client.get_output
        self.num_steps = 0
        client.get_output = self._get_output

    def _get_output(self):
        outputs = self.get_output()
        stats = outputs.scheduler_stats
        if stats is not None and stats.iteration_tokens:
            self.num_steps += 1
        return outputs


def timed_run(llm, steps: StepCounter, prompts: list[str], params: list) -> tuple[dict, list[int]]:
    """(the run's figures, each request's number of output tokens)."""
    steps.num_steps = 0
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = [len(o.outputs[0].token_ids) for o in outputs]
    constrained = [t for t, p in zip(tokens, params) if p.structured_outputs is not None]
    valid = 0
    for out, p in zip(outputs, params):
        if p.structured_outputs is not None:
            try:
                json.loads(out.outputs[0].text)
                valid += 1
            except ValueError:
                pass
    run = {
        "seconds": round(seconds, 3),
        "output_tokens": sum(tokens),
        "output_tokens_per_s": round(sum(tokens) / seconds, 1),
        "num_steps": steps.num_steps,
        "mean_step_ms": round(1000 * seconds / max(steps.num_steps, 1), 3),
        "num_constrained": len(constrained),
        "constrained_output_tokens": sum(constrained),
        "constrained_outputs_that_parse": valid,
    }
    return run, tokens


def median_run(runs: list[dict]) -> dict:
    """The round with the median time (the lower middle one of an even count), with every
    round's seconds beside it."""
    ordered = sorted(runs, key=lambda run: run["seconds"])
    return {**ordered[(len(ordered) - 1) // 2], "rounds_seconds": [r["seconds"] for r in runs]}


def compile_times(tokenizer_dir_or_model: str, vocab_size: int) -> dict:
    """Seconds to compile each test schema once on a fresh compiler (no cache hits)."""
    from transformers import AutoTokenizer

    from lmserve.sampling_params import StructuredOutputsParams
    from lmserve.structured_output.xgrammar_backend import XgrammarBackend

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir_or_model)
    start = time.perf_counter()
    backend = XgrammarBackend(tokenizer, vocab_size)
    setup = time.perf_counter() - start
    times = []
    for schema in SCHEMAS.values():
        start = time.perf_counter()
        backend.compile(StructuredOutputsParams(json=schema))
        times.append(time.perf_counter() - start)
    times.sort()
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    return {
        "num_schemas": len(times),
        "tokenizer_info_s": round(setup, 4),
        "p50_ms": round(1000 * statistics.median(times), 2),
        "p99_ms": round(1000 * p99, 2),
        "max_ms": round(1000 * times[-1], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["0.5b", "8b", "70b"], default=None)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="with --shape: a tokenizer folder (default: the default model's)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--constrained-share", type=float, default=0.5)
    parser.add_argument("--output", default=None, help="JSON path (default: under results/)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed rounds; each run's median round is kept"
    )
    parser.add_argument(
        "--unseeded",
        action="store_true",
        help="requests without a seed (default: request i has seed i, so every run draws alike)",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    from lmserve import LLM

    tmp = tempfile.mkdtemp()
    model = model_path(args, tmp)
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    kwargs = dict(device=args.device, dtype=dtype, load_format=args.load_format, max_model_len=1024)
    if args.device == "cpu":
        kwargs["cpu_kvcache_space_gib"] = 1.0
    kwargs["max_num_seqs"] = max(args.num_requests, 1)
    llm = LLM(model, **kwargs) if model else LLM(**kwargs)
    model_config = llm.llm_engine.config.model_config
    prompts = [f"Write the record number {i} as JSON:" for i in range(args.num_requests)]

    seeded = not args.unseeded
    constrained = make_params(args.num_requests, args.constrained_share, args.max_tokens, seeded)
    plain = make_params(args.num_requests, 0.0, args.max_tokens, seeded)
    steps = StepCounter(llm)
    # warm-up: grammars compiled and cached, CUDA graphs, every run's shapes once
    _, warm_lengths = timed_run(llm, steps, prompts, constrained)
    for params in (plain, length_matched(constrained, warm_lengths)):
        llm.generate(prompts, params, use_tqdm=False)
    name = f"{int(args.constrained_share * 100)}%_json_schema"
    rounds: dict[str, list[dict]] = {"unconstrained": [], name: [], "length_matched": []}
    for _ in range(args.repeats):  # one round: the three runs one after the other
        rounds["unconstrained"].append(timed_run(llm, steps, prompts, plain)[0])
        run, lengths = timed_run(llm, steps, prompts, constrained)
        rounds[name].append(run)
        matched_params = length_matched(constrained, lengths)
        rounds["length_matched"].append(timed_run(llm, steps, prompts, matched_params)[0])
    results = {kind: median_run(runs) for kind, runs in rounds.items()}
    full = results["unconstrained"]["output_tokens_per_s"]
    matched = results["length_matched"]["output_tokens_per_s"]
    for run in results.values():
        run["relative_throughput"] = round(run["output_tokens_per_s"] / matched, 3)
        run["relative_throughput_vs_full_length"] = round(run["output_tokens_per_s"] / full, 3)
    results[name]["relative_step_time"] = round(
        results[name]["mean_step_ms"] / results["length_matched"]["mean_step_ms"], 3
    )
    compile_stats = compile_times(model_config.tokenizer, model_config.vocab_size)
    llm.shutdown()

    summary = {
        "benchmark": "structured_output_bench",
        "model": args.shape or "SmolLM2-135M-Instruct (default)",
        "load_format": args.load_format,
        "dtype": dtype,
        "num_requests": args.num_requests,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "seeded_requests": not args.unseeded,
        "vocab_size": model_config.vocab_size,
        "async_scheduling": llm.llm_engine.config.scheduler_config.async_scheduling,
        "relative_throughput": results[name]["relative_throughput"],
        "relative_throughput_vs_full_length": results[name]["relative_throughput_vs_full_length"],
        "runs": results,
        "grammar_compile": compile_stats,
        "machine": device_info(args.device),
    }
    print_table(summary)
    out = args.output or os.path.join(
        HERE, "results", f"structured_output_{args.shape or 'default'}_{args.device}.json"
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nwrote {out}")


def print_table(summary: dict) -> None:
    machine = summary["machine"]
    where = machine.get("gpu") or machine.get("cpu_model") or machine["device"]
    print(
        f"\nstructured outputs, {summary['model']}, {summary['dtype']}, "
        f"{summary['num_requests']} requests x <= {summary['max_tokens']} tokens, {where}, "
        f"async scheduling {'on' if summary['async_scheduling'] else 'off'}"
    )
    print(
        f"{'run':<22}{'seconds':>9}{'out tok':>9}{'tok/s':>10}{'steps':>7}{'ms/step':>9}"
        f"{'vs matched':>12}{'vs full':>9}{'valid JSON':>12}"
    )
    for name, run in summary["runs"].items():
        valid = f"{run['constrained_outputs_that_parse']}/{run['num_constrained']}"
        print(
            f"{name:<22}{run['seconds']:>9.2f}{run['output_tokens']:>9}"
            f"{run['output_tokens_per_s']:>10.1f}{run['num_steps']:>7}{run['mean_step_ms']:>9.2f}"
            f"{run['relative_throughput']:>12.3f}{run['relative_throughput_vs_full_length']:>9.3f}"
            f"{valid:>12}"
        )
    print(
        f"headline: constrained / length-matched throughput = {summary['relative_throughput']}"
        f" (vs full-length unconstrained: {summary['relative_throughput_vs_full_length']})"
    )
    c = summary["grammar_compile"]
    print(
        f"grammar compile ({c['num_schemas']} test schemas, vocab {summary['vocab_size']}): "
        f"p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms, max {c['max_ms']} ms; "
        f"tokenizer info {c['tokenizer_info_s']} s"
    )


if __name__ == "__main__":
    main()
