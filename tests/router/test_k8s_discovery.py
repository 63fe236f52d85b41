"""Kubernetes discovery against a stand-in of the Kubernetes pod list/watch API (no cluster
runs here): ready pods join, not-ready, terminating and deleted pods leave, the label selector
is honoured, and a watch that ends is resumed."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmserve.router.app import build_app
from lmserve.router.config import RouterConfig
from lmserve.router.discovery import KubernetesDiscovery
from tests.router.conftest import wait_until
from tests.router.standin import StandInEngine, free_port, serve_in_thread

pytest.importorskip("kubernetes.aio")

NAMESPACE = "inference"
SELECTOR = "app=lmserve"


class StandInKubernetesAPI:
    """GET /api/v1/namespaces/{ns}/pods: a PodList, or with watch=true a stream of JSON-line
    events after the given resourceVersion (replayed from history, then live) that ends after
    timeoutSeconds, as the real API server's watch does. Only `key=value` selectors."""

    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.history: list[tuple[int, str, dict[str, Any]]] = []  # (resourceVersion, type, pod)
        self.version = 100
        self.changed = threading.Condition()
        self.watches = 0

    def set_pod(self, name: str, ip: str, *, ready: bool = True, labels: dict | None = None,
                terminating: bool = False, deleted: bool = False) -> None:  # fmt: skip
        with self.changed:
            self.version += 1
            pod = _pod(name, ip, ready, labels or {"app": "lmserve"}, terminating, self.version)
            kind = "DELETED" if deleted else ("MODIFIED" if name in self.pods else "ADDED")
            if deleted:
                self.pods.pop(name, None)
            else:
                self.pods[name] = pod
            self.history.append((self.version, kind, pod))
            self.changed.notify_all()

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/api/v1/namespaces/{namespace}/pods")
        async def pods(namespace: str, request: Request):
            assert namespace == NAMESPACE
            params = request.query_params
            match = _selector(params.get("labelSelector", ""))
            if params.get("watch") not in ("true", "True", "1"):
                with self.changed:
                    items = [p for p in self.pods.values() if match(p)]
                    version = str(self.version)
                return JSONResponse({"apiVersion": "v1", "kind": "PodList",
                                     "metadata": {"resourceVersion": version}, "items": items})  # fmt: skip
            self.watches += 1
            since = int(params.get("resourceVersion") or 0)
            timeout = float(params.get("timeoutSeconds") or 5)
            return StreamingResponse(
                self._events(since, timeout, match), media_type="application/json"
            )

        return app

    async def _events(self, since: int, timeout: float, match):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        sent = since
        while loop.time() < deadline:
            with self.changed:
                new = [(v, k, p) for v, k, p in self.history if v > sent]
            for version, kind, pod in new:
                sent = version
                if match(pod):
                    yield json.dumps({"type": kind, "object": pod}) + "\n"
            await asyncio.sleep(0.02)


def _selector(text: str):
    wanted = dict(part.split("=", 1) for part in text.split(",") if part)
    return lambda pod: all(pod["metadata"]["labels"].get(k) == v for k, v in wanted.items())


def _pod(name, ip, ready, labels, terminating, version) -> dict[str, Any]:
    metadata = {"name": name, "namespace": NAMESPACE, "labels": labels,
                "resourceVersion": str(version)}  # fmt: skip
    if terminating:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": [{"name": "engine", "image": "lmserve"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def backend_urls(router_state) -> set[str]:
    return {b.url for b in router_state.pool}


@pytest.mark.slow
def test_kubernetes_pods_join_and_leave_the_router():
    port = free_port()  # every "pod" serves on the same port, each at its own 127.x address
    api = StandInKubernetesAPI()
    a_url, b_url = f"http://127.0.0.2:{port}", f"http://127.0.0.3:{port}"
    api.set_pod("engine-a", "127.0.0.2")
    api.set_pod("engine-b", "127.0.0.3", ready=False)
    api.set_pod("other", "127.0.0.4", labels={"app": "something-else"})
    config = RouterConfig(k8s_namespace=NAMESPACE, k8s_label_selector=SELECTOR, k8s_port=port,
                          health_check_interval=0.2)  # fmt: skip
    with (
        StandInEngine("a", port=port, host="127.0.0.2"),
        StandInEngine("b", port=port, host="127.0.0.3"),
        serve_in_thread(api.app()) as kube,
    ):
        discovery = KubernetesDiscovery(NAMESPACE, SELECTOR, port, kube.url, watch_timeout_s=1)
        app = build_app(config, discovery=discovery)
        state = app.state.router
        with serve_in_thread(app) as router:
            client = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
            wait_until(lambda: backend_urls(state) == {a_url}, what="ready pod a only")
            wait_until(lambda: httpx.get(router.url + "/health").status_code == 200, what="a")
            assert client.completions.create(model="m", prompt="hi").choices[0].text == "a"

            api.set_pod("engine-b", "127.0.0.3", ready=True)  # becomes Ready: joins
            wait_until(lambda: backend_urls(state) == {a_url, b_url}, what="b joins")
            wait_until(lambda: all(b.healthy for b in state.pool), what="b healthy")
            texts = {
                client.completions.create(model="m", prompt="hi").choices[0].text for _ in range(4)
            }
            assert texts == {"a", "b"}

            api.set_pod("engine-a", "127.0.0.2", terminating=True)  # terminating: leaves
            wait_until(lambda: backend_urls(state) == {b_url}, what="a leaves")
            texts = {
                client.completions.create(model="m", prompt="hi").choices[0].text for _ in range(3)
            }
            assert texts == {"b"}

            watches = api.watches
            wait_until(lambda: api.watches > watches, timeout=5, what="the watch resumed")
            api.set_pod("engine-b", "127.0.0.3", deleted=True)  # after the resume: still seen
            wait_until(lambda: not backend_urls(state), what="b deleted")
            assert httpx.get(router.url + "/health").status_code == 503


def test_pod_url_needs_ready_running_and_not_terminating():
    from kubernetes.aio.client import ApiClient

    discovery = KubernetesDiscovery(NAMESPACE, SELECTOR, 8000)

    def url(**kwargs) -> str | None:
        raw = _pod("p", "10.0.0.7", kwargs.pop("ready", True), {"app": "lmserve"},
                   kwargs.pop("terminating", False), 1)  # fmt: skip
        raw["status"].update(kwargs)
        pod = ApiClient().deserialize(json.dumps(raw), "V1Pod", "application/json")
        return discovery.pod_url(pod)

    assert url() == "http://10.0.0.7:8000"
    assert url(ready=False) is None
    assert url(terminating=True) is None
    assert url(phase="Pending") is None
    assert url(podIP=None) is None
