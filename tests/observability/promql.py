"""Helpers for the observability tests: the shipped files, a real `prometheus` subprocess, and
the PromQL expressions of the Grafana dashboards (with their variables substituted)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD_DIR = GRAFANA_DIR / "dashboards"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
RECORDING_RULES = PROMETHEUS_DIR / "rules" / "lmserve.rules.yml"
ALERT_RULES = PROMETHEUS_DIR / "rules" / "lmserve.alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "tests" / "lmserve.alerts.test.yml"
ENGINE_JOB = "lmserve-engine"
ROUTER_JOB = "lmserve-router"


def require_binary(name: str, package: str = "prometheus") -> str:
    """The binary's path; the test is skipped where the Debian package is absent (CI installs
    it)."""
    import pytest

    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not on PATH: apt-get install {package} (CI installs it)")
    return path


# --------------------------------------------------------------------------------------------
# Dashboards


@dataclass(frozen=True)
class DashboardQuery:
    where: str  # "<dashboard file> / <panel title> / <refId>" or ".../variable <name>"
    expr: str  # as written in the dashboard, with Grafana variables


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARD_DIR.glob("*.json"))


def dashboard_queries(path: Path) -> list[DashboardQuery]:
    """Every panel target's expression, and every query variable's metric selector (Grafana's
    `label_values(<selector>, <label>)` becomes `<selector>`)."""
    board = json.loads(path.read_text())
    out = []
    for panel in _panels(board["panels"]):
        for target in panel.get("targets", []):
            where = f"{path.name} / {panel['title']} / {target['refId']}"
            out.append(DashboardQuery(where, target["expr"]))
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip())
        assert m, f"{path.name}: variable {var['name']}: not label_values(...): {query}"
        out.append(DashboardQuery(f"{path.name} / variable {var['name']}", m.group(1)))
    return out


def _panels(panels: list[dict]) -> list[dict]:
    out = []
    for panel in panels:
        out.append(panel)
        out += _panels(panel.get("panels", []))  # collapsed rows hold theirs
    return out


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variables, as Grafana would expand them for one choice each."""
    for name in sorted(variables, key=len, reverse=True):  # $__rate_interval before $__r...
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


# --------------------------------------------------------------------------------------------
# Alert expressions: their operands


_OPERATOR = re.compile(r"==|!=|>=|<=|>|<|\band\b|\bor\b|\bunless\b")
_MODIFIER = re.compile(
    r"^\s*(bool\b\s*)?((on|ignoring)\s*\([^)]*\)\s*)?((group_left|group_right)\s*(\([^)]*\))?)?"
)
_NUMBER = re.compile(r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$")


def operands(expr: str) -> list[str]:
    """The non-literal operands of `expr`'s top-level comparison and set operators
    (`a > 0.95 and b == 0` -> [a, b]); [expr] when it has none."""
    parts, depth, start, i, quote = [], 0, 0, 0, None
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and (m := _OPERATOR.match(expr, i)):
            parts.append(expr[start:i])
            i = start = m.end()
            continue
        i += 1
    parts.append(expr[start:])
    cleaned = [_MODIFIER.sub("", p, count=1).strip() for p in parts]
    return [p for p in cleaned if p and not _NUMBER.match(p)]


# --------------------------------------------------------------------------------------------
# A real Prometheus


class Prometheus:
    """`prometheus` on 127.0.0.1:`port` with `config` (a dict, written as JSON: valid YAML)."""

    def __init__(self, binary: str, workdir: Path, config: dict, port: int) -> None:
        self.workdir = workdir
        self.url = f"http://127.0.0.1:{port}"
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = workdir / "prometheus.log"
        self._http = httpx.Client(base_url=self.url, timeout=10)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],  # fmt: skip
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready(30.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if self._http.get("/-/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"prometheus not ready in {timeout_s} s:\n{self.log()}")

    def api(self, path: str, **params) -> dict:
        resp = self._http.get("/api/v1/" + path, params=params)
        body = resp.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> tuple[list[dict] | None, str | None]:
        """(result vector, None), or (None, the error) for an expression Prometheus rejects."""
        resp = self._http.get("/api/v1/query", params={"query": expr})
        body = resp.json()
        if body["status"] != "success":
            return None, f"{body.get('errorType')}: {body.get('error')}"
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}], None
        return data["result"], None

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def rules(self) -> list[dict]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def stop(self) -> None:
        self._http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def alerts_with_for(text: str, duration: str) -> str:
    """The alert rules' text with every `for:` set to `duration`."""
    out, n = re.subn(r"(?m)^(\s+for:\s*)\S+", rf"\g<1>{duration}", text)
    assert n > 0, "no `for:` in the alert rules"
    return out
