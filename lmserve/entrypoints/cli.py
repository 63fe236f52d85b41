"""`lmserve` command line. Engine flags are spelled as vLLM spells them."""

from __future__ import annotations

import argparse
import json
import sys
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
    ("--max-model-len", "max_model_len", int, None, "context length (default: the model's)"),
    ("--block-size", "block_size", int, 16, "tokens per KV-cache block (a power of two)"),
    ("--max-num-seqs", "max_num_seqs", int, 256, "requests running in one step"),
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
        "--gpu-memory-utilization",
        "gpu_memory_utilization",
        float,
        0.9,
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


# `lmserve serve` only: (flag, dest, type, default, help).
SERVER_FLAGS: list[tuple[str, str, Any, Any, str]] = [
    ("--host", "host", str, "0.0.0.0", "address to listen on"),
    ("--port", "port", int, 8000, "port to listen on"),
    (
        "--api-key",
        "api_key",
        str,
        None,
        "require 'Authorization: Bearer KEY' on /v1 routes (default: env LMSERVE_API_KEY)",
    ),
    (
        "--chat-template",
        "chat_template",
        str,
        None,
        "Jinja chat template (a file, or the template itself); default: the tokenizer's",
    ),
    (
        "--shutdown-timeout",
        "shutdown_timeout",
        float,
        10.0,
        "on SIGTERM, seconds in-flight requests may take to finish before they are aborted",
    ),
    (
        "--max-request-body-size",
        "max_request_body_size",
        int,
        16 * 1024 * 1024,
        "larger request bodies get 413 (bytes)",
    ),
    ("--uvicorn-log-level", "uvicorn_log_level", str, "info", "uvicorn's log level"),
]


def add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    for flag, dest, typ, default, help_text in SERVER_FLAGS:
        group.add_argument(flag, dest=dest, type=typ, default=default, help=help_text)
    group.add_argument(
        "--served-model-name",
        dest="served_model_name",
        nargs="+",
        default=None,
        help="name(s) clients use for the model; the first is reported (default: MODEL)",
    )
    group.add_argument(
        "--disable-access-log", action="store_true", help="no log line per HTTP request"
    )


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for flag, dest, typ, default, help_text in ENGINE_FLAGS:
        group.add_argument(flag, dest=dest, type=typ, default=default, help=help_text)
    for name, dest, default, help_text in BOOL_FLAGS:
        group.add_argument(
            f"--{name}",
            dest=dest,
            action=argparse.BooleanOptionalAction,
            default=default,
            help=help_text,
        )


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = [f[1] for f in ENGINE_FLAGS] + [f[1] for f in BOOL_FLAGS]
    return {name: getattr(args, name) for name in names}


def _cmd_generate(args: argparse.Namespace) -> int:
    from lmserve import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.sampling_seed
    )
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for out in llm.generate(prompts, params, use_tqdm=not args.quiet):
        completion = out.outputs[0]
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": out.prompt,
                        "text": completion.text,
                        "token_ids": completion.token_ids,
                        "finish_reason": completion.finish_reason,
                    }
                )
            )
        else:
            print(f"{out.prompt!r} -> {completion.text!r}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from lmserve.engine.launcher import start_launcher

    # The EngineCore process starts first and imports torch and the engine while this one
    # imports the server and builds the configuration (lmserve/engine/launcher.py).
    launcher = start_launcher()
    config = None
    if launcher is not None:
        # The configuration goes to the EngineCore before the server's imports, so the engine
        # builds (load, profile, capture) while this process imports FastAPI and the rest.
        from lmserve.config import EngineConfig

        try:
            config = EngineConfig.from_kwargs(args.model, **engine_kwargs(args))
        except Exception:  # noqa: BLE001 - run_server builds it again and reports the error
            config = None
        else:
            launcher.launch(config)
    from lmserve.entrypoints.openai.server import run_server

    return run_server(args, launcher, config)


def _cmd_router(args: argparse.Namespace) -> int:
    from lmserve.router.app import run_router

    return run_router(args)


def build_parser() -> argparse.ArgumentParser:
    from lmserve import __version__

    parser = argparse.ArgumentParser(prog="lmserve", description="LLM inference engine")
    parser.add_argument("--version", action="version", version=f"lmserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="offline generation for prompts (args or stdin)")
    gen.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF model folder, hub id or .gguf file (default: the default model)",
    )
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable); else stdin lines")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--json", action="store_true", help="one JSON object per line")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_args(gen)
    gen.set_defaults(func=_cmd_generate)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF model folder, hub id or .gguf file (default: the default model)",
    )
    add_server_args(serve)
    add_engine_args(serve)
    serve.set_defaults(func=_cmd_serve)
    from lmserve.router.config import add_router_args

    router = sub.add_parser(
        "router", help="OpenAI-compatible router in front of several engines (no torch)"
    )
    add_router_args(router)
    router.set_defaults(func=_cmd_router)
    from lmserve.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:  # bad configuration: say it plainly
        print(f"lmserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
