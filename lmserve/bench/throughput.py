"""`lmserve bench throughput`: offline throughput on a dataset, lmserve next to its peer.

    lmserve bench throughput MODEL --backend both --dataset-name random \\
        --input-len 256 --output-len 64 --num-prompts 200 --output-json tput.json

Backends, given exactly the same requests (the same prompt token ids, the tokenizer's special
tokens included, and the same number of output tokens per request):
    lmserve  `LLM(MODEL, **engine flags).generate`, every request with
             SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True): exactly n tokens
    hf       HF transformers `generate` in static batches (`--hf-max-batch-size`), left padded;
             a batch holds requests of one output length n (sorted by prompt length to limit
             padding) and runs with min_new_tokens = max_new_tokens = n: exactly n tokens each
    both     lmserve, then hf, and the ratio of their output tokens/s
Only generation is timed: loading weights and building the engine are not. `--temperature 0` is
greedy on both sides; above 0 both sample from the full distribution (top_p=1, no top_k).
MODEL defaults to lmserve's default model; the hf backend loads the same weights (for a .gguf
model, the folder it was converted to).

`--output-json` writes, for one backend, vLLM's keys: elapsed_time (s), num_requests,
total_num_tokens, requests_per_second, tokens_per_second (prompt + output), plus
output_tokens_per_second, total_prompt_tokens, total_output_tokens, backend, model,
dataset_name, temperature, and with `--speculative-config` spec_decode (draft and accepted
tokens, acceptance rate overall and by position). With `--backend both`: {"results": [lmserve's, hf's],
"lmserve_over_hf_output_tokens_per_second": ratio}.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tqdm.auto import tqdm

from lmserve.bench.datasets import add_dataset_args, build_requests, dataset_name
from lmserve.bench.spec_decode import format_spec_decode

BACKENDS = ("lmserve", "hf", "both")


@dataclass(slots=True)
class ThroughputResult:
    backend: str
    elapsed_time: float  # seconds of generation
    num_requests: int
    total_prompt_tokens: int
    total_output_tokens: int  # tokens actually generated
    spec_decode: dict[str, Any] | None = None  # lmserve with speculative decoding: its figures

    def __post_init__(self) -> None:
        assert self.elapsed_time > 0, self

    @property
    def total_num_tokens(self) -> int:
        return self.total_prompt_tokens + self.total_output_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "total_num_tokens": self.total_num_tokens,
            "requests_per_second": self.num_requests / self.elapsed_time,
            "tokens_per_second": self.total_num_tokens / self.elapsed_time,
            "output_tokens_per_second": self.total_output_tokens / self.elapsed_time,
        }

    def format(self) -> str:
        d = self.to_dict()
        return (
            f"[{self.backend}] Throughput: {d['requests_per_second']:.2f} requests/s, "
            f"{d['tokens_per_second']:.2f} total tokens/s, "
            f"{d['output_tokens_per_second']:.2f} output tokens/s\n"
            f"[{self.backend}] Total num prompt tokens: {self.total_prompt_tokens}, "
            f"total num output tokens: {self.total_output_tokens}, "
            f"elapsed: {self.elapsed_time:.2f} s"
        ) + (f"\n{format_spec_decode(self.spec_decode)}" if self.spec_decode else "")


def run_lmserve(
    model: str | None,
    engine_kwargs: dict[str, Any],
    prompts: Sequence[list[int]],
    output_lens: Sequence[int],
    temperature: float,
    use_tqdm: bool = True,
) -> ThroughputResult:
    """Generate exactly output_lens[i] tokens for prompts[i] with lmserve's LLM."""
    from lmserve import LLM, SamplingParams

    llm = LLM(model, **engine_kwargs)
    try:
        params = [
            SamplingParams(
                temperature=temperature, top_p=1.0, max_tokens=n, min_tokens=n, ignore_eos=True
            )
            for n in output_lens
        ]
        inputs = [{"prompt_token_ids": list(ids)} for ids in prompts]
        start = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=use_tqdm)
        elapsed = time.perf_counter() - start
        spec_stats = llm.get_spec_decode_stats()
    finally:
        llm.shutdown()
    return ThroughputResult(
        backend="lmserve",
        elapsed_time=elapsed,
        num_requests=len(prompts),
        total_prompt_tokens=sum(len(p) for p in prompts),
        total_output_tokens=sum(len(o.outputs[0].token_ids) for o in outputs),
        spec_decode=spec_stats.to_dict() if spec_stats is not None else None,
    )


def hf_batches(
    prompt_lens: Sequence[int], output_lens: Sequence[int], max_batch_size: int
) -> list[tuple[list[int], int]]:
    """Static batches as (request indices, output length): one output length per batch, at most
    `max_batch_size` requests, similar prompt lengths together (less left padding)."""
    order = sorted(range(len(prompt_lens)), key=lambda i: (output_lens[i], prompt_lens[i]))
    batches: list[tuple[list[int], int]] = []
    for i in order:
        if batches and batches[-1][1] == output_lens[i] and len(batches[-1][0]) < max_batch_size:
            batches[-1][0].append(i)
        else:
            batches.append(([i], output_lens[i]))
    return batches


def run_hf(
    model_path: str,
    prompts: Sequence[list[int]],
    output_lens: Sequence[int],
    temperature: float,
    dtype: Any,
    device: str,
    max_batch_size: int,
    pad_token_id: int,
    seed: int = 0,
    use_tqdm: bool = True,
) -> ThroughputResult:
    """Generate exactly output_lens[i] tokens for prompts[i] with HF transformers, in static
    left-padded batches (see hf_batches)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    sampling = temperature > 0
    options: dict[str, Any] = dict(do_sample=sampling, pad_token_id=pad_token_id)
    if sampling:  # the full distribution, as lmserve samples it: no top-k, no top-p
        options.update(temperature=temperature, top_k=0, top_p=1.0)
    else:  # silence generation_config sampling defaults that greedy ignores
        options.update(temperature=None, top_k=None, top_p=None)
    torch.manual_seed(seed)
    batches = hf_batches([len(p) for p in prompts], output_lens, max_batch_size)
    generated = 0
    start = time.perf_counter()
    with (
        torch.inference_mode(),
        tqdm(
            total=len(prompts), desc="HF generate", disable=not use_tqdm, dynamic_ncols=True
        ) as bar,
    ):
        for indices, n in batches:
            input_ids, attention_mask = left_pad([prompts[i] for i in indices], pad_token_id)
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=n,
                min_new_tokens=n,
                **options,
            )  # [batch, padded_prompt_len + n]
            generated += (out.shape[1] - input_ids.shape[1]) * len(indices)
            bar.update(len(indices))
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return ThroughputResult(
        backend="hf",
        elapsed_time=elapsed,
        num_requests=len(prompts),
        total_prompt_tokens=sum(len(p) for p in prompts),
        total_output_tokens=generated,
    )


def left_pad(prompts: Sequence[list[int]], pad_token_id: int):
    """(input_ids [batch, max_len], attention_mask [batch, max_len]), padding on the left."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def add_throughput_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("throughput")
    group.add_argument("--backend", choices=BACKENDS, default="lmserve")
    group.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    group.add_argument("--hf-max-batch-size", type=int, default=64, help="hf: requests per batch")
    group.add_argument("--output-json", default=None, metavar="PATH")
    group.add_argument("--disable-tqdm", action="store_true")
    add_dataset_args(parser)


def main(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> int:
    """`lmserve bench throughput`; engine_kwargs are the parsed engine flags."""
    from transformers import AutoTokenizer

    from lmserve.config import ModelConfig

    if args.hf_max_batch_size < 1:
        raise ValueError(f"--hf-max-batch-size {args.hf_max_batch_size} must be >= 1")
    model_config = ModelConfig(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, revision=args.revision
    )
    tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer)
    requests = build_requests(args, tokenizer, args.seed, progress=not args.disable_tqdm)
    prompts = [tokenizer(r.prompt).input_ids for r in requests]  # with BOS where it adds one
    output_lens = [r.expected_output_len for r in requests]
    use_tqdm = not args.disable_tqdm
    results = []
    if args.backend in ("lmserve", "both"):
        results.append(
            run_lmserve(args.model, engine_kwargs, prompts, output_lens, args.temperature, use_tqdm)
        )
    if args.backend in ("hf", "both"):
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        results.append(
            run_hf(
                model_config.model_path or model_config.model,
                prompts,
                output_lens,
                args.temperature,
                model_config.dtype,
                _hf_device(args.device),
                args.hf_max_batch_size,
                pad if pad is not None else 0,
                args.seed,
                use_tqdm,
            )
        )
    for result in results:
        print(result.format())
    context = {
        "model": model_config.model,
        "dataset_name": dataset_name(args),
        "temperature": args.temperature,
    }
    documents = [{**r.to_dict(), **context} for r in results]
    if len(results) == 2:
        ratio = documents[0]["output_tokens_per_second"] / documents[1]["output_tokens_per_second"]
        print(f"lmserve / hf output tokens/s: {ratio:.2f}x")
        document: dict[str, Any] = {
            "results": documents,
            "lmserve_over_hf_output_tokens_per_second": ratio,
        }
    else:
        document = documents[0]
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2)
    return 0


def _hf_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
