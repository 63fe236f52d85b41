"""A real `lmserve serve` subprocess on a free port, serving a tiny random Llama on the CPU.

`server` is one for the whole session (for tests that only send requests); tests that stop,
kill or signal a server start their own with `start_server(...)`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.ports import free_port

API_KEY = "sk-test-lmserve"
MODEL_NAME = "tiny-llama"
MAX_MODEL_LEN = 512
STARTUP_TIMEOUT_S = 120.0


@dataclass
class RemoteServer:
    proc: subprocess.Popen
    url: str
    model: str
    api_key: str | None
    log_path: Path
    _http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30.0))

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self._http.get(self.url + path, headers=self.headers, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return self._http.post(self.url + path, headers=headers, **kwargs)

    def stream(self, method: str, path: str, **kwargs):
        """httpx's streaming context manager, with the API key."""
        return self._http.stream(method, self.url + path, headers=self.headers, **kwargs)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kwargs
        )

    def async_client(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kwargs
        )

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples named `name` on /metrics whose labels include `labels`."""
        text = self._http.get(self.url + "/metrics").text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def engine_process(self) -> psutil.Process:
        """The EngineCore child (named `lmserve::EngineCore` by setproctitle)."""
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        raise AssertionError("no EngineCore child process found")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        self._http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def start_server(
    model_dir: str | None,
    *extra_args: str,
    log_dir: Path,
    api_key: str | None = API_KEY,
    env: dict | None = None,
    port: int | None = None,
) -> RemoteServer:
    """Start `lmserve serve` (its output goes to a file in `log_dir`) and wait until /health
    answers 200. `model_dir=None` serves the default model. Later flags override earlier.
    `port`: a given one (to restart a server where it was), else a free one."""
    port = port or free_port()
    args = [
        sys.executable, "-m", "lmserve.entrypoints.cli", "serve", *([model_dir] if model_dir else []),
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", MODEL_NAME,
        "--device", "cpu", "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN),
        "--cpu-kvcache-space-gib", "0.05",
        "--max-request-body-size", str(1024 * 1024),
        "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    if api_key is not None:
        args += ["--api-key", api_key]
    log_path = Path(tempfile.mkstemp(prefix="server-", suffix=".log", dir=log_dir)[1])
    run_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    run_env.pop("LMSERVE_API_KEY", None)  # the test decides
    run_env.update(env or {})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*args, *extra_args], stdout=log, stderr=subprocess.STDOUT, env=run_env
        )
    server = RemoteServer(proc, f"http://127.0.0.1:{port}", MODEL_NAME, api_key, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=1.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise AssertionError(
        f"server not healthy within {STARTUP_TIMEOUT_S} s:\n{server.log()[-4000:]}"
    )


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dir) -> str:
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def server(tiny_llama, tmp_path_factory):
    """Shared by every test that leaves it as it found it (starting one takes 7-15 s)."""
    server = start_server(tiny_llama, log_dir=tmp_path_factory.mktemp("server"))
    yield server
    server.stop()
