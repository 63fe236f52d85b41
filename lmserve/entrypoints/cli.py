"""`lmserve` command line: serve, generate, router and bench.

Each sub-command's arguments are added only when it is the one chosen, and each imports its
heavy modules (torch, the server, the benchmark client) inside its function, so a command
pays only for what it runs. Engine flags (spelled as vLLM spells them) are in
`lmserve/engine/arg_utils.py`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lmserve.engine.arg_utils import add_engine_args, add_model_arg, engine_kwargs

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
    group.add_argument(
        "--tool-call-parser",
        dest="tool_call_parser",
        choices=("hermes", "qwen", "llama3_json"),
        default=None,
        help="how the model writes tool calls; enables tool_choice 'auto' (the reply is "
        "parsed into tool_calls). 'required' and named functions work without it",
    )
    group.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="vLLM's flag, accepted for compatibility: --tool-call-parser alone enables 'auto'",
    )
    group.add_argument(
        "--metrics-prefix",
        dest="metrics_prefix",
        choices=("lmserve", "vllm"),
        default="lmserve",
        help="name prefix of /metrics; 'vllm' exports vLLM's own names, so dashboards, alerts "
        "and autoscaling triggers written for vLLM work unchanged",
    )


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


def _init_generate(parser: argparse.ArgumentParser) -> None:
    add_model_arg(parser)
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); else stdin lines")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--sampling-seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_args(parser)
    parser.set_defaults(func=_cmd_generate)


def _init_serve(parser: argparse.ArgumentParser) -> None:
    add_model_arg(parser)
    add_server_args(parser)
    add_engine_args(parser)
    parser.set_defaults(func=_cmd_serve)


def _init_router(parser: argparse.ArgumentParser) -> None:
    from lmserve.router.config import add_router_args

    add_router_args(parser)
    parser.set_defaults(func=_cmd_router)


def _init_bench(parser: argparse.ArgumentParser) -> None:
    from lmserve.bench.cli import init_bench_parser

    init_bench_parser(parser)


def _init_simulate(parser: argparse.ArgumentParser) -> None:
    from lmserve.sim.cli import init_simulate_parser

    init_simulate_parser(parser)


# name -> (help, function that adds the sub-command's arguments and sets `func`). Only the
# chosen sub-command's function runs, so `lmserve serve` never imports the benchmark client or
# the router, and `lmserve router` never imports the engine.
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "serve": ("OpenAI-compatible HTTP server", _init_serve),
    "generate": ("offline generation for prompts (args or stdin)", _init_generate),
    "router": ("OpenAI-compatible router in front of several engines (no torch)", _init_router),
    "bench": ("throughput, latency and serving benchmarks", _init_bench),
    "simulate": ("simulate a cluster: the real router, simulated engines", _init_simulate),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `lmserve` parser. With `argv`, only the sub-command it names gets its arguments
    (the others are listed by name, for `lmserve --help`); without, every sub-command does."""
    from lmserve import __version__

    chosen = _chosen_command(argv) if argv is not None else None
    parser = argparse.ArgumentParser(prog="lmserve", description="LLM inference engine")
    parser.add_argument("--version", action="version", version=f"lmserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, init) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if argv is None or name == chosen:
            init(command)
    return parser


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The sub-command `argv` names: its first word that is not an option (`lmserve` itself
    takes no option with a value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:  # bad configuration: say it plainly
        print(f"lmserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
