"""Alert rules and the Grafana dashboard: promtool checks, unit tests, and the metrics they use."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from tests.deploy import promql
from tests.deploy.tools import REPO_ROOT, find_tool, run_tool
from tests.helpers import dashboards
from tests.helpers.dashboards import DASHBOARD, RULE_TESTS, RULES

# -- rules ------------------------------------------------------------------------------


def test_promtool_checkrules():
    result = run_tool([find_tool("promtool"), "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(dashboards.rules())} rules found" in result.stdout


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
    alerts = {r["alert"] for r in dashboards.rules() if "alert" in r}
    assert alerts == fires, f"alerts never seen firing: {alerts - fires}"
    assert alerts == quiet, f"alerts never checked quiet: {alerts - quiet}"


def test_alerts_are_actionable():
    for rule in dashboards.rules():
        assert re.fullmatch(r"Imgserve[A-Z]\w+", rule["alert"]), rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# -- dashboard ----------------------------------------------------------------------------


def test_dashboard_structure():
    dashboard = dashboards.dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboards.panels(dashboard)
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
    titles = " | ".join(p["title"].lower() for p in dashboards.panels(dashboards.dashboard()))
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
    queries = dashboards.dashboard_queries(dashboards.dashboard())
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": dashboards.as_plain_promql(expr)}
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
    for rule in dashboards.rules():
        for name in promql.metric_names(rule["expr"]):
            used.setdefault(name, f"rule {rule['alert']}")
    for where, expr in dashboards.dashboard_queries(dashboards.dashboard()):
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
        for _, e in dashboards.dashboard_queries(dashboards.dashboard())
        for n in promql.metric_names(e)
    }
    for name in (exported - {"imgserve_model_version_info"}) | promql.PLANNED_GATEWAY_METRICS:
        assert promql.base_name(name) in dashboard_names or name in dashboard_names, name


def test_dashboard_file_is_the_configmap_source():
    # The ConfigMap is generated from this file; keep it plain, stable JSON.
    text = DASHBOARD.read_text()
    assert text.endswith("\n")
    assert json.loads(text) == dashboards.dashboard()
    assert Path(REPO_ROOT / "k8s/base/generated/imgserve-dashboard.json").read_text() == text
