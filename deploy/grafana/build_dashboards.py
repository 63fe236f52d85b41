#!/usr/bin/env python3
"""Build the Grafana dashboards in deploy/grafana/dashboards/ from the definitions below.

    python deploy/grafana/build_dashboards.py            # (re)write the JSON files
    python deploy/grafana/build_dashboards.py --check    # exit 1 if a JSON file is stale
    python deploy/grafana/build_dashboards.py --prefix vllm --out /tmp/vllm-dashboards
                                                         # for engines run with --metrics-prefix vllm

The JSON is generated (and committed) rather than written by hand: a panel is one line here, the
grid layout, datasource wiring and ids are computed, and tests/observability/ reads the same
definitions to evaluate every PromQL expression against a real Prometheus.

Standard library only. Expressions may use the Grafana variables $model, $instance, $job and
$__rate_interval; tests/observability/test_prometheus.py substitutes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = 39  # Grafana 10.4 / 11.x
OUT_DIR = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"


@dataclass
class Target:
    expr: str
    legend: str = ""
    instant: bool = False  # table panels: one instant query, formatted as a table


@dataclass
class Panel:
    title: str
    targets: list[Target]
    kind: str = "timeseries"  # timeseries | stat | table | state-timeline
    unit: str = "short"
    width: int = 8
    height: int = 8
    description: str = ""
    min: float | None = None
    max: float | None = None
    stack: bool = False


@dataclass
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


def T(expr: str, legend: str = "", instant: bool = False) -> Target:  # noqa: N802
    return Target(expr, legend, instant)


# --------------------------------------------------------------------------------------------
# PromQL helpers. `P` is the metric prefix ("lmserve" or "vllm"); `sel` the label selector.


def quantiles(p: str, hist: str, sel: str, by: str, legend: str) -> list[Target]:
    """p50/p90/p99 of histogram `hist` (name without _bucket) and its mean, by `by`."""
    targets = [
        T(
            f"histogram_quantile({q}, sum by (le, {by}) (rate({p}:{hist}_bucket{sel}[{RI}])))",
            f"{legend} p{int(q * 100)}",
        )
        for q in (0.5, 0.9, 0.99)
    ]
    targets.append(mean(p, hist, sel, by, f"{legend} mean"))
    return targets


def mean(p: str, hist: str, sel: str, by: str, legend: str) -> Target:
    return T(
        f"sum by ({by}) (rate({p}:{hist}_sum{sel}[{RI}]))"
        f" / sum by ({by}) (rate({p}:{hist}_count{sel}[{RI}]))",
        legend,
    )


def recorded(p: str, hist: str, legend: str = "{{model_name}}") -> list[Target]:
    """The quantiles and mean that deploy/prometheus/rules/lmserve.rules.yml records."""
    sel = '{model_name=~"$model"}'
    return [
        T(f"model_name:{p}_{hist}:quantile_rate1m{sel}", legend + " p{{quantile}}"),
        T(f"model_name:{p}_{hist}:mean_rate1m{sel}", legend + " mean"),
    ]


# --------------------------------------------------------------------------------------------
# Dashboards (one panel per call, laid out by hand: the formatter is off here)


# fmt: off
def cluster_overview(p: str) -> tuple[dict, list[Row]]:
    sel = '{model_name=~"$model", instance=~"$instance"}'
    up = 'up{job=~"$job", instance=~"$instance"}'
    rows = [
        Row(
            "Fleet",
            [
                Panel("Engines up", [T(f"sum({up})")], "stat", width=4, height=5,
                      description="Engine scrape targets answering (Prometheus `up`)."),
                Panel("Healthy engines", [T(f"sum({p}:engine_healthy{sel})")], "stat", width=4,
                      height=5, description="Engines whose own health gauge is 1."),
                Panel("Requests/s", [T(f"sum(rate({p}:request_success_total{sel}[{RI}]))")],
                      "stat", unit="reqps", width=4, height=5),
                Panel("Running / waiting", [T(f"sum({p}:num_requests_running{sel})", "running"),
                                            T(f"sum({p}:num_requests_waiting{sel})", "waiting")],
                      "stat", width=4, height=5),
                Panel("Max KV-cache usage", [T(f"max({p}:kv_cache_usage_perc{sel})")], "stat",
                      unit="percentunit", width=4, height=5, min=0, max=1),
                Panel("Router: healthy backends", [T("sum(lmserve_router:backend_healthy)")],
                      "stat", width=4, height=5),
                Panel("Replicas over time",
                      [T(f"sum by (job) ({up})", "up ({{job}})"),
                       T(f"sum by (model_name) ({p}:engine_healthy{sel})",
                         "healthy {{model_name}}")],
                      width=24, height=7, min=0,
                      description="Engines up (scraped) and engines reporting healthy."),
            ],
        ),
        Row(
            "Latency (all instances of a model; recording rules)",
            [
                Panel("End-to-end latency", recorded(p, "e2e_request_latency_seconds"), unit="s",
                      description="p50/p90/p99 and mean over 1m, from "
                      "deploy/prometheus/rules/lmserve.rules.yml."),
                Panel("Time to first token", recorded(p, "time_to_first_token_seconds"),
                      unit="s"),
                Panel("Inter-token latency", recorded(p, "inter_token_latency_seconds"),
                      unit="s"),
            ],
        ),
        Row(
            "Load",
            [
                Panel("Requests/s by model",
                      [T(f"sum by (model_name) (rate({p}:request_success_total{sel}[{RI}]))",
                         "{{model_name}}")], unit="reqps"),
                Panel("Running and waiting requests",
                      [T(f"sum by (model_name) ({p}:num_requests_running{sel})",
                         "running {{model_name}}"),
                       T(f"sum by (model_name) ({p}:num_requests_waiting{sel})",
                         "waiting {{model_name}}")]),
                Panel("KV-cache usage by instance",
                      [T(f"max by (instance) ({p}:kv_cache_usage_perc{sel})", "{{instance}}")],
                      unit="percentunit", min=0, max=1),
                Panel("Prefix-cache hit rate",
                      [T(f"sum by (model_name) (rate({p}:prefix_cache_hits_total{sel}[{RI}]))"
                         f" / sum by (model_name) (rate({p}:prefix_cache_queries_total{sel}[{RI}]))",
                         "{{model_name}}")],
                      unit="percentunit", min=0, max=1,
                      description="Prompt tokens found in the GPU prefix cache / looked up."),
                Panel("Token throughput",
                      [T(f"sum by (model_name) (rate({p}:prompt_tokens_total{sel}[{RI}]))",
                         "prompt {{model_name}}"),
                       T(f"sum by (model_name) (rate({p}:generation_tokens_total{sel}[{RI}]))",
                         "generation {{model_name}}")], unit="short",
                      description="Tokens per second."),
                Panel("KV-offload hits by tier",
                      [T(f"sum by (tier) (rate({p}:kv_offload_hit_tokens_total{sel}[{RI}]))",
                         "{{tier}}")],
                      description="Tokens per second whose KV was loaded from a tier of the "
                      "KV connector (--kv-transfer-config) instead of being recomputed."),
            ],
        ),
        Row(
            "Router",
            [
                Panel("Router requests/s by status",
                      [T(f"sum by (status) (rate(lmserve_router:requests_total[{RI}]))",
                         "{{status}}")], unit="reqps"),
                Panel("Routing decisions by reason",
                      [T(f"sum by (reason) (rate(lmserve_router:routing_decisions_total[{RI}]))",
                         "{{reason}}")], unit="ops", stack=True),
                Panel("Router backend health",
                      [T("max by (backend) (lmserve_router:backend_healthy)", "{{backend}}")],
                      "state-timeline", min=0, max=1),
                Panel("Router in-flight requests by backend",
                      [T("sum by (backend) (lmserve_router:in_flight_requests)", "{{backend}}")]),
                Panel("Router added latency",
                      [T(f"histogram_quantile({q}, sum by (le) "
                         f"(rate(lmserve_router:added_latency_seconds_bucket[{RI}])))",
                         f"p{int(q * 100)}") for q in (0.5, 0.99)],
                      unit="s", description="Time the router adds before the response starts."),
            ],
        ),
    ]
    meta = {
        "uid": f"{p}-cluster-overview",
        "title": f"{p}: cluster overview",
        "description": "Every engine and the router: health, load, latency, caches, routing.",
        "variables": [
            datasource_var(),
            query_var("job", "Engine job", f"label_values({p}:num_requests_running, job)",
                      multi=True),
            query_var("model", "Model", f"label_values({p}:num_requests_running, model_name)",
                      multi=True),
            query_var("instance", "Instance",
                      f'label_values({p}:num_requests_running{{model_name=~"$model"}}, instance)',
                      multi=True),
        ],
    }
    return meta, rows


def per_model(p: str) -> tuple[dict, list[Row]]:
    sel = '{model_name="$model", instance=~"$instance"}'
    rows = [
        Row(
            "Overview",
            [
                Panel("Healthy instances", [T(f"sum({p}:engine_healthy{sel})")], "stat",
                      width=4, height=5),
                Panel("Requests/s", [T(f"sum(rate({p}:request_success_total{sel}[{RI}]))")],
                      "stat", unit="reqps", width=4, height=5),
                Panel("p99 TTFT",
                      [T(f"histogram_quantile(0.99, sum by (le) "
                         f"(rate({p}:time_to_first_token_seconds_bucket{sel}[{RI}])))")],
                      "stat", unit="s", width=4, height=5),
                Panel("p99 end-to-end latency",
                      [T(f"histogram_quantile(0.99, sum by (le) "
                         f"(rate({p}:e2e_request_latency_seconds_bucket{sel}[{RI}])))")],
                      "stat", unit="s", width=4, height=5),
                Panel("Waiting requests", [T(f"sum({p}:num_requests_waiting{sel})")], "stat",
                      width=4, height=5),
                Panel("Max KV-cache usage", [T(f"max({p}:kv_cache_usage_perc{sel})")], "stat",
                      unit="percentunit", width=4, height=5, min=0, max=1),
                Panel("Cache configuration",
                      [T("max by (instance, block_size, num_gpu_blocks, enable_prefix_caching,"
                         f' prefix_caching_hash_algo) ({p}:cache_config_info{{instance=~"$instance"}})',
                         instant=True)],
                      "table", width=24, height=5,
                      description="The engines' cache_config_info labels (the KV cache's "
                      "configuration; the gauge has no model_name label)."),
            ],
        ),
        Row(
            "Latency",
            [
                Panel("End-to-end latency",
                      quantiles(p, "e2e_request_latency_seconds", sel, "model_name", "e2e"),
                      unit="s"),
                Panel("Time to first token",
                      quantiles(p, "time_to_first_token_seconds", sel, "model_name", "TTFT"),
                      unit="s"),
                Panel("Inter-token latency",
                      quantiles(p, "inter_token_latency_seconds", sel, "model_name", "ITL"),
                      unit="s"),
                Panel("Time per output token",
                      quantiles(p, "request_time_per_output_token_seconds", sel, "model_name",
                                "TPOT"), unit="s"),
                Panel("Queue, prefill and decode time (mean)",
                      [mean(p, f"request_{phase}_time_seconds", sel, "model_name", phase)
                       for phase in ("queue", "prefill", "decode", "inference")],
                      unit="s", description="Per request: waiting to be scheduled, prefill, "
                      "decode, and all three (inference = prefill + decode)."),
                Panel("Queue, prefill and decode time (p99)",
                      [T(f"histogram_quantile(0.99, sum by (le) "
                         f"(rate({p}:request_{phase}_time_seconds_bucket{sel}[{RI}])))", phase)
                       for phase in ("queue", "prefill", "decode", "inference")], unit="s"),
                Panel("p99 TTFT by instance",
                      [T(f"histogram_quantile(0.99, sum by (le, instance) "
                         f"(rate({p}:time_to_first_token_seconds_bucket{sel}[{RI}])))",
                         "{{instance}}")], unit="s", width=12),
                Panel("p99 end-to-end latency by instance",
                      [T(f"histogram_quantile(0.99, sum by (le, instance) "
                         f"(rate({p}:e2e_request_latency_seconds_bucket{sel}[{RI}])))",
                         "{{instance}}")], unit="s", width=12),
            ],
        ),
        Row(
            "Throughput",
            [
                Panel("Requests/s by finish reason",
                      [T(f"sum by (finished_reason) (rate({p}:request_success_total{sel}[{RI}]))",
                         "{{finished_reason}}")], unit="reqps", stack=True),
                Panel("Requests/s by instance",
                      [T(f"sum by (instance) (rate({p}:request_success_total{sel}[{RI}]))",
                         "{{instance}}")], unit="reqps", stack=True),
                Panel("Token throughput",
                      [T(f"sum(rate({p}:prompt_tokens_total{sel}[{RI}]))", "prompt"),
                       T(f"sum(rate({p}:generation_tokens_total{sel}[{RI}]))", "generation")],
                      description="Tokens per second."),
                Panel("Tokens per engine step",
                      [T(f"histogram_quantile({q}, sum by (le) "
                         f"(rate({p}:iteration_tokens_total_bucket{sel}[{RI}])))",
                         f"p{int(q * 100)}") for q in (0.5, 0.99)],
                      description="Tokens (prefill + decode) scheduled per engine iteration."),
                Panel("Request lengths (p50 / p90)",
                      [T(f"histogram_quantile({q}, sum by (le) "
                         f"(rate({p}:request_{what}_tokens_bucket{sel}[{RI}])))",
                         f"{what} p{int(q * 100)}")
                       for what in ("prompt", "generation") for q in (0.5, 0.9)]),
                Panel("Request parameters (p50 / p99)",
                      [T(f"histogram_quantile({q}, sum by (le) "
                         f"(rate({p}:{name}_bucket{sel}[{RI}])))", f"{legend} p{int(q * 100)}")
                       for name, legend in (("request_params_max_tokens", "max_tokens"),
                                            ("request_max_num_generation_tokens",
                                             "max generation tokens"),
                                            ("request_params_n", "n"))
                       for q in (0.5, 0.99)]),
            ],
        ),
        Row(
            "Scheduler and caches",
            [
                Panel("Running requests by instance",
                      [T(f"sum by (instance) ({p}:num_requests_running{sel})", "{{instance}}")],
                      stack=True),
                Panel("Waiting requests by instance",
                      [T(f"sum by (instance) ({p}:num_requests_waiting{sel})", "{{instance}}")],
                      stack=True),
                Panel("KV-cache usage by instance",
                      [T(f"max by (instance) ({p}:kv_cache_usage_perc{sel})", "{{instance}}")],
                      unit="percentunit", min=0, max=1),
                Panel("Prefix-cache hit rate by instance",
                      [T(f"sum by (instance) (rate({p}:prefix_cache_hits_total{sel}[{RI}]))"
                         f" / sum by (instance) (rate({p}:prefix_cache_queries_total{sel}[{RI}]))",
                         "{{instance}}")], unit="percentunit", min=0, max=1),
                Panel("Preemptions/s",
                      [T(f"sum by (instance) (rate({p}:num_preemptions_total{sel}[{RI}]))",
                         "{{instance}}")], unit="ops"),
                Panel("KV-offload hits by tier",
                      [T(f"sum by (tier) (rate({p}:kv_offload_hit_tokens_total{sel}[{RI}]))",
                         "{{tier}}"),
                       T(f"sum(rate({p}:kv_offload_query_tokens_total{sel}[{RI}]))", "queried")],
                      description="Tokens per second looked up beyond the GPU prefix cache, "
                      "and loaded from each tier."),
                Panel("KV-offload bytes by tier",
                      [T(f"sum by (tier) (rate({p}:kv_offload_loaded_bytes_total{sel}[{RI}]))",
                         "loaded {{tier}}"),
                       T(f"sum by (tier) (rate({p}:kv_offload_saved_bytes_total{sel}[{RI}]))",
                         "saved {{tier}}")], unit="Bps", width=16),
            ],
        ),
    ]
    meta = {
        "uid": f"{p}-model",
        "title": f"{p}: model",
        "description": "One model's engines in detail; pick instances to compare.",
        "variables": [
            datasource_var(),
            query_var("model", "Model", f"label_values({p}:num_requests_running, model_name)",
                      multi=False),
            query_var("instance", "Instance",
                      f'label_values({p}:num_requests_running{{model_name="$model"}}, instance)',
                      multi=True),
        ],
    }
    return meta, rows
# fmt: on


# --------------------------------------------------------------------------------------------
# Grafana JSON


def datasource_var() -> dict:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
        "options": [],
    }


def query_var(name: str, label: str, query: str, multi: bool) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-var"},
        "refresh": 2,  # on time-range change
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
        **({"allValue": ".*"} if multi else {}),
        "current": {},
        "hide": 0,
        "options": [],
        "regex": "",
    }


def panel_json(panel: Panel, pid: int, x: int, y: int) -> dict:
    defaults: dict = {"unit": panel.unit}
    if panel.min is not None:
        defaults["min"] = panel.min
    if panel.max is not None:
        defaults["max"] = panel.max
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
        }
    options: dict = {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    if panel.kind == "stat":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        }
    elif panel.kind == "table":
        options = {"showHeader": True}
    targets = []
    for i, t in enumerate(panel.targets):
        target = {
            "datasource": DS,
            "expr": t.expr,
            "legendFormat": t.legend or "__auto",
            "refId": chr(ord("A") + i),
            "range": not t.instant,
            "instant": t.instant,
        }
        if t.instant:
            target["format"] = "table"
        targets.append(target)
    out = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": targets,
    }
    if panel.description:
        out["description"] = panel.description
    if panel.kind == "table":
        out["transformations"] = [
            {"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}
        ]
    return out


def dashboard_json(meta: dict, rows: list[Row]) -> dict:
    panels, pid, y = [], 1, 0
    for row in rows:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        pid, y, x, row_h = pid + 1, y + 1, 0, 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y, row_h = 0, y + row_h, 0
            panels.append(panel_json(panel, pid, x, y))
            pid, x, row_h = pid + 1, x + panel.width, max(row_h, panel.height)
        y += row_h
    return {
        "uid": meta["uid"],
        "title": meta["title"],
        "description": meta["description"],
        "tags": ["lmserve", "llm-serving"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,  # shared crosshair
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": meta["variables"]},
        "links": [
            {
                "title": "lmserve dashboards",
                "type": "dashboards",
                "tags": ["lmserve"],
                "asDropdown": True,
            }
        ],
        "panels": panels,
    }


DASHBOARDS = {"cluster-overview": cluster_overview, "model": per_model}


def build(prefix: str = "lmserve") -> dict[str, dict]:
    """{file name: dashboard JSON}"""
    return {
        f"{prefix}-{name}.json": dashboard_json(*make(prefix)) for name, make in DASHBOARDS.items()
    }


def render(dashboard: dict) -> str:
    return json.dumps(dashboard, indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--prefix",
        default="lmserve",
        help="engine metric prefix (lmserve, or vllm for --metrics-prefix vllm)",
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    args = parser.parse_args(argv)
    stale = []
    for name, dashboard in build(args.prefix).items():
        path, text = args.out / name, render(dashboard)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(
            "stale (run deploy/grafana/build_dashboards.py): " + ", ".join(stale), file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
