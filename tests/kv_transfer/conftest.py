"""A real redis-server for the KV-transfer tests (no mocks): `redis_server`, `dead_redis_url`."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.ports import free_port


class RedisServer:
    """A redis-server subprocess on 127.0.0.1:`port`; `start()` after `stop()` brings up an
    empty one on the same port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        assert self._proc is None, "already running"
        cmd = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "yes",
            "--dir",
            str(self.workdir),
        ]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._wait_ready(timeout_s)

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.kill()
        self._proc.wait(timeout=10)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._proc = None

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self.client(socket_timeout=0.5, socket_connect_timeout=0.5) as client:
            while True:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    output = self._proc.stdout.read().decode(errors="replace")
                    pytest.fail(f"redis-server exited ({self._proc.returncode}):\n{output}")
                try:
                    if client.ping():
                        return
                except redis.exceptions.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"redis-server did not answer PING on port {self.port}")
                time.sleep(0.01)


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not on PATH: install Debian's redis-server "
            "(apt-get install redis-server); CI installs it"
        )
    server = RedisServer(binary, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dead_redis_url() -> str:
    """A Redis URL that nothing listens on."""
    return f"redis://127.0.0.1:{free_port()}/0"
