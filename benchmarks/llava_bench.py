"""LLaVA serving speed: lmserve against HF transformers `generate`, in the same run.

A LLaVA-1.5-7B-shaped model (CLIP ViT-L/14-336 tower, 2-layer projector, Llama-2-7B LM) with
dummy weights; N requests, each one distinct 336x336 image (576 placeholder tokens) and a
64-token question, 128 output tokens (ignore_eos). Reports requests/s, TTFT (time to the
first token of a batch of N, max_tokens=1) for both, and the share of lmserve's step time the
vision encoder took. Prints a table and writes JSON; never asserts on time.

    python benchmarks/llava_bench.py                    # GPU, bf16
    python benchmarks/llava_bench.py --tiny             # CPU smoke test (tiny shapes, fp32)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("LMSERVE_ENABLE_MULTIPROCESSING", "0")  # read the scheduler in-process
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import device_info  # noqa: E402

IMAGE_TOKEN_ID = 32000
LLAVA15_7B = dict(
    vision=dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    ),
    text=dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
        rms_norm_eps=1e-5, architectures=["LlamaForCausalLM"],
    ),
)  # fmt: skip
TINY = dict(
    vision=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=28, patch_size=7, projection_dim=32,
    ),
    text=dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=32064, max_position_embeddings=2048,
        rms_norm_eps=1e-6, architectures=["LlamaForCausalLM"],
    ),
)  # fmt: skip


def write_model(tmp: str, shape: dict) -> str:
    """Config + CLIP image processor only (weights: load_format="dummy" / random in HF)."""
    import transformers

    path = os.path.join(tmp, "llava-shape")
    vision = transformers.CLIPVisionConfig(**shape["vision"])
    text = transformers.LlamaConfig(**shape["text"])
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(path)
    size = vision.image_size
    transformers.CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    ).save_pretrained(path)
    return path


def make_requests(n: int, question_len: int, image_size: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(n):
        pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        question = rng.integers(100, 30000, question_len).tolist()
        requests.append(
            {
                "prompt_token_ids": [1, IMAGE_TOKEN_ID, *question],
                "multi_modal_data": {"image": Image.fromarray(pixels, "RGB")},
            }
        )
    return requests


def run_lmserve(args, model_dir: str, request_sets: dict) -> dict:
    """request_sets: warmup, ttft, full — distinct images, so the encoder cache never hits."""
    from lmserve import LLM, SamplingParams

    llm = LLM(
        model_dir,
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        enable_prefix_caching=False,  # every run computes every image and prompt
        max_num_seqs=args.num_requests,
        **({"cpu_kvcache_space_gib": 0.5} if args.device == "cpu" else {}),
    )
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    encoder_seconds = [0.0]
    update = scheduler.update_from_output

    def counting_update(scheduler_output, runner_output):
        encoder_seconds[0] += runner_output.encoder_seconds
        return update(scheduler_output, runner_output)

    scheduler.update_from_output = counting_update
    full = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    requests = request_sets["full"]
    llm.generate(request_sets["warmup"], full, use_tqdm=False)
    _sync(args.device)
    start = time.perf_counter()
    llm.generate(request_sets["ttft"], first, use_tqdm=False)
    _sync(args.device)
    ttft = time.perf_counter() - start
    encoder_seconds[0] = 0.0
    start = time.perf_counter()
    outs = llm.generate(requests, full, use_tqdm=False)
    _sync(args.device)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
    llm.shutdown()
    del llm
    _free(args.device)
    return {
        **_rates(len(requests), args.output_len, elapsed, ttft),
        "encoder_s": encoder_seconds[0],
        "encoder_share_of_step_time": encoder_seconds[0] / elapsed,
    }


def run_hf(args, model_dir: str, request_sets: dict) -> dict:
    """HF `generate`, batches of --hf-batch-size (prompts have equal lengths: no padding)."""
    import transformers

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device(args.device):
        model = transformers.LlavaForConditionalGeneration(config).to(dtype).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
    tokens = config.image_seq_length

    def batches(requests: list):
        for i in range(0, len(requests), args.hf_batch_size):
            chunk = requests[i : i + args.hf_batch_size]
            ids = [
                [t for tok in r["prompt_token_ids"] for t in ([tok] * (tokens if tok == IMAGE_TOKEN_ID else 1))]
                for r in chunk
            ]  # fmt: skip
            images = [r["multi_modal_data"]["image"] for r in chunk]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            yield torch.tensor(ids, device=args.device), pixels.to(args.device, dtype)

    def generate(requests: list, max_new_tokens: int) -> float:
        _sync(args.device)
        start = time.perf_counter()
        for input_ids, pixel_values in batches(requests):
            with torch.no_grad():
                model.generate(
                    input_ids, pixel_values=pixel_values, max_new_tokens=max_new_tokens,
                    min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                )  # fmt: skip
        _sync(args.device)
        return time.perf_counter() - start

    requests = request_sets["full"]
    generate(request_sets["warmup"], 2)
    ttft = generate(request_sets["ttft"], 1)
    elapsed = generate(requests, args.output_len)
    model = None  # free its memory before the next run
    _free(args.device)
    return _rates(len(requests), args.output_len, elapsed, ttft)


def _rates(num_requests: int, output_len: int, elapsed: float, ttft: float) -> dict:
    return {
        "requests_per_s": num_requests / elapsed,
        "output_tok_per_s": num_requests * output_len / elapsed,
        "elapsed_s": elapsed,
        "batch_ttft_s": ttft,
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test)")
    parser.add_argument("--num-requests", type=int, default=None, help="default 64 (tiny: 8)")
    parser.add_argument("--question-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=None, help="default 128 (tiny: 8)")
    parser.add_argument("--hf-batch-size", type=int, default=None, help="default: all at once")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--output", default=None, help="JSON path (default: results/...)")
    args = parser.parse_args()
    args.device = "cpu" if args.tiny else "cuda"
    args.dtype = "float32" if args.tiny else "bfloat16"
    args.num_requests = args.num_requests or (8 if args.tiny else 64)
    args.output_len = args.output_len or (8 if args.tiny else 128)
    args.hf_batch_size = args.hf_batch_size or args.num_requests
    shape = TINY if args.tiny else LLAVA15_7B
    image_size = shape["vision"]["image_size"]
    tokens_per_image = (image_size // shape["vision"]["patch_size"]) ** 2
    args.max_model_len = 1 + tokens_per_image + args.question_len + args.output_len + 16
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(tmp, shape)
        request_sets = {
            name: make_requests(n, args.question_len, image_size, seed)
            for name, n, seed in [
                ("warmup", 2, 1),
                ("ttft", args.num_requests, 2),
                ("full", args.num_requests, 0),
            ]
        }
        results = {"lmserve": run_lmserve(args, model_dir, request_sets)}
        if not args.skip_hf:
            results["hf_transformers"] = run_hf(args, model_dir, request_sets)
    print_table(args, results)
    write_json(args, results, tokens_per_image)


def print_table(args, results: dict) -> None:
    print(
        f"\nLLaVA-1.5-7B shape{' (tiny)' if args.tiny else ''}: {args.num_requests} requests x "
        f"(1 image + {args.question_len} tokens) -> {args.output_len} tokens, {args.dtype}"
    )
    print(f"{'engine':<16}{'req/s':>10}{'out tok/s':>12}{'batch TTFT s':>14}{'encoder share':>15}")
    for name, r in results.items():
        share = r.get("encoder_share_of_step_time")
        share_text = f"{share:.1%}" if share is not None else "-"
        print(
            f"{name:<16}{r['requests_per_s']:>10.2f}{r['output_tok_per_s']:>12.1f}"
            f"{r['batch_ttft_s']:>14.3f}{share_text:>15}"
        )
    if "hf_transformers" in results:
        ratio = results["lmserve"]["requests_per_s"] / results["hf_transformers"]["requests_per_s"]
        print(f"lmserve / HF requests/s: {ratio:.2f}x")


def write_json(args, results: dict, tokens_per_image: int) -> None:
    machine = device_info(args.device)
    card = str(machine.get("gpu", "cpu")).replace(" ", "_")
    path = args.output or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"llava_bench_{'tiny_' if args.tiny else ''}{card}.json",
    )
    document = {
        "benchmark": "llava_bench",
        "model_shape": "tiny" if args.tiny else "llava-1.5-7b",
        "num_requests": args.num_requests,
        "question_len": args.question_len,
        "tokens_per_image": tokens_per_image,
        "output_len": args.output_len,
        "dtype": args.dtype,
        "results": results,
        "machine": machine,
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(document, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
