"""Metric names in PromQL expressions, and the metric names the project's queries may use.

``metric_names(expr)`` finds the metric names an expression selects (not functions,
aggregations, keywords, label names or values, durations or numbers). The tests use
it to check that every query of the alert rules and the Grafana dashboard names a
metric that something actually exports.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)(?:ms|s|m|h|d|w|y|\d)*)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<open>[({\[])
  | (?P<close>[)}\]])
  | (?P<other>\S)
    """,
    re.VERBOSE,
)

#: Words that are not metric names where they stand before something other than "(".
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "atan2", "start", "end",
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
#: Keywords followed by a parenthesised list of label names.
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}


class PromQLError(ValueError):
    """An expression whose brackets do not balance."""


def metric_names(expr: str) -> set[str]:
    """The metric names selected in the PromQL expression ``expr``."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    names: set[str] = set()
    depth_braces = 0
    depth_square = 0
    skip_list_depth: int | None = None
    paren_depth = 0
    for i, (kind, text) in enumerate(tokens):
        if kind == "open":
            if text == "{":
                depth_braces += 1
            elif text == "[":
                depth_square += 1
            elif text == "(":
                paren_depth += 1
            continue
        if kind == "close":
            if text == "}":
                depth_braces -= 1
            elif text == "]":
                depth_square -= 1
            elif text == ")":
                if skip_list_depth == paren_depth:
                    skip_list_depth = None
                paren_depth -= 1
            if min(depth_braces, depth_square, paren_depth) < 0:
                raise PromQLError(f"unbalanced brackets in {expr!r}")
            continue
        if kind != "ident" or depth_braces or depth_square or skip_list_depth is not None:
            continue  # label matchers, ranges and label lists hold no metric names
        if i and tokens[i - 1][1] == "$":
            continue  # a dashboard template variable
        nxt = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if text in _LABEL_LISTS:
            if nxt[1] == "(":
                skip_list_depth = paren_depth + 1
            continue
        if nxt[1] == "(" or text in _KEYWORDS:
            continue  # a function call or an aggregation keyword
        names.add(text)
    if depth_braces or depth_square or paren_depth:
        raise PromQLError(f"unbalanced brackets in {expr!r}")
    return names


#: Histograms: a query may use ``<name>_bucket``, ``_sum`` and ``_count``.
HISTOGRAMS = {
    "imgserve_request_duration_seconds",
    "imgserve_stage_duration_seconds",
    "imgserve_batch_size",
    "imgserve_prediction_confidence",
}

#: Gateway metrics promised by the drift monitoring and calibration designs (issues
#: "drift monitoring" and "online calibration path"), checked against a real scrape
#: once the gateway exports them.
PLANNED_GATEWAY_METRICS = {
    "imgserve_drift_score",
    "imgserve_drift_threshold",
    "imgserve_drift_window_images",
    "imgserve_input_pixel_mean",
    "imgserve_predictions_total",
    "imgserve_prediction_confidence",
    "imgserve_calibration_runs_total",
    "imgserve_model_temperature",
    "imgserve_capture_samples_total",
}

#: Series that come from elsewhere: Prometheus itself, kube-state-metrics, TF Serving.
EXTERNAL_METRICS = {
    "up",
    "ALERTS",
    "kube_job_status_failed",
    "kube_job_status_succeeded",
    ":tensorflow:serving:request_count",
    ":tensorflow:serving:request_latency_bucket",
}


def base_name(name: str) -> str:
    """``x_bucket`` / ``x_sum`` / ``x_count`` of a known histogram -> ``x``; others unchanged."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    return name
