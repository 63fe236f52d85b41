"""`lmserve bench throughput|latency|serve` on the command line.

    init_bench_parser(parser)      gives `lmserve bench` its sub-commands; each sets
                                   `func(args) -> exit code`
    python -m lmserve.bench.cli throughput ...   the same commands without the `lmserve` entry

A benchmark that cannot run (unreachable server, non-OpenAI answers, bad flags or dataset)
prints `lmserve bench: error: <reason>` on one line to stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from lmserve.bench import BenchError
from lmserve.engine.arg_utils import add_engine_args, add_model_arg, engine_kwargs


def init_bench_parser(bench: argparse.ArgumentParser) -> None:
    """Give the `bench` parser its sub-commands `throughput`, `latency` and `serve`; each sets
    `func(args) -> exit code`."""
    from lmserve.bench import latency, serve, throughput

    sub = bench.add_subparsers(dest="bench_command", required=True)

    tput = sub.add_parser(
        "throughput", help="offline throughput on a dataset (lmserve and/or HF transformers)"
    )
    add_model_arg(tput)
    throughput.add_throughput_args(tput)
    add_engine_args(tput)  # --seed, --tokenizer, --device and --dtype also serve the dataset/HF
    tput.set_defaults(func=_guarded(lambda a: throughput.main(a, engine_kwargs(a))))

    lat = sub.add_parser("latency", help="end-to-end and per-step latency of one fixed batch")
    add_model_arg(lat)
    latency.add_latency_args(lat)
    add_engine_args(lat)
    lat.set_defaults(func=_guarded(lambda a: latency.main(a, engine_kwargs(a))))

    srv = sub.add_parser("serve", help="online benchmark of any OpenAI-compatible server")
    serve.add_serve_args(srv)
    srv.set_defaults(func=_guarded(serve.main))


def _guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn BenchError / ValueError / OSError into one line on stderr and exit code 2."""

    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (BenchError, ValueError, OSError) as e:  # OSError: a model or file not found
            print(f"lmserve bench: error: {e}", file=sys.stderr)
            return 2

    return guarded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmserve bench")
    init_bench_parser(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
