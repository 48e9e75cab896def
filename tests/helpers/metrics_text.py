"""Prometheus text exposition in tests: parse a scrape, sum samples, run promtool on it."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families


def parse(text: str) -> dict[str, list]:
    """Metric family name -> samples."""
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(families: dict, sample_name: str, **labels) -> float:
    """Sum of the samples called ``sample_name`` whose labels include ``labels``."""
    family = sample_name
    for suffix in ("_total", "_count", "_sum", "_bucket"):
        if sample_name.endswith(suffix):
            family = sample_name[: -len(suffix)]
    samples = [s for name in {family, sample_name} for s in families.get(name, [])]
    return sum(
        s.value
        for s in samples
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def promtool_check(text: str) -> None:
    """``promtool check metrics`` on a scrape; it must report nothing."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI (Debian package 'prometheus')")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )
