"""The shipped monitoring files, without a live Prometheus: promtool accepts the configuration
and rules, the dashboards are what deploy/grafana/build_dashboards.py generates, and they are
well-formed Grafana JSON. tests/observability/test_prometheus.py evaluates every expression
against a real Prometheus scraping real engines."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from tests.observability.promql import (
    ALERT_RULES,
    DASHBOARD_DIR,
    GRAFANA_DIR,
    PROMETHEUS_YML,
    RECORDING_RULES,
    RULE_TESTS,
    dashboard_files,
    dashboard_queries,
    operands,
    require_binary,
)


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_binary("promtool"), *args], capture_output=True, text=True, timeout=60
    )


def test_promtool_accepts_the_configuration_and_its_rule_files():
    result = _promtool("check", "config", str(PROMETHEUS_YML))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout + result.stderr


def test_promtool_accepts_the_rules():
    result = _promtool("check", "rules", str(RECORDING_RULES), str(ALERT_RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alerts_pass():
    """deploy/prometheus/tests/: each alert fires on synthetic series after its `for:` and not
    before, with the labels and annotations expected; the quantile recording rule's values."""
    result = _promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def _build_module():
    spec = importlib.util.spec_from_file_location(
        "build_dashboards", GRAFANA_DIR / "build_dashboards.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_committed_dashboards_are_what_the_generator_builds():
    module = _build_module()
    built = module.build()
    assert sorted(built) == [p.name for p in dashboard_files()]
    for name, board in built.items():
        assert (DASHBOARD_DIR / name).read_text() == module.render(board), (
            f"{name} is stale: run python deploy/grafana/build_dashboards.py"
        )


def test_the_generator_builds_vllm_prefixed_dashboards(tmp_path):
    module = _build_module()
    assert module.main(["--prefix", "vllm", "--out", str(tmp_path)]) == 0
    text = "".join(p.read_text() for p in sorted(tmp_path.glob("*.json")))
    assert "vllm:num_requests_running" in text
    assert "lmserve:" not in text
    assert "lmserve_router:" in text  # the router's names do not change


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.name)
def test_dashboard_is_well_formed(path):
    board = json.loads(path.read_text())
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert {"model", "instance"} <= variables.keys()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    builtin = {"__rate_interval", "__interval", "__range"}
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
            assert used <= variables.keys() | builtin, (panel["title"], used)
    # No two panels overlap.
    cells = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        xs, ys = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        mine = {(x, y) for x in xs for y in ys}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_the_dashboards_cover_the_panels_asked_for():
    exprs = " ".join(q.expr for p in dashboard_files() for q in dashboard_queries(p))
    for needle in (
        "lmserve:engine_healthy", "up{job=~\"$job\"", "e2e_request_latency_seconds",
        "time_to_first_token_seconds", "inter_token_latency_seconds",
        "lmserve:request_success_total", "lmserve:num_requests_running",
        "lmserve:num_requests_waiting", "lmserve:kv_cache_usage_perc",
        "lmserve:prefix_cache_hits_total", "lmserve:prefix_cache_queries_total",
        "lmserve:prompt_tokens_total", "lmserve:generation_tokens_total",
        "lmserve:request_queue_time_seconds", "lmserve:request_prefill_time_seconds",
        "lmserve:request_decode_time_seconds", "lmserve:kv_offload_hit_tokens_total",
        "lmserve_router:routing_decisions_total", "lmserve_router:backend_healthy",
    ):  # fmt: skip
        assert needle in exprs, needle


def test_operands_of_alert_expressions():
    assert operands('up{job="x"} == 0') == ['up{job="x"}']
    assert operands("min_over_time(a[5m]) > 0\nand deriv(a[5m]) > 0") == [
        "min_over_time(a[5m])",
        "deriv(a[5m])",
    ]
    assert operands('x{quantile="0.99"} > 2') == ['x{quantile="0.99"}']
    assert operands("a / on(x) group_left b >= bool 3") == ["a / on(x) group_left b"]
    assert operands("sum(rate(x[1m])) / sum(rate(y[1m]))") == [
        "sum(rate(x[1m])) / sum(rate(y[1m]))"
    ]
