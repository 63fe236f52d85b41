"""Batch-1 decode of the default model on the CPU, measured the way a new user meets it, next to
llama.cpp and HF transformers in the same run (one after the other, same GGUF, same threads):

  lmserve serve      a 256-token greedy completion streamed from /v1/completions
  lmserve LLM        LLM.generate of the same, in the packed default and in the exact path
                     (--quantization none --dtype float32: today's float32 weights)
  llama.cpp          llama-cpp-python (build it from its PyPI sdist), streamed
  HF transformers    generate(), float32, the same GGUF loaded by transformers
  batched            LLM.generate of 64 requests at once, packed and exact

Decode rate = (tokens - 1) / (time of the last token - time of the first): the prompt's prefill
is left out where a stream gives the first token's time; LLM.generate and HF give only the
total, so theirs include one short prefill. Each side runs `--repeats` times; the median counts.
It also checks that llama.cpp and packed lmserve answer the test questions alike: greedy, from
the same prompt tokens (the chat template applied by lmserve's tokenizer), 48 tokens each.

    python benchmarks/cpu_decode.py --threads 2 --out benchmarks/results/cpu_decode.json

Prints a table and writes JSON (CPU model named). Never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_machine_info, write_result  # noqa: E402
from server_proc import start_lmserve  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and a storm."
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Why is the sky blue? Answer in two sentences.",
    "Give me a short tip for learning to cook.",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=256, help="tokens decoded per request")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp's and torch's")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=64, help="requests of the batched run")
    p.add_argument("--batch-tokens", type=int, default=64, help="tokens per batched request")
    p.add_argument("--skip", default="", help="comma list of sides to skip: llama,hf,server,llm")
    p.add_argument("--out", default=None)
    return p.parse_args()


def chat_prompts(gguf_path: str) -> list[list[int]]:
    """QUESTIONS as chat prompts, token ids, through the default model's chat template."""
    from transformers import AutoTokenizer

    from lmserve.model.loader import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(gguf_path))
    prompts = []
    for question in QUESTIONS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompts.append(tokenizer(text, add_special_tokens=False).input_ids)
    return prompts


def decode_rate(token_times: list[float]) -> float:
    """(tokens - 1) / seconds from the first token to the last."""
    return (len(token_times) - 1) / (token_times[-1] - token_times[0])


def bench_llama_cpp(gguf_path: str, args) -> dict:
    from llama_cpp import Llama

    llm = Llama(gguf_path, n_threads=args.threads, n_ctx=2048, verbose=False, seed=0)
    eos = llm.token_eos()
    rates = []
    for _ in range(args.repeats + 1):  # the first is a warm-up
        times = []
        stream = llm.create_completion(
            PROMPT, max_tokens=args.tokens, temperature=0.0, stream=True,
            logit_bias={eos: -1e9},
        )  # fmt: skip
        for _chunk in stream:
            times.append(time.perf_counter())
        rates.append(decode_rate(times))
    answers = []
    for prompt_ids in args.chat_prompts:
        out = llm.create_completion(prompt_ids, temperature=0.0, max_tokens=48)
        answers.append(out["choices"][0]["text"])
    return {"decode_tok_s": statistics.median(rates[1:]), "runs": rates[1:], "answers": answers}


def bench_hf(gguf_path: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    folder, name = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                min_new_tokens=args.tokens, do_sample=False, pad_token_id=tok.eos_token_id,
            )  # fmt: skip
        rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - start))
    return {"total_tok_s": statistics.median(rates), "runs": rates}


def bench_llm(args, quantization: str, dtype: str) -> dict:
    from lmserve import LLM, SamplingParams

    llm = LLM(quantization=quantization, dtype=dtype, max_model_len=2048)
    one = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate([PROMPT], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = llm.generate([PROMPT], one, use_tqdm=False)
        rates.append(len(out[0].outputs[0].token_ids) / (time.perf_counter() - start))
    batch = SamplingParams(temperature=0.0, max_tokens=args.batch_tokens, ignore_eos=True)
    prompts = [f"{PROMPT} Variant {i}." for i in range(args.batch)]
    start = time.perf_counter()
    outs = llm.generate(prompts, batch, use_tqdm=False)
    seconds = time.perf_counter() - start
    chat = SamplingParams(temperature=0.0, max_tokens=48)
    prompts = [{"prompt_token_ids": ids} for ids in args.chat_prompts]
    answers = [o.outputs[0].text for o in llm.generate(prompts, chat, use_tqdm=False)]
    llm.shutdown()
    return {
        "total_tok_s": statistics.median(rates),
        "runs": rates,
        "batched_output_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / seconds,
        "answers": answers,
    }


# Where a batch-1 step's time goes: (label, module, class, method), timed by wrapping.
_PARTS = [
    ("schedule", "lmserve.core.scheduler", "Scheduler", "schedule"),
    ("update_from_output", "lmserve.core.scheduler", "Scheduler", "update_from_output"),
    ("input_prep", "lmserve.worker.input_batch", "InputBatch", "prepare_inputs"),
    ("model_forward", "lmserve.worker.model_runner", "ModelRunner", "_forward"),
    ("lm_head", "lmserve.model.layers.embedding", "LMHead", "forward"),
    ("sampling", "lmserve.worker.model_runner", "ModelRunner", "_sample"),
    ("detokenize_and_outputs", "lmserve.engine.output_processor", "OutputProcessor", "process_outputs"),
]  # fmt: skip


def step_breakdown(args) -> dict:
    """ms per decode step in each part, the engine in this process (no IPC), 128 tokens."""
    import importlib

    os.environ["LMSERVE_ENABLE_MULTIPROCESSING"] = "0"
    from lmserve import LLM, SamplingParams

    totals = {label: 0.0 for label, *_ in _PARTS}
    for label, module, cls, method in _PARTS:
        owner = getattr(importlib.import_module(module), cls)
        original = getattr(owner, method)

        def timed(*a, _original=original, _label=label, **k):
            start = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                totals[_label] += time.perf_counter() - start

        setattr(owner, method, timed)
    llm = LLM(max_model_len=2048)
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    llm.generate([PROMPT], params, use_tqdm=False)  # warm-up
    for label in totals:
        totals[label] = 0.0
    start = time.perf_counter()
    llm.generate([PROMPT], params, use_tqdm=False)
    wall = time.perf_counter() - start
    llm.shutdown()
    os.environ["LMSERVE_ENABLE_MULTIPROCESSING"] = "1"
    per_step = {label: 1e3 * t / 128 for label, t in totals.items()}
    per_step["step_wall"] = 1e3 * wall / 128
    return per_step


def bench_server(args) -> dict:
    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile()
    proc = start_lmserve(["--max-model-len", "2048", "--disable-access-log"], port, log)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        model = requests.get(f"{base}/models", timeout=10).json()["data"][0]["id"]
        rates = []
        for _ in range(args.repeats + 1):
            body = {
                "model": model, "prompt": PROMPT, "max_tokens": args.tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": True,
            }  # fmt: skip
            times = []
            with requests.post(f"{base}/completions", json=body, stream=True, timeout=600) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith(b"data: ") and line != b"data: [DONE]":
                        if json.loads(line[6:])["choices"][0]["text"]:
                            times.append(time.perf_counter())
            rates.append(decode_rate(times))
    finally:
        proc.terminate()
        proc.wait(30)
    return {"decode_tok_s": statistics.median(rates[1:]), "runs": rates[1:]}


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from lmserve.model.default_model import default_model_path

    gguf_path = default_model_path()
    args.chat_prompts = chat_prompts(gguf_path)
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, dict] = {}
    if "llama" not in skip:
        results["llama_cpp"] = bench_llama_cpp(gguf_path, args)
    if "server" not in skip:
        results["lmserve_serve"] = bench_server(args)
    if "llm" not in skip:
        results["lmserve_llm_packed"] = bench_llm(args, "auto", "auto")
        results["lmserve_llm_exact"] = bench_llm(args, "none", "float32")
    if "hf" not in skip:
        results["hf_transformers"] = bench_hf(gguf_path, args)
    breakdown = step_breakdown(args)
    print("batch-1 step, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in breakdown.items()))

    rows = []
    llama = results.get("llama_cpp", {}).get("decode_tok_s")
    for name, r in results.items():
        rate = r.get("decode_tok_s") or r.get("total_tok_s")
        kind = "decode" if "decode_tok_s" in r else "total"
        ratio = f"{rate / llama:.2f}" if llama else "-"
        batched = r.get("batched_output_tok_s")
        rows.append((name, f"{rate:.1f}", kind, ratio, f"{batched:.1f}" if batched else "-"))
    print(f"{'side':<20} {'tok/s':>8} {'measured':>9} {'vs llama.cpp':>13} {'batched tok/s':>14}")
    for row in rows:
        print(f"{row[0]:<20} {row[1]:>8} {row[2]:>9} {row[3]:>13} {row[4]:>14}")
    if "llama_cpp" in results and "lmserve_llm_packed" in results:
        for side in ("lmserve_llm_packed", "lmserve_llm_exact"):
            ours = results[side]["answers"]
            same = [a == b for a, b in zip(results["llama_cpp"]["answers"], ours)]
            results[f"{side}_answers_equal_to_llama_cpp"] = same
            print(f"{side}: greedy chat answers equal to llama.cpp's: {sum(same)}/{len(same)}")
    if "lmserve_llm_packed" in results:
        pairs = zip(
            results["lmserve_llm_packed"]["answers"], results["lmserve_llm_exact"]["answers"]
        )
        same = [a == b for a, b in pairs]
        results["packed_answers_equal_to_exact_float32"] = same
        print(
            f"packed greedy chat answers equal to the exact float32 path's: {sum(same)}/{len(same)}"
        )
    report = {
        "benchmark": "cpu_decode",
        "model": os.path.basename(gguf_path),
        "tokens": args.tokens,
        "threads": args.threads,
        "batch": args.batch,
        "batch_tokens": args.batch_tokens,
        "results": results,
        "step_breakdown_ms": breakdown,
        "machine": cpu_machine_info("cpu", torch_threads=args.threads),
    }
    if args.out:
        write_result(args.out, report)


if __name__ == "__main__":
    main()
