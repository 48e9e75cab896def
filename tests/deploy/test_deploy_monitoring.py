"""Alert rules and the Grafana dashboard: promtool checks, unit tests, and the metrics they use."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from tests.deploy import promql
from tests.deploy.tools import REPO_ROOT, find_tool, run_tool

MONITORING = REPO_ROOT / "monitoring"
RULES = MONITORING / "alerts.yml"
RULE_TESTS = MONITORING / "alerts_test.yml"
DASHBOARD = MONITORING / "dashboards" / "imgserve.json"


def _rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


def _dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and annotation of the dashboard."""
    queries = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r}", target["expr"]))
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            queries.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    return queries


def _as_plain_promql(expr: str) -> str:
    """A Grafana query with its template variables replaced, so Prometheus tools accept it."""
    expr = (
        expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
    )
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


# -- rules ------------------------------------------------------------------------------


def test_promtool_check_rules():
    result = run_tool([find_tool("promtool"), "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_promtool_rule_unit_tests_pass():
    result = run_tool([find_tool("promtool"), "test", "rules", str(RULE_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_unit_tests_catch_a_broken_rule(tmp_path):
    """The unit tests have teeth: loosening one threshold makes them fail."""
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    text = RULES.read_text()
    assert "> 0.05" in text
    (tmp_path / RULES.name).write_text(text.replace("> 0.05", "> 0.5"))
    result = run_tool([find_tool("promtool"), "test", "rules", str(tmp_path / RULE_TESTS.name)])
    assert result.returncode != 0
    assert "ImgserveHighErrorRatio" in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet():
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert alerts == fires, f"alerts never seen firing: {alerts - fires}"
    assert alerts == quiet, f"alerts never checked quiet: {alerts - quiet}"


def test_alerts_are_actionable():
    for rule in _rules():
        assert re.fullmatch(r"Imgserve[A-Z]\w+", rule["alert"]), rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# -- dashboard ----------------------------------------------------------------------------


def test_dashboard_structure():
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & area, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            assert all(t["expr"].strip() and t["refId"] for t in panel["targets"]), panel["title"]


def test_dashboard_covers_what_operators_need():
    titles = " | ".join(p["title"].lower() for p in _panels(_dashboard()))
    for topic in (
        "requests per second",
        "status code",
        "latency percentiles",
        "batch size",
        "drift",
        "pixel",
        "class mix",
        "versions in service",
        "calibration",
        "tf serving",
    ):
        assert topic in titles, f"no panel about {topic}"


def test_every_dashboard_query_parses(tmp_path):
    """promtool parses each query (as a recording rule), template variables filled in."""
    queries = _dashboard_queries(_dashboard())
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": _as_plain_promql(expr)}
                    for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run_tool([find_tool("promtool"), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_query_parsing_check_rejects_bad_promql(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "g", "rules": [{"record": "r", "expr": "sum by (model (x)"}]}]}
        )
    )
    assert run_tool([find_tool("promtool"), "check", "rules", str(path)]).returncode != 0


# -- metric names -------------------------------------------------------------------------


def _gateway_exported_names() -> set[str]:
    """Names the gateway's metrics module really exposes (exposition names)."""
    from serving.metrics import GatewayMetrics

    names = set()
    for family in GatewayMetrics().registry.collect():
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def test_metric_name_extraction():
    assert promql.metric_names(
        'histogram_quantile(0.99, sum by (model, le) (rate(a_bucket{code=~"5.."}[5m]))) > 0.5 '
        "unless on (model) b offset 10m and topk(3, c) or absent(up)"
    ) == {"a_bucket", "b", "c", "up"}
    assert promql.metric_names("sum without (pid) (x) / on () group_left (y) z") == {"x", "z"}
    assert promql.metric_names('rate(a_total{m=~"$model"}[$__rate_interval]) * 1e6') == {"a_total"}


def test_rules_and_dashboard_use_only_known_metrics():
    exported = _gateway_exported_names()
    # The metrics module is the gateway's documented surface (serving/metrics.py).
    assert {
        "imgserve_requests_total",
        "imgserve_inflight_requests",
        "imgserve_model_version_info",
    } <= exported
    known = exported | promql.PLANNED_GATEWAY_METRICS | promql.EXTERNAL_METRICS
    used: dict[str, str] = {}
    for rule in _rules():
        for name in promql.metric_names(rule["expr"]):
            used.setdefault(name, f"rule {rule['alert']}")
    for where, expr in _dashboard_queries(_dashboard()):
        for name in promql.metric_names(expr):
            used.setdefault(name, where)
    unknown = {name: where for name, where in used.items() if promql.base_name(name) not in known}
    assert not unknown, f"metrics nothing exports: {unknown}"
    # Histogram suffixes only on histograms, _total only on counters.
    for name in used:
        if name.endswith("_bucket") and name.startswith("imgserve_"):
            assert promql.base_name(name) in promql.HISTOGRAMS, name
    # Every gateway metric the design names appears somewhere on the dashboard.
    dashboard_names = {
        promql.base_name(n)
        for _, e in _dashboard_queries(_dashboard())
        for n in promql.metric_names(e)
    }
    for name in (exported - {"imgserve_model_version_info"}) | promql.PLANNED_GATEWAY_METRICS:
        assert promql.base_name(name) in dashboard_names or name in dashboard_names, name


def test_dashboard_file_is_the_configmap_source():
    # The ConfigMap is generated from this file; keep it plain, stable JSON.
    text = DASHBOARD.read_text()
    assert text.endswith("\n")
    assert json.loads(text) == _dashboard()
    assert Path(REPO_ROOT / "k8s/base/generated/imgserve-dashboard.json").read_text() == text
