"""Where the GPU time of a batch-1 decode step goes: torch.profiler (CUPTI) over `--tokens`
decode steps of lmserve with CUDA graphs, kernels inside the graphs included; prints the kernels
by total GPU time per step and writes JSON. Dummy weights at real shapes, bf16.

    python benchmarks/decode_kernel_profile.py --shapes 0.5b,8b --out profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("LMSERVE_ENABLE_MULTIPROCESSING", "0")

from benchmarks.gpu_shapes import write_shape  # noqa: E402
from lmserve import LLM, SamplingParams  # noqa: E402


def profile_shape(path: str, tokens: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    llm = LLM(
        path, load_format="dummy", dtype="bfloat16", device="cuda", skip_tokenizer_init=True,
        max_model_len=2048, gpu_memory_utilization=0.8,
    )  # fmt: skip
    prompt = [{"prompt_token_ids": list(range(1000, 1128))}]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate(prompt, params, use_tqdm=False)  # warm-up
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompt, params, use_tqdm=False)
    llm.shutdown()
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(event.name, []).append(event.device_time)
    rows = sorted(
        (
            {
                "kernel": name[:90],
                "calls_per_step": round(len(times) / tokens, 2),
                "us_per_step": round(sum(times) / tokens, 1),
                "us_per_call": round(sum(times) / len(times), 2),
            }
            for name, times in kernels.items()
        ),
        key=lambda r: -r["us_per_step"],
    )
    total = sum(r["us_per_step"] for r in rows)
    return {"gpu_us_per_step": round(total, 1), "kernels": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="0.5b,8b")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default="decode_kernel_profile.json")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            r = profile_shape(write_shape(tmp, shape), args.tokens)
            result["shapes"][shape] = r
            print(f"\n{shape}: {r['gpu_us_per_step']} us of kernels per step")
            print(f"{'us/step':>8} {'calls':>6} {'us/call':>8}  kernel")
            for row in r["kernels"][:25]:
                print(f"{row['us_per_step']:8.1f} {row['calls_per_step']:6.2f} "
                      f"{row['us_per_call']:8.2f}  {row['kernel']}")  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
