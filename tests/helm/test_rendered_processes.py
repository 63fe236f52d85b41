"""The rendered processes really start: the CPU values file's engine and router containers
(their args, env and probes exactly as `helm template` renders them) run as local processes.

A container becomes a process: the image's ENTRYPOINT (`lmserve`, here the venv's console
script) + the container's args, with Kubernetes' `$(VAR)` expansion from its env; volume mount
paths (/cache) point at temporary folders and Service host names at 127.0.0.1. The router's
Kubernetes discovery talks to a stand-in of the pod list/watch API (tests/router) that lists one
ready pod carrying the labels of the rendered engine pod template, at 127.0.0.1. Ports are free
ones, passed through the chart's own values (engineDefaults.port, router.port); the stand-in
API's address through router.routerArgs.k8s-api-server."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helm.test_chart import CHART, HELM, TESTS_DIR, container, one

yaml = pytest.importorskip("yaml")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("kubernetes.aio")

from tests.router.standin import free_port, serve_in_thread  # noqa: E402
from tests.router.test_k8s_discovery import NAMESPACE, StandInKubernetesAPI  # noqa: E402

RELEASE = "lm"
ENGINE_START_TIMEOUT_S = 300.0


def render_cpu(engine_port: int, router_port: int, api_url: str) -> list[dict[str, Any]]:
    cmd = [
        HELM, "template", RELEASE, str(CHART), "-n", NAMESPACE,
        "-f", str(TESTS_DIR / "cpu-one-model.yaml"),
        "--set", f"engineDefaults.port={engine_port}",
        "--set", f"router.port={router_port}",
        "--set", f"router.routerArgs.k8s-api-server={api_url}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command/args: defined variables are replaced, $$ escapes."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        text,
    )


def as_process(
    c: dict[str, Any], docs, mounts: dict[str, Path]
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment a container runs with, made local."""
    secrets = {s["metadata"]["name"]: s for s in docs if s["kind"] == "Secret"}
    hosts = [s["metadata"]["name"] for s in docs if s["kind"] == "Service"]

    def local(text: str) -> str:
        for path, folder in mounts.items():
            text = re.sub(rf"(?<![\w/]){re.escape(path)}(?=/|$|\W)", str(folder), text)
        for host in hosts:  # Service DNS names -> loopback
            text = re.sub(
                rf"(?<![\w.-]){re.escape(host)}(\.{NAMESPACE}(\.svc(\.cluster\.local)?)?)?(?=[:/]|$)",
                "127.0.0.1",
                text,
            )
        return text

    env: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = local(expand(e["value"], env))
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
    entrypoint = Path(sys.executable).parent / "lmserve"  # the image's ENTRYPOINT ["lmserve"]
    assert entrypoint.exists(), entrypoint
    args = [local(expand(a, env)) for a in c["args"]]
    assert "command" not in c, "the chart must keep the image's ENTRYPOINT"
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("LMSERVE_")}
    run_env.update(env, TOKENIZERS_PARALLELISM="false")
    return [str(entrypoint), *args], run_env


def probe_urls(c: dict[str, Any]) -> list[str]:
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    urls = []
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        port = ports.get(get["port"], get["port"])
        urls.append(f"http://127.0.0.1:{port}{get['path']}")
    return urls


def wait_200(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url}: process exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer 200 within {timeout} s:\n{log.read_text()[-4000:]}")


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_rendered_engine_and_router_start_and_serve(tmp_path):
    engine_port, router_port = free_port(), free_port()
    api = StandInKubernetesAPI()
    with serve_in_thread(api.app()) as kube:
        docs = render_cpu(engine_port, router_port, kube.url)
        engine = one(docs, "Deployment", f"{RELEASE}-lmserve-smollm2")
        router = one(docs, "Deployment", f"{RELEASE}-lmserve-router")
        ec, rc = container(engine, "engine"), container(router, "router")

        cache = tmp_path / "cache"  # the engine's /cache volume (an emptyDir)
        cache.mkdir()
        mounts = {m["mountPath"]: cache for m in ec["volumeMounts"] if m["name"] == "cache"}
        engine_cmd, engine_env = as_process(ec, docs, mounts)
        router_cmd, router_env = as_process(rc, docs, {})

        engine_log, router_log = tmp_path / "engine.log", tmp_path / "router.log"
        engine_proc = start(engine_cmd, engine_env, engine_log)
        router_proc = None
        try:
            startup, readiness, liveness = probe_urls(ec)
            # the startup probe's window, as the kubelet would allow (capped for the test)
            window = ec["startupProbe"]["periodSeconds"] * ec["startupProbe"]["failureThreshold"]
            wait_200(startup, min(window, ENGINE_START_TIMEOUT_S), engine_proc, engine_log)
            for url in (readiness, liveness):
                assert httpx.get(url, timeout=5).status_code == 200, url

            # the engine is Ready: the pod the router's discovery sees, with the rendered labels
            pod_labels = engine["spec"]["template"]["metadata"]["labels"]
            api.set_pod("lm-lmserve-smollm2-0", "127.0.0.1", labels=dict(pod_labels))
            api.set_pod("unrelated", "127.0.0.9", labels={"app": "something-else"})

            router_proc = start(router_cmd, router_env, router_log)
            for url in probe_urls(rc):
                wait_200(url, 60, router_proc, router_log)
            # the router found the engine through discovery and passes its health check
            wait_200(f"http://127.0.0.1:{router_port}/health", 60, router_proc, router_log)
            backends = httpx.get(f"http://127.0.0.1:{router_port}/router/backends").json()
            assert f"http://127.0.0.1:{engine_port}" in str(backends), backends
            assert "127.0.0.9" not in str(backends)

            served = ec["args"][ec["args"].index("--served-model-name") + 1]
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{router_port}/v1", api_key="unused", max_retries=0
            )
            raw = client.chat.completions.with_raw_response.create(
                model=served,
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=8,
                temperature=0,
            )
            assert raw.headers["x-lmserve-backend"] == f"http://127.0.0.1:{engine_port}"
            answer = raw.parse()
            assert answer.model == served
            assert answer.choices[0].message.content
            assert answer.usage.completion_tokens > 0
        finally:
            if router_proc is not None:
                stop(router_proc)
            stop(engine_proc)
        assert engine_proc.returncode == 0, engine_log.read_text()[-4000:]  # SIGTERM: clean exit
