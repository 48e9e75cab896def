"""The monitoring assets (alert rules, Grafana dashboard) as data, for the tests that check them."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from tests.deploy.tools import REPO_ROOT

MONITORING = REPO_ROOT / "monitoring"
RULES = MONITORING / "alerts.yml"
RULE_TESTS = MONITORING / "alerts_test.yml"
DASHBOARD = MONITORING / "dashboards" / "imgserve.json"


def rules() -> list[dict[str, Any]]:
    """Every rule (alerting and recording) of ``monitoring/alerts.yml``."""
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard JSON."""
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and annotation of the dashboard."""
    queries = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r}", target["expr"]))
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            queries.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    return queries


def as_plain_promql(expr: str) -> str:
    """A Grafana query with its template variables replaced, so Prometheus tools accept it."""
    expr = (
        expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
    )
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)
