"""Fixtures of the deployment checks: the rendered kustomize overlays, built once per session."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.tools import REPO_ROOT, kustomize_build

K8S = REPO_ROOT / "k8s"
OVERLAYS = ("dev", "prod")


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every kustomization's output: ``dev``, ``prod``, and the one-off ``calibrate-once`` Job."""
    out = {name: kustomize_build(K8S / "overlays" / name) for name in OVERLAYS}
    out["calibrate-once"] = kustomize_build(K8S / "jobs" / "calibrate-once")
    return out


@pytest.fixture(params=OVERLAYS)
def overlay(request, rendered) -> tuple[str, list[dict[str, Any]]]:
    """One overlay's name and resources (tests using it run for dev and prod)."""
    return request.param, rendered[request.param]
