"""The Helm chart's autoscaling rule, replayed: its values, the HPA's arithmetic, and pods that
serve only after the measured cold start."""

from __future__ import annotations

from pathlib import Path

import yaml

from lmserve.sim.autoscale import AutoscalePolicy, Autoscaler
from lmserve.sim.report import summarize
from lmserve.sim.workload import WorkloadSpec
from tests.sim.conftest import run_cluster

ROOT = Path(__file__).resolve().parents[2]


def test_the_policy_reads_the_charts_thresholds_and_intervals():
    values = yaml.safe_load((ROOT / "deploy/helm/lmserve/values.yaml").read_text())
    keda = AutoscalePolicy.from_chart(ROOT / "deploy/helm/lmserve/values.yaml", "keda")
    assert keda.target_waiting == values["autoscaling"]["keda"]["waitingThreshold"]
    assert keda.polling_interval_s == values["autoscaling"]["keda"]["pollingInterval"]
    hpa = AutoscalePolicy.from_chart(
        ROOT / "deploy/helm/lmserve/values.yaml", "hpa", max_replicas=9
    )
    assert hpa.scale_down_window_s == values["autoscaling"]["hpa"]["scaleDownStabilizationSeconds"]
    assert hpa.target_waiting == values["autoscaling"]["hpa"]["targetAverageValue"]
    assert hpa.max_replicas == 9


def test_the_hpa_rule_scales_up_at_most_double_and_down_only_after_the_window():
    scaler = Autoscaler(AutoscalePolicy(target_waiting=5, scale_down_window_s=300,
                                        min_replicas=1, max_replicas=100))  # fmt: skip
    assert scaler.desired(0, 2, 200) == 6  # wants 40: at most max(2 x 2, 2 + 4)
    assert scaler.desired(15, 6, 200) == 12
    assert scaler.desired(30, 12, 62) == 12  # 62 / (12 x 5) is within the 10% tolerance
    assert scaler.desired(30, 12, 0) == 12  # a quiet moment: the window still says 40
    assert scaler.desired(400, 12, 0) == 1  # the window has passed


def test_under_a_rush_the_cluster_grows_and_new_pods_serve_after_the_cold_start(profile):
    spec = WorkloadSpec("random", request_rate=60.0, duration_s=120.0, input_len=400,
                        output_len=100, vocab_size=2048)  # fmt: skip
    policy = AutoscalePolicy(target_waiting=5, min_replicas=1, max_replicas=8)
    cluster = run_cluster(profile, spec, replicas=1, autoscale=policy)
    s = summarize(cluster)
    assert max(total for _, _, total in s["replicas_over_time"]) > 1
    grown = [p for p in cluster.pods if p.index > 0]
    assert grown and all(
        p.ready_s - p.created_s == profile.cold_start_s for p in grown if p.ready_s
    )
    assert s["gpu_hours"] > cluster.end_s / 3600  # more than the one replica's time
