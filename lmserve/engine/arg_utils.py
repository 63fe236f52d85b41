"""The engine's command-line flags, spelled as vLLM spells them, shared by every command that
builds an engine (`lmserve serve`, `generate`, `bench throughput`, `bench latency`).

    add_model_arg(parser)     the optional positional MODEL
    add_engine_args(parser)   the flags, in an "engine" argument group
    engine_kwargs(args)       the parsed values as EngineConfig / LLM keywords

Only argparse and json here: building a parser must not import the engine.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def _json_object(flag: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{flag} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{flag} must be a JSON object, got {text!r}")
    return value


# (flag, EngineConfig keyword, type, default, help). Booleans get --x / --no-x.
ENGINE_FLAGS: list[tuple[str, str, Any, Any, str]] = [
    ("--tokenizer", "tokenizer", str, None, "tokenizer folder or hub id (default: the model)"),
    ("--dtype", "dtype", str, "auto", "auto | float32 | bfloat16 | float16"),
    (
        "--quantization",
        "quantization",
        str,
        "auto",
        "weights kept packed on the CPU: auto (gguf for a .gguf model on the CPU) | none (float "
        "weights; with --dtype float32 the exact-parity path) | gguf | int8",
    ),
    ("--max-model-len", "max_model_len", int, None, "context length (default: the model's)"),
    ("--block-size", "block_size", int, 16, "tokens per KV-cache block (a power of two)"),
    (
        "--max-num-seqs",
        "max_num_seqs",
        int,
        None,
        "requests running in one step (default: 1024 on a GPU of >= 70 GiB, else 256)",
    ),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, None, "token budget of one step"),
    (
        "--long-prefill-token-threshold",
        "long_prefill_token_threshold",
        int,
        0,
        "cap one request's prompt tokens per step (0 = off)",
    ),
    ("--scheduling-policy", "policy", str, "fcfs", "fcfs | priority"),
    (
        "--speculative-config",
        "speculative_config",
        lambda text: _json_object("--speculative-config", text),
        None,
        'speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'',
    ),
    (
        "--kv-transfer-config",
        "kv_transfer_config",
        lambda text: _json_object("--kv-transfer-config", text),
        None,
        'KV storage outside the GPU as JSON, e.g. \'{"kv_connector": "TieredConnector", '
        '"kv_role": "kv_both", "kv_connector_extra_config": {"cpu_size_gib": 4, '
        '"disk_path": "/tmp/kv", "remote_url": "redis://127.0.0.1:6379/0"}}\'',
    ),
    (
        "--kv-events-config",
        "kv_events_config",
        lambda text: _json_object("--kv-events-config", text),
        None,
        'publish KV cache events as JSON, e.g. \'{"enable_kv_cache_events": true, '
        '"publisher": "zmq", "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}\'',
    ),
    (
        "--gpu-memory-utilization",
        "gpu_memory_utilization",
        float,
        0.92,
        "share of GPU memory the engine may use",
    ),
    ("--num-gpu-blocks-override", "num_gpu_blocks_override", int, None, "fixed KV pool size"),
    ("--cpu-kvcache-space-gib", "cpu_kvcache_space_gib", float, 4.0, "KV pool size on CPU"),
    ("--prefix-caching-hash-algo", "prefix_caching_hash_algo", str, "sha256", "sha256 | xxhash"),
    ("--load-format", "load_format", str, "auto", "auto | safetensors | dummy"),
    ("--tensor-parallel-size", "tensor_parallel_size", int, 1, "GPUs per engine"),
    ("--device", "device", str, "auto", "auto | cpu | cuda"),
    ("--seed", "seed", int, 0, "random seed"),
    (
        "--cuda-graph-mode",
        "cuda_graph_mode",
        str,
        "full_and_piecewise",
        "full_and_piecewise | full | piecewise | none (CUDA only)",
    ),
    (
        "--max-cuda-graph-size",
        "max_cuda_graph_size",
        int,
        512,
        "largest decode batch / mixed-batch token count captured in a CUDA graph",
    ),
    ("--revision", "revision", str, None, "hub revision"),
    (
        "--structured-outputs-backend",
        "structured_outputs_backend",
        str,
        "auto",
        "grammar engine of structured outputs: auto (= xgrammar) | xgrammar | guidance "
        "(llguidance; `grammar` in Lark syntax, or EBNF translated to Lark)",
    ),
    (
        "--limit-mm-per-prompt",
        "limit_mm_per_prompt",
        lambda text: _json_object("--limit-mm-per-prompt", text),
        None,
        "most images one prompt may carry, as JSON, e.g. '{\"image\": 2}' (default 999)",
    ),
    (
        "--max-num-encoder-input-tokens",
        "max_num_encoder_input_tokens",
        int,
        None,
        "image embedding rows the vision encoder may produce in one step (default: "
        "max-num-batched-tokens, at least one image)",
    ),
    (
        "--encoder-cache-size",
        "encoder_cache_size",
        int,
        None,
        "image embedding rows the encoder cache holds (default: as the encoder budget)",
    ),
]
# Flags that take a list of values.
LIST_FLAGS: list[tuple[str, str, str]] = [
    (
        "--allowed-media-domains",
        "allowed_media_domains",
        "hosts image URLs may be fetched from, e.g. upload.wikimedia.org 127.0.0.1 (default: "
        "none; data: URLs always work)",
    ),
]
BOOL_FLAGS: list[tuple[str, str, bool | None, str]] = [
    ("enable-prefix-caching", "enable_prefix_caching", True, "reuse KV of shared prefixes"),
    ("enable-chunked-prefill", "enable_chunked_prefill", True, "split long prompts across steps"),
    ("skip-tokenizer-init", "skip_tokenizer_init", False, "token ids only, no tokenizer"),
    ("enforce-eager", "enforce_eager", False, "never capture CUDA graphs"),
    (
        "async-scheduling",
        "async_scheduling",
        None,
        "prepare the next step while the GPU runs this one (default: on for CUDA without "
        "speculative decoding or tensor parallelism)",
    ),
]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for flag, dest, typ, default, help_text in ENGINE_FLAGS:
        group.add_argument(flag, dest=dest, type=typ, default=default, help=help_text)
    for flag, dest, help_text in LIST_FLAGS:
        group.add_argument(flag, dest=dest, nargs="+", default=None, help=help_text)
    for name, dest, default, help_text in BOOL_FLAGS:
        group.add_argument(
            f"--{name}",
            dest=dest,
            action=argparse.BooleanOptionalAction,
            default=default,
            help=help_text,
        )


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = [f[1] for f in ENGINE_FLAGS] + [f[1] for f in LIST_FLAGS] + [f[1] for f in BOOL_FLAGS]
    return {name: getattr(args, name) for name in names}


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF model folder, hub id or .gguf file (default: the default model)",
    )
