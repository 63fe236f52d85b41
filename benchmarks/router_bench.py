"""The router alone: how much latency it adds and how many requests/s it carries.

    python benchmarks/router_bench.py [--requests 4000] [--concurrency 1,8,32,64]

Three processes share the machine: a stand-in backend (a raw asyncio HTTP server answering every
POST at once with a fixed completion, so the backend costs next to nothing), `lmserve router`
in front of it (the real command, round-robin), and this script's load generator (raw asyncio
keep-alive connections, also nearly free). Both the stand-in and the client are hand-written
on purpose: a framework on either side would cost as much as the router and hide it.

For each concurrency the client sends the same requests once straight to the stand-in and once
through the router. Added latency = through-router minus direct, per percentile; requests/s is
through the router. Non-streamed and streamed (3 SSE chunks) answers are both measured. It also
records how long `lmserve router` takes from exec to its first healthy /health.
Prints a table; writes benchmarks/results/router_bench_cpu.json, one entry per server stack
(h11+asyncio as installed plainly; httptools+uvloop with the `router` extra). Never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
from machine import cpu_machine_info

RESULT_PATH = os.path.join(os.path.dirname(__file__), "results", "router_bench_cpu.json")
_COMPLETION = json.dumps(
    {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": "m",
     "choices": [{"index": 0, "text": " hello", "finish_reason": "length", "logprobs": None}]}
).encode()  # fmt: skip
_MODELS = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()


# ---- the stand-in backend (runs in its own process: `router_bench.py --stand-in PORT`) --------
def _response(status: bytes, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type
        + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


def _sse_response() -> bytes:
    events = [b"data: " + _COMPLETION + b"\n\n" for _ in range(3)] + [b"data: [DONE]\n\n"]
    chunks = b"".join(hex(len(e))[2:].encode() + b"\r\n" + e + b"\r\n" for e in events)
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    return head + chunks + b"0\r\n\r\n"


_ANSWERS = {
    b"/health": _response(b"200 OK", b""),
    b"/v1/models": _response(b"200 OK", _MODELS),
    b"/metrics": _response(b"200 OK", b"", b"text/plain"),
}
_COMPLETION_RESPONSE = _response(b"200 OK", _COMPLETION)
_STREAM_RESPONSE = _sse_response()


class StandInProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, one request at a time per connection, answers from a table."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(head[at + 15 :].split(b"\r\n", 1)[0])
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            path = head.split(b" ", 2)[1]
            if head.startswith(b"post"):
                stream = b'"stream": true' in body or b'"stream":true' in body
                self.transport.write(_STREAM_RESPONSE if stream else _COMPLETION_RESPONSE)
            else:
                self.transport.write(_ANSWERS.get(path, _response(b"404 Not Found", b"")))


def run_stand_in(port: int) -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(StandInProtocol, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ---- the load generator ------------------------------------------------------------------------
async def _read_response(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    at = lower.find(b"content-length:")
    if at >= 0:
        await reader.readexactly(int(lower[at + 15 :].split(b"\r\n", 1)[0]))
        return
    while True:  # chunked
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return


async def _connection(port: int, request: bytes, count: int, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            start = time.perf_counter()
            writer.write(request)
            await _read_response(reader)
            latencies.append(time.perf_counter() - start)
    finally:
        writer.close()


async def load(port: int, stream: bool, concurrency: int, total: int) -> dict[str, float]:
    body = json.dumps({"model": "m", "prompt": "hello " * 20, "max_tokens": 1, "stream": stream})
    request = (
        f"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n{body}"
    ).encode()
    warmup: list[float] = []
    await asyncio.gather(*(_connection(port, request, 20, warmup) for _ in range(concurrency)))
    latencies: list[float] = []
    start = time.perf_counter()
    per_conn = max(1, total // concurrency)
    await asyncio.gather(*(_connection(port, request, per_conn, latencies) for _ in range(concurrency)))  # fmt: skip
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "req_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


# ---- processes ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, path: bytes, proc: subprocess.Popen, timeout: float = 30.0) -> float:
    """Seconds until GET `path` answers 200."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        assert proc.poll() is None, f"process exited with {proc.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET " + path + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.005)
    raise TimeoutError(f"port {port} did not answer 200 on {path!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000, help="per measurement")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--stand-in", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stand_in is not None:
        run_stand_in(args.stand_in)
        return
    backend_port, router_port = _free_port(), _free_port()
    stand_in = subprocess.Popen([sys.executable, __file__, "--stand-in", str(backend_port)])
    router = None
    try:
        _wait_for(backend_port, b"/health", stand_in)
        router = subprocess.Popen(
            [sys.executable, "-m", "lmserve.entrypoints.cli", "router", "--backends",
             f"http://127.0.0.1:{backend_port}", "--port", str(router_port), "--host", "127.0.0.1"]
        )  # fmt: skip
        startup_s = _wait_for(router_port, b"/health", router)
        rows = []
        for stream in (False, True):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                direct = asyncio.run(load(backend_port, stream, concurrency, args.requests))
                routed = asyncio.run(load(router_port, stream, concurrency, args.requests))
                rows.append(_row(stream, concurrency, direct, routed))
                _print_row(rows[-1])
    finally:
        for proc in (router, stand_in):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=10)
    stack = server_stack()
    result = {"benchmark": "router_bench", "runs": {}}
    if os.path.exists(RESULT_PATH):  # one run per server stack, kept side by side
        with open(RESULT_PATH) as f:
            result = json.load(f)
    result["machine"] = cpu_machine_info("cpu", note="stand-in, router and client share the cores")
    result["runs"][stack] = {
        "router_startup_s": startup_s,
        "routing_logic": "roundrobin",
        "rows": rows,
    }
    os.makedirs(os.path.dirname(RESULT_PATH), exist_ok=True)
    with open(RESULT_PATH, "w") as f:
        json.dump(result, f, indent=2)
    print(
        f"[{stack}] router start-up to first healthy /health: {startup_s:.2f} s; written {RESULT_PATH}"
    )


def server_stack() -> str:
    """What uvicorn will run the router on: its fast parser and loop when installed (the
    `router` extra), else h11 and asyncio (the plain install)."""
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"{http}+{loop}"


def _row(stream: bool, concurrency: int, direct: dict, routed: dict) -> dict:
    return {
        "stream": stream,
        "concurrency": concurrency,
        "direct": direct,
        "routed": routed,
        "added_p50_ms": routed["p50_ms"] - direct["p50_ms"],
        "added_p99_ms": routed["p99_ms"] - direct["p99_ms"],
    }


def _print_row(row: dict) -> None:
    if not hasattr(_print_row, "header"):
        _print_row.header = True
        print(f"{'stream':>6} {'conc':>5} {'direct p50':>10} {'routed p50':>10} {'routed p99':>10} "
              f"{'added p50':>9} {'added p99':>9} {'routed req/s':>12}")  # fmt: skip
    r = row["routed"]
    print(f"{str(row['stream']):>6} {row['concurrency']:>5} {row['direct']['p50_ms']:>10.3f} "
          f"{r['p50_ms']:>10.3f} {r['p99_ms']:>10.3f} {row['added_p50_ms']:>9.3f} "
          f"{row['added_p99_ms']:>9.3f} {r['req_per_s']:>12.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
