"""Real model shapes for GPU benchmarks (dummy weights), the copy-bandwidth roofline, and the
batch-1 decode measurement they share."""

from __future__ import annotations

import json
import os
import time

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    architectures=["LlamaForCausalLM"],
)
LLAMA3_70B = dict(
    LLAMA3_8B,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
)
QWEN25_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    architectures=["Qwen2ForCausalLM"],
)
SMOLLM2_135M = dict(  # the default model's shape (lmserve/model/default_model.py)
    LLAMA3_8B,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
# name: (HF config class name, config, bf16 bytes read per decoded token: weights, in GB)
SHAPES = {
    "135m": ("LlamaConfig", SMOLLM2_135M, 0.269),
    "0.5b": ("Qwen2Config", QWEN25_05B, 0.988),
    "8b": ("LlamaConfig", LLAMA3_8B, 16.06),
    "70b": ("LlamaConfig", LLAMA3_70B, 141.1),
}


def write_shape(tmp: str, shape: str) -> str:
    """A config-only model folder (load it with load_format="dummy")."""
    import transformers

    cls_name, config, _ = SHAPES[shape]
    path = os.path.join(tmp, f"{shape}-shape")
    if not os.path.isdir(path):
        getattr(transformers, cls_name)(**config).save_pretrained(path)
    return path


def write_shape_json(tmp: str, shape: str) -> str:
    """`write_shape` without transformers (nor torch): config.json with the sizes only, the rest
    left to the config class's defaults. For measurements that must not import either first."""
    cls_name, config, _ = SHAPES[shape]
    path = os.path.join(tmp, f"{shape}-shape-json")
    os.makedirs(path, exist_ok=True)
    model_type = cls_name.removesuffix("Config").lower()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(
            {"model_type": model_type, "hidden_act": "silu", "rope_theta": 500000.0, **config}, f
        )
    return path


def copy_bandwidth_gbs() -> float:
    """Device memory bandwidth from a 1 GiB device-to-device copy (bytes read + written)."""
    import torch

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del x, y
    return 2 * 20 * (1 << 30) / elapsed / 1e9


def batch1_decode_tok_s(llm, prompt_len: int = 128, decode_tokens: int = 128) -> float:
    """Decode tok/s of one request: (time for 1 + n tokens - time for 1 token) / n, best of
    three each after a warm-up, so prefill and per-request overhead cancel."""
    from lmserve import SamplingParams

    prompt = [{"prompt_token_ids": list(range(1000, 1000 + prompt_len))}]

    def run(max_tokens: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        return time.perf_counter() - start

    run(8)  # warm-up
    first = min(run(1) for _ in range(3))
    full = min(run(decode_tokens + 1) for _ in range(3))
    return decode_tokens / (full - first)


def roofline_tok_s(bandwidth_gbs: float, shape: str, tp: int = 1) -> float:
    """Batch-1 decode bound: each token reads every weight once (KV reads are small here)."""
    return tp * bandwidth_gbs / SHAPES[shape][2]
