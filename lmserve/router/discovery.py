"""Service discovery: which backends exist. The health checker decides which are usable.

    StaticDiscovery       the --backends list, once
    KubernetesDiscovery   ready pods of a namespace and label selector, kept current by a watch:
                          a pod that becomes Ready joins, one that is terminating (deletion
                          timestamp set), not ready or deleted leaves

Kubernetes uses the official `kubernetes` package's asyncio API (`kubernetes.aio`, since
release 36): the watch runs on the router's own event loop and is cancelled with it, with no
thread to stop. It is imported only when --k8s-namespace is given, so the router stays light.
Loop: list (the full truth, plus a resourceVersion), then watch from that version until the
server-side timeout; any error (410 Gone, a dropped connection) goes back to listing after a
short pause.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from typing import Any

from lmserve.router.backends import BackendPool

logger = logging.getLogger(__name__)


class Discovery(ABC):
    @abstractmethod
    async def run(self, pool: BackendPool) -> None:
        """Fill `pool` and keep it current; returns when there is nothing more to watch.
        Cancelled at shutdown."""


class StaticDiscovery(Discovery):
    def __init__(self, urls: list[str] | tuple[str, ...]) -> None:
        self.urls = list(urls)

    async def run(self, pool: BackendPool) -> None:
        pool.replace_all(self.urls)


class KubernetesDiscovery(Discovery):
    def __init__(
        self,
        namespace: str,
        label_selector: str | None,
        port: int,
        api_server: str | None = None,
        watch_timeout_s: int = 60,
        retry_delay_s: float = 1.0,
    ) -> None:
        self.namespace = namespace
        self.label_selector = label_selector or ""
        self.port = port
        self.api_server = api_server
        self.watch_timeout_s = watch_timeout_s
        self.retry_delay_s = retry_delay_s
        self.members: dict[str, str] = {}  # pod name -> backend URL

    async def run(self, pool: BackendPool) -> None:
        from kubernetes.aio import client

        api_client = await self._api_client()
        try:
            v1 = client.CoreV1Api(api_client)
            while True:
                try:
                    version = await self._list(v1, pool)
                    await self._watch(v1, pool, version)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # 410 Gone, connection lost, API errors: list again
                    logger.warning(
                        "kubernetes discovery: %s: %s; listing again", type(e).__name__, e
                    )
                    await asyncio.sleep(self.retry_delay_s)
        finally:
            await api_client.close()

    async def _api_client(self) -> Any:
        from kubernetes.aio import client, config

        configuration = client.Configuration()
        if self.api_server:
            configuration.host = self.api_server.rstrip("/")
        else:
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                await config.load_kube_config(client_configuration=configuration)
        return client.ApiClient(configuration=configuration)

    async def _list(self, v1: Any, pool: BackendPool) -> str:
        pods = await v1.list_namespaced_pod(self.namespace, label_selector=self.label_selector)
        self.members = {}
        for pod in pods.items:
            url = self.pod_url(pod)
            if url is not None:
                self.members[pod.metadata.name] = url
        pool.replace_all(self.members.values())
        logger.info("kubernetes discovery: %d ready pod(s)", len(self.members))
        return pods.metadata.resource_version

    async def _watch(self, v1: Any, pool: BackendPool, version: str) -> None:
        from kubernetes.aio import watch

        stream = watch.Watch().stream(
            v1.list_namespaced_pod,
            self.namespace,
            label_selector=self.label_selector,
            resource_version=version,
            timeout_seconds=self.watch_timeout_s,
        )
        async with stream:
            async for event in stream:
                self.apply(event["type"], event["object"], pool)

    def apply(self, event_type: str, pod: Any, pool: BackendPool) -> None:
        """One watch event: the pod joins, moves or leaves."""
        name = pod.metadata.name
        url = None if event_type == "DELETED" else self.pod_url(pod)
        old = self.members.pop(name, None)
        if old is not None and old != url and old not in self.members.values():
            logger.info("kubernetes discovery: pod %s left (%s)", name, old)
            pool.remove(old)
        if url is not None:
            self.members[name] = url
            if old != url:
                logger.info("kubernetes discovery: pod %s joined (%s)", name, url)
                pool.add(url)

    def pod_url(self, pod: Any) -> str | None:
        """The engine URL of a ready, running, not terminating pod; else None."""
        status = pod.status
        if pod.metadata.deletion_timestamp is not None or status is None or not status.pod_ip:
            return None
        ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or ())
        if status.phase != "Running" or not ready:
            return None
        return f"http://{status.pod_ip}:{self.port}"
