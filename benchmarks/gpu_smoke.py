"""GPU smoke test for the engine core (no speed claim): on CUDA, greedy output of a tiny float32
model equals HF transformers, and a dummy Qwen2.5-0.5B-shaped model in bf16 generates.

    python benchmarks/gpu_smoke.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.gpu_shapes import write_shape  # noqa: E402
from lmserve import LLM, SamplingParams  # noqa: E402
from tests.engine.test_hf_parity import MAX_TOKENS, make_prompts  # noqa: E402
from tests.tiny_models import make_tiny_model  # noqa: E402


def tiny_parity(arch: str, tmp: str) -> dict:
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(os.path.join(tmp, arch), arch=arch)
    prompts = make_prompts()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    expected = []
    for ids in prompts:
        with torch.no_grad():
            gen = hf.generate(
                torch.tensor([ids], device="cuda"),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                pad_token_id=3,
            )
        expected.append(gen[0, len(ids) :].tolist())
    llm = LLM(
        path, dtype="float32", device="cuda", max_num_batched_tokens=64, gpu_memory_utilization=0.5
    )
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
        use_tqdm=False,
    )
    ours = [o.outputs[0].token_ids for o in outs]
    mismatches = [i for i, (a, b) in enumerate(zip(ours, expected)) if a != b]
    return {"arch": arch, "prompts": len(prompts), "mismatched_prompts": mismatches}


def dummy_qwen_shape(tmp: str) -> dict:
    path = write_shape(tmp, "0.5b")
    start = time.perf_counter()
    llm = LLM(
        path,
        load_format="dummy",
        dtype="bfloat16",
        device="cuda",
        skip_tokenizer_init=True,
        max_model_len=4096,
        gpu_memory_utilization=0.5,
    )
    init_s = time.perf_counter() - start
    prompts = [{"prompt_token_ids": list(range(100, 100 + 256))} for _ in range(8)]
    start = time.perf_counter()
    outs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False
    )
    return {
        "init_s": round(init_s, 2),
        "generate_s": round(time.perf_counter() - start, 2),
        "num_gpu_blocks": llm.config.cache_config.num_gpu_blocks,
        "outputs_complete": all(len(o.outputs[0].token_ids) == 32 for o in outs),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_smoke.json")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        result["tiny_parity_cuda_fp32"] = [tiny_parity(a, tmp) for a in ("llama", "qwen2", "qwen3")]
        result["dummy_qwen2.5_0.5b_bf16"] = dummy_qwen_shape(tmp)
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
