"""Server lifecycle: clients that go away abort their requests; a dead engine ends the server
with a non-zero code within 5 s; SIGTERM drains and exits 0; an idle server sleeps."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import psutil
import pytest

from tests.entrypoints.openai.conftest import MAX_MODEL_LEN, start_server

RUNNING = "lmserve:num_requests_running"
KV_USAGE = "lmserve:kv_cache_usage_perc"
ABORTED = "lmserve:request_success_total"


def wait_until(condition, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def long_completion(model: str, stream: bool, max_tokens: int, **extra) -> dict:
    return {
        "model": model, "prompt": [1, 17, 42], "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": stream, **extra,
    }  # fmt: skip


def test_disconnected_streams_are_aborted(server):
    """8 streaming clients read a little, then hang up: the engine drops all 8 requests."""
    aborted_before = server.metric(ABORTED, finished_reason="abort")
    client = httpx.Client(timeout=30.0, headers=server.headers)
    body = long_completion(server.model, True, MAX_MODEL_LEN - 4)
    responses = []
    for _ in range(8):
        request = client.build_request("POST", server.url + "/v1/completions", json=body)
        responses.append(client.send(request, stream=True))
    lines = [r.iter_lines() for r in responses]
    for it in lines:  # each has streamed something: it is running
        assert next(it).startswith("data: ")
    assert wait_until(lambda: server.metric(RUNNING) == 8, timeout=5), server.metric(RUNNING)
    for response in responses:
        response.close()  # hang up mid-stream
    client.close()
    assert wait_until(lambda: server.metric(RUNNING) == 0 and server.metric(KV_USAGE) == 0, 5), (
        server.metric(RUNNING),
        server.metric(KV_USAGE),
    )
    assert server.metric(ABORTED, finished_reason="abort") - aborted_before == 8
    assert server.get("/health").status_code == 200


def test_disconnected_non_streaming_request_is_aborted(server):
    aborted_before = server.metric(ABORTED, finished_reason="abort")
    body = json.dumps(long_completion(server.model, False, MAX_MODEL_LEN - 4, n=4)).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {server.api_key}\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert wait_until(lambda: server.metric(RUNNING) == 4, timeout=5)
    # The socket is closed: the server notices without polling and aborts all 4 samples.
    assert wait_until(lambda: server.metric(RUNNING) == 0 and server.metric(KV_USAGE) == 0, 5)
    assert server.metric(ABORTED, finished_reason="abort") - aborted_before == 1


@pytest.mark.slow
def test_engine_death_exits_non_zero_within_5s(tiny_llama, tmp_path):
    server = start_server(tiny_llama, log_dir=tmp_path)
    try:
        # A stream in flight when the engine dies ends (with an error event), it does not hang.
        stream_client = httpx.Client(timeout=10.0, headers=server.headers)
        request = stream_client.build_request(
            "POST",
            server.url + "/v1/completions",
            json=long_completion(server.model, True, MAX_MODEL_LEN - 4),
        )
        response = stream_client.send(request, stream=True)
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        engine = server.engine_process()
        killed_at = time.monotonic()
        engine.send_signal(signal.SIGKILL)
        health = []
        while server.proc.poll() is None and time.monotonic() - killed_at < 10:
            try:
                health.append(httpx.get(server.url + "/health", timeout=0.5).status_code)
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        exit_code = server.wait(timeout=10)
        elapsed = time.monotonic() - killed_at
        rest = []
        try:
            rest = [line for line in lines if line]
        except httpx.HTTPError:
            pass  # the server went away: the stream ended
        print(f"\nengine killed → server exit code {exit_code} after {elapsed:.2f} s; "
              f"/health answers: {sorted(set(health))}")  # fmt: skip
        assert exit_code != 0
        assert elapsed < 5.0
        assert 503 in health or not health
        assert all(line.startswith("data: ") for line in rest)
        if rest:
            assert rest[-1] == "data: [DONE]"
            assert any('"error"' in line for line in rest)
        stream_client.close()
    finally:
        server.stop()
    assert not psutil.pid_exists(engine.pid) or engine.status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_then_exits_zero(tiny_llama, tmp_path):
    """A request that can finish within the grace period does; a longer one is cut at its
    end; the listening socket closes at once; exit code 0. (The API key comes from
    LMSERVE_API_KEY here.)"""
    grace_s = 5.0  # room for the short request on a loaded 2-core machine
    server = start_server(
        tiny_llama, "--shutdown-timeout", str(grace_s), "--max-model-len", "2048",
        log_dir=tmp_path, api_key=None, env={"LMSERVE_API_KEY": "from-env"},
    )  # fmt: skip
    server.api_key = "from-env"
    requests = {
        "short": long_completion(server.model, True, 30),  # ~0.3 s alone
        "long": long_completion(server.model, True, 2000, n=16),  # > 10 s on 2 CPU cores
    }
    started = {name: threading.Event() for name in requests}
    lines: dict[str, list[str]] = {name: [] for name in requests}

    def stream(name: str) -> None:
        try:
            with httpx.Client(timeout=30.0, headers=server.headers) as client:
                url = server.url + "/v1/completions"
                with client.stream("POST", url, json=requests[name]) as response:
                    for line in response.iter_lines():
                        if line:
                            lines[name].append(line)
                            started[name].set()
        except httpx.HTTPError as e:
            lines[name].append(f"transport error: {type(e).__name__}")

    try:
        assert httpx.post(server.url + "/v1/completions", json={"prompt": "x"}).status_code == 401
        threads = [threading.Thread(target=stream, args=(name,)) for name in requests]
        for t in threads:
            t.start()
        assert all(event.wait(30) for event in started.values())
        signalled_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.7)  # past one tick of the server's main loop
        with pytest.raises(httpx.TransportError):  # no new connections
            httpx.get(server.url + "/health", timeout=1.0)
        exit_code = server.wait(timeout=30)
        elapsed = time.monotonic() - signalled_at
        for t in threads:
            t.join(timeout=10)
        print(f"\nSIGTERM → exit code {exit_code} after {elapsed:.2f} s (grace {grace_s} s)")
        assert exit_code == 0
        assert lines["short"][-1] == "data: [DONE]"
        chunks = [json.loads(line[len("data: ") :]) for line in lines["short"][:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert lines["long"][-1] != "data: [DONE]"  # cut at the end of the grace period
        assert grace_s - 0.5 < elapsed < grace_s + 6
    finally:
        server.stop()


def test_idle_server_and_engine_use_little_cpu(server):
    processes = [psutil.Process(server.proc.pid)]
    processes += processes[0].children(recursive=True)
    time.sleep(1.0)  # let work from earlier tests settle

    def cpu_seconds() -> float:
        total = 0.0
        for p in processes:
            times = p.cpu_times()
            total += times.user + times.system
        return total

    start_cpu, start = cpu_seconds(), time.monotonic()
    time.sleep(5.0)
    share = (cpu_seconds() - start_cpu) / (time.monotonic() - start)
    print(
        f"\nidle CPU of server + engine ({len(processes)} processes): {100 * share:.2f}% of a core"
    )
    assert share < 0.05
