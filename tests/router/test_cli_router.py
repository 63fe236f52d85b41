"""`lmserve router` on the command line: no torch, fast start, clean stop, plain flag errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import pytest

from lmserve.entrypoints.cli import main
from tests.modules_loaded import modules_loaded_by
from tests.router.standin import StandInEngine, free_port

HEAVY = ("torch", "transformers", "lmserve.engine", "lmserve.core", "lmserve.model")
# `lmserve router` builds only its own sub-command's parser: no benchmark client, and of the
# engine package only the flag definitions (lmserve.engine.arg_utils) that `serve` shares.
HEAVY_FOR_CLI = ("torch", "transformers", "lmserve.core", "lmserve.model", "lmserve.worker",
                 "lmserve.bench", "lmserve.engine.async_llm", "lmserve.engine.core_client",
                 "httpx")  # fmt: skip


def test_router_imports_neither_torch_nor_the_engine():
    code = (
        "from lmserve.router.app import build_app\n"
        "from lmserve.router.config import RouterConfig\n"
        "build_app(RouterConfig(backends=('http://h:1',), routing_logic='prefix-aware'))"
    )
    assert modules_loaded_by(code, HEAVY) == []


def test_lmserve_router_command_imports_no_torch():
    code = (
        "from lmserve.entrypoints.cli import build_parser\n"
        "from lmserve.router.app import build_app\n"
        "from lmserve.router.config import RouterConfig\n"
        "argv = ['router', '--backends', 'http://h:1']\n"
        "args = build_parser(argv).parse_args(argv)\n"
        "build_app(RouterConfig.from_args(args))"
    )
    assert modules_loaded_by(code, HEAVY_FOR_CLI) == []


@pytest.mark.slow
def test_lmserve_router_starts_in_about_a_second_and_stops_on_sigterm():
    with StandInEngine("a") as engine:
        port = free_port()
        cmd = [sys.executable, "-m", "lmserve.entrypoints.cli", "router", "--backends", engine.url,
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            while True:
                assert proc.poll() is None, proc.stdout.read().decode()
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() - start < 10, "the router did not become healthy"
                time.sleep(0.02)
            startup_s = time.monotonic() - start
            body = {"model": "m", "prompt": "hi"}
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body).json()
            assert answer["choices"][0]["text"] == "a"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
        # Under a second on an idle machine (~0.6-0.9 s here); generous for a loaded CI box.
        assert startup_s < 4, f"start-up took {startup_s:.2f} s"


# kv-aware routing on one static backend, before the flag under test
KV_AWARE = ["router", "--backends", "h:1", "--routing-logic", "kv-aware", "--tokenizer", "t"]
EVENTS = ["--kv-events-endpoints", "tcp://*:5557"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["router"], "--backends"),
        (["router", "--backends", "http://h:1", "--routing-logic", "random"], "routing-logic"),
        (["router", "--backends", "http://h:1", "--k8s-namespace", "ns"], "not both"),
        (["router", "--backends", "http://h:1", "--routing-logic", "kv-aware"], "--tokenizer"),
        (KV_AWARE, "--kv-events-endpoints"),
        ([*KV_AWARE, "--backends", "h:1,h:2", *EVENTS], "one per backend"),
        ([*KV_AWARE, "--kv-events-endpoints", "udp://h:1"], "not tcp://HOST:PORT"),
        ([*KV_AWARE, *EVENTS, "--tokenizer", "/nonexistent"], "no tokenizer.json"),
        ([*KV_AWARE, *EVENTS, "--kv-aware-slack", "-1"], "--kv-aware-slack -1.0 must be >= 0"),
        (
            [
                "router",
                "--k8s-namespace",
                "ns",
                "--routing-logic",
                "kv-aware",
                "--tokenizer",
                "t",
                "--k8s-kv-events-port",
                "70000",
            ],
            "is not a TCP port",
        ),  # fmt: skip
    ],
)
def test_bad_router_flags_exit_2_with_the_reason(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
