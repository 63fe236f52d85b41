"""The autoscaling rule really fires: a real Prometheus scrapes a real engine and router,
started from the chart's rendered CPU containers (see test_rendered_processes.py), while a load
ramp goes through the router; the rendered ScaledObject's trigger queries, and the HPA's external
metric as prometheus-adapter computes it from the rule NOTES.txt gives, are evaluated by that
Prometheus. Idle: the waiting queue is below the threshold and KEDA's formula keeps the model at
its minimum (zero: scale to zero, no trigger active). Under load: above it, and the formula asks
for more replicas. After the load: back down.

The formulas (KEDA's ScaledObject documentation and Kubernetes' HPA algorithm): KEDA feeds one
external metric per trigger to an HPA; for an AverageValue target the HPA wants
ceil(value / threshold) replicas, for a Value target ceil(current x value / threshold); it takes
the largest, inside [max(minReplicaCount, 1), maxReplicaCount], and leaves the count alone when
the ratio is within its 10 % tolerance. KEDA itself takes the Deployment to minReplicaCount
(0 here) when no trigger is active (every value <= its activationThreshold, default 0) and to
at least 1 when one is."""

from __future__ import annotations

import json
import math
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helm.test_chart import CHART, HELM, TESTS_DIR, container, kinds, one

yaml = pytest.importorskip("yaml")
httpx = pytest.importorskip("httpx")
pytest.importorskip("kubernetes.aio")

from tests.helm.test_rendered_processes import as_process, start, stop, wait_200  # noqa: E402
from tests.observability.promql import Prometheus, require_binary  # noqa: E402
from tests.router.standin import free_port, serve_in_thread  # noqa: E402
from tests.router.test_k8s_discovery import NAMESPACE, StandInKubernetesAPI  # noqa: E402

RELEASE = "lm"
HPA_TOLERANCE = 0.1


def render(*sets: str, values: str = "cpu-one-model") -> tuple[list[dict[str, Any]], str]:
    """(manifests, NOTES.txt)."""
    base = [
        HELM,
        "template",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        "-f",
        str(TESTS_DIR / f"{values}.yaml"),
    ]
    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.run([*base, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    notes = subprocess.run(
        [HELM, "install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client",
         "-f", str(TESTS_DIR / f"{values}.yaml"), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert notes.returncode == 0, notes.stderr
    return docs, notes.stdout.split("NOTES:", 1)[1]


def keda_desired(
    so: dict[str, Any], values: dict[str, float], current: int, skip: tuple[str, ...] = ()
) -> int:
    spec = so["spec"]
    lo, hi = spec["minReplicaCount"], spec["maxReplicaCount"]
    triggers = [t for t in spec["triggers"] if t["name"] not in skip]
    active = any(
        values[t["name"]] > float(t["metadata"].get("activationThreshold", "0")) for t in triggers
    )
    if not active:
        return lo
    current = max(current, 1)  # KEDA activates the Deployment first
    wanted = []
    for t in triggers:
        threshold, value = float(t["metadata"]["threshold"]), values[t["name"]]
        if t.get("metricType", "AverageValue") == "AverageValue":
            ratio = value / (threshold * current)
        else:
            ratio = value / threshold
        wanted.append(current if abs(ratio - 1) <= HPA_TOLERANCE else math.ceil(ratio * current))
    return min(hi, max(max(lo, 1), *wanted))


def hpa_desired(hpa: dict[str, Any], value: float, current: int) -> int:
    spec = hpa["spec"]
    target = float(spec["metrics"][0]["external"]["target"]["averageValue"])
    ratio = value / (target * current)
    wanted = current if abs(ratio - 1) <= HPA_TOLERANCE else math.ceil(ratio * current)
    return min(spec["maxReplicas"], max(spec["minReplicas"], wanted))


def adapter_query(notes: str, hpa: dict[str, Any]) -> str:
    """prometheus-adapter's query for the HPA's external metric, from the rule in NOTES.txt:
    <<.LabelMatchers>> from the metric's selector, <<.GroupBy>> empty (one series)."""
    m = re.search(r"metricsQuery: '([^']+)'", notes)
    assert m, notes
    selector = hpa["spec"]["metrics"][0]["external"]["metric"]["selector"]["matchLabels"]
    matchers = ",".join(f'{k}="{v}"' for k, v in selector.items())
    return m.group(1).replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "")


class Load:
    """`concurrency` client threads sending chat requests through the router until stopped."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.stopped = threading.Event()
        self.threads: list[threading.Thread] = []
        self.ok = 0
        self.errors: list[str] = []

    def add(self, n: int) -> None:
        for _ in range(n):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self.threads.append(t)

    def _run(self) -> None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
            "max_tokens": 16,
            "temperature": 0,
        }
        with httpx.Client(timeout=300) as client:
            while not self.stopped.is_set():
                try:
                    r = client.post(self.url + "/v1/chat/completions", json=body)
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.errors.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as e:
                    self.errors.append(repr(e))

    def stop(self) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(timeout=300)


def value(prom: Prometheus, expr: str) -> float:
    """The query's value as KEDA reads it (ignoreNullValues: no series = 0)."""
    result, error = prom.query(expr)
    assert error is None, f"{expr}: {error}"
    assert len(result) <= 1, f"{expr}: {len(result)} series; a trigger query must return one"
    return float(result[0]["value"][1]) if result else 0.0


def wait_for(cond, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_rendered_autoscaling_rules_fire_under_load(tmp_path: Path):
    prometheus_bin = require_binary("prometheus")
    engine_port, router_port, prom_port = free_port(), free_port(), free_port()
    api = StandInKubernetesAPI()
    with serve_in_thread(api.app()) as kube:
        common = (
            f"engineDefaults.port={engine_port}",
            f"router.port={router_port}",
            f"router.routerArgs.k8s-api-server={kube.url}",
            f"autoscaling.keda.prometheusAddress=http://127.0.0.1:{prom_port}",
        )
        keda_docs, _ = render(
            *common,
            "autoscaling.keda.enabled=true",
            "autoscaling.keda.ttft.enabled=true",
            "autoscaling.keda.kvUsage.enabled=true",
            "autoscaling.keda.keepAlive.enabled=true",
            "engineDefaults.autoscaling.minReplicas=0",
            "engineDefaults.autoscaling.maxReplicas=4",
        )
        hpa_docs, hpa_notes = render(
            *common,
            "autoscaling.hpa.enabled=true",
            "engineDefaults.autoscaling.maxReplicas=4",
        )
        (so,) = kinds(keda_docs, "ScaledObject")
        (hpa,) = kinds(hpa_docs, "HorizontalPodAutoscaler")
        triggers = {t["name"]: t for t in so["spec"]["triggers"]}
        assert set(triggers) == {"waiting", "ttft-p90", "kv-usage", "keep-alive"}
        assert all(
            t["metadata"]["serverAddress"] == f"http://127.0.0.1:{prom_port}"
            for t in triggers.values()
        )
        hpa_expr = adapter_query(hpa_notes, hpa)

        engine = one(keda_docs, "Deployment", f"{RELEASE}-lmserve-smollm2")
        router = one(keda_docs, "Deployment", f"{RELEASE}-lmserve-router")
        ec, rc = container(engine, "engine"), container(router, "router")
        cache = tmp_path / "cache"
        cache.mkdir()
        engine_cmd, engine_env = as_process(ec, keda_docs, {"/cache": cache})
        router_cmd, router_env = as_process(rc, keda_docs, {})
        model = ec["args"][ec["args"].index("--served-model-name") + 1]

        engine_proc = start(engine_cmd, engine_env, tmp_path / "engine.log")
        router_proc = prom = load = None
        try:
            wait_200(
                f"http://127.0.0.1:{engine_port}/health", 300, engine_proc, tmp_path / "engine.log"
            )
            api.set_pod("lm-lmserve-smollm2-0", "127.0.0.1",
                        labels=dict(engine["spec"]["template"]["metadata"]["labels"]))  # fmt: skip
            router_proc = start(router_cmd, router_env, tmp_path / "router.log")
            wait_200(
                f"http://127.0.0.1:{router_port}/health", 60, router_proc, tmp_path / "router.log"
            )

            config = {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "lmserve-engine",
                     "static_configs": [{"targets": [f"127.0.0.1:{engine_port}"]}]},
                    {"job_name": "lmserve-router",
                     "static_configs": [{"targets": [f"127.0.0.1:{router_port}"]}]},
                ],
            }  # fmt: skip
            prom_dir = tmp_path / "prometheus"
            prom_dir.mkdir()
            prom = Prometheus(prometheus_bin, prom_dir, config, prom_port)
            wait_for(
                lambda: len([t for t in prom.targets() if t["health"] == "up"]) == 2,
                30, "both targets up",
            )  # fmt: skip

            def evaluate() -> dict[str, float]:
                got = {name: value(prom, t["metadata"]["query"]) for name, t in triggers.items()}
                got["hpa"] = value(prom, hpa_expr)
                return got

            # idle: the engine's gauges are scraped and read 0
            wait_for(lambda: prom.query(triggers["waiting"]["metadata"]["query"])[0], 30,
                     "the waiting gauge in Prometheus")  # fmt: skip
            idle = evaluate()
            threshold = float(triggers["waiting"]["metadata"]["threshold"])
            assert idle["waiting"] < threshold and idle["hpa"] < threshold, idle
            assert idle["keep-alive"] == 0, idle
            assert keda_desired(so, idle, current=1) == 0  # scale to zero: nothing active
            assert hpa_desired(hpa, idle["hpa"], current=1) == 1  # the HPA's floor

            # the ramp: 4, then 12, then 24 clients (the engine runs 8 at a time)
            load = Load(f"http://127.0.0.1:{router_port}", model)
            for n in (4, 8, 12):
                load.add(n)
                time.sleep(4)
            peak = wait_for(
                lambda: (v := evaluate())["waiting"] > threshold and v["hpa"] > threshold and v,
                120, "the waiting queue above the threshold",
            )  # fmt: skip
            wait_for(lambda: evaluate()["keep-alive"] == 1, 30, "the keep-alive trigger")
            assert peak["kv-usage"] > 0, peak
            up_keda, up_hpa = keda_desired(so, peak, current=1), hpa_desired(hpa, peak["hpa"], 1)
            assert up_keda > 1 and up_hpa > 1, (peak, up_keda, up_hpa)
            # TTFT p90 has samples now (the trigger returns a number, not an empty vector)
            wait_for(lambda: evaluate()["ttft-p90"] > 0, 60, "TTFT p90 under load")

            load.stop()
            assert load.ok > 0 and not load.errors, load.errors[:5]
            after = wait_for(
                lambda: (v := evaluate())["waiting"] == 0 and v,
                60, "the queue to drain",
            )  # fmt: skip
            # back down: to one replica while requests arrived in the keep-alive window (5m),
            # to zero once that window holds none (not waited for here). The TTFT trigger looks
            # back over its own 2-minute window (the slow first tokens of the ramp are still in
            # it), so it is left out of this decision; it reads a number, never NaN.
            assert not math.isnan(after["ttft-p90"])
            down_keda = keda_desired(so, after, current=up_keda, skip=("ttft-p90",))
            down_hpa = hpa_desired(hpa, after["hpa"], current=up_hpa)
            assert down_keda == 1 and after["keep-alive"] == 1, after
            assert down_hpa == 1, after
            (tmp_path / "values.json").write_text(
                json.dumps({"idle": idle, "peak": peak, "after": after,
                            "replicas": {"keda": [0, up_keda, down_keda], "hpa": [1, up_hpa, down_hpa]}})
            )  # fmt: skip
            print("autoscaling:", (tmp_path / "values.json").read_text())
        finally:
            if load is not None:
                load.stop()
            if prom is not None:
                prom.stop()
            if router_proc is not None:
                stop(router_proc)
            stop(engine_proc)
