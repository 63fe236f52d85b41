"""The Helm chart's autoscaling rule (deploy/helm/lmserve), replayed on simulated metrics.

The chart scales each model's engines on one query, sum(lmserve:num_requests_waiting), with an
AverageValue target (`autoscaling.keda.waitingThreshold`, or `autoscaling.hpa.targetAverageValue`
with prometheus-adapter). Both end in a Kubernetes HPA, so the rule is the HPA's:

    every polling interval (KEDA pollingInterval; the HPA's sync period is 15 s too):
        desired = ceil(sum of waiting requests / target)              (AverageValue)
        no change while |sum / (target x replicas) - 1| <= 0.1       (the HPA's tolerance)
        scale up at once, by at most max(100%, 4 pods) per 15 s       (HPA default policies)
        scale down to the highest recommendation of the last window   (stabilization: the
            chart's hpa.scaleDownStabilizationSeconds, or the HPA's default 300 s under KEDA,
            whose cooldownPeriod only governs scaling to zero)
        within [minReplicas, maxReplicas]

A new pod serves after `cold_start_s` (the profile's measured process start -> first token).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HPA_TOLERANCE = 0.1
HPA_SYNC_S = 15.0
HPA_DEFAULT_SCALE_DOWN_WINDOW_S = 300.0
CHART_VALUES = Path("deploy/helm/lmserve/values.yaml")


@dataclass(frozen=True)
class AutoscalePolicy:
    mode: str = "keda"  # or "hpa"
    target_waiting: float = 5.0  # keda.waitingThreshold / hpa.targetAverageValue
    polling_interval_s: float = 15.0  # keda.pollingInterval
    scale_down_window_s: float = HPA_DEFAULT_SCALE_DOWN_WINDOW_S
    min_replicas: int = 1  # models[].autoscaling (the chart's default)
    max_replicas: int = 4

    @classmethod
    def from_helm_values(
        cls, values: dict[str, Any], mode: str = "keda", **bounds: int | None
    ) -> AutoscalePolicy:
        """The policy a chart values tree (values.yaml, parsed) describes."""
        scaling = values["autoscaling"]
        defaults = values.get("engineDefaults", {}).get("autoscaling", {})
        lo = bounds.get("min_replicas") or defaults.get("minReplicas", 1)
        hi = bounds.get("max_replicas") or defaults.get("maxReplicas", 4)
        if mode == "keda":
            keda = scaling["keda"]
            return cls("keda", float(keda["waitingThreshold"]), float(keda["pollingInterval"]),
                       HPA_DEFAULT_SCALE_DOWN_WINDOW_S, max(1, lo), hi)  # fmt: skip
        hpa = scaling["hpa"]
        return cls("hpa", float(hpa["targetAverageValue"]), HPA_SYNC_S,
                   float(hpa["scaleDownStabilizationSeconds"]), max(1, lo), hi)  # fmt: skip

    @classmethod
    def from_chart(cls, path: str | Path = CHART_VALUES, mode: str = "keda", **bounds):
        import yaml

        return cls.from_helm_values(yaml.safe_load(Path(path).read_text()), mode, **bounds)


class Autoscaler:
    """The HPA's decision for one Deployment, called every polling interval."""

    def __init__(self, policy: AutoscalePolicy) -> None:
        self.policy = policy
        self._recommendations: deque[tuple[float, int]] = deque()
        self._last_scale_up = -math.inf

    def desired(self, now: float, replicas: int, waiting: float) -> int:
        p = self.policy
        target = p.target_waiting
        if replicas and abs(waiting / (target * replicas) - 1.0) <= HPA_TOLERANCE:
            raw = replicas
        else:
            raw = math.ceil(waiting / target)
        raw = min(max(raw, p.min_replicas), p.max_replicas)
        self._recommendations.append((now, raw))
        while self._recommendations[0][0] < now - p.scale_down_window_s:
            self._recommendations.popleft()
        if raw > replicas:
            return min(raw, max(2 * replicas, replicas + 4), p.max_replicas)
        stable = max(r for _, r in self._recommendations)
        return min(replicas, max(stable, p.min_replicas))
