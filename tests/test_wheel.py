"""The installable product: the wheel carries what the gateway needs, and serves from an install.

Builds the wheel from a copy of the checkout (a stale ``build/`` would hide missing
package data), installs it with ``pip install --target`` (the heavy dependencies are
already in this virtualenv; a fresh one would download TensorFlow), then runs gunicorn
from a directory outside the checkout with only the installed copy first on the path.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import textwrap
import zipfile
from pathlib import Path

import pytest
import requests

from tests.helpers import tiny_models
from tests.helpers.servers import GUNICORN, PYTHON, ROOT, free_port, stop, wait_ready

pytestmark = pytest.mark.slow

#: Files the gateway reads at run time that are not Python modules.
DATA_FILES = (
    "serving/api/rest/openapi.yaml",
    "serving/api/rest/static/index.html",
    "serving/api/rest/static/page.css",
    "serving/api/rest/static/page.js",
    "serving/proto/imgserve.proto",
    "serving/proto/grpc_predict_v2.proto",
)

# Build outputs and local state that must not leak into the copy the wheel is built from.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".venv-clients",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".bench",
    "models",
)

# The gateway as gunicorn loads it, plus one route that says where ``serving`` came from:
# the editable install of the checkout is also on the path, and must not be what answers.
_ORIGIN_APP = textwrap.dedent(
    """
    import serving
    from serving.api.rest import ops
    from serving.app import create_app

    app = create_app()

    @app.get("/_test/origin")
    def origin():
        return {"serving": serving.__file__, "openapi": str(ops.OPENAPI_PATH)}
    """
)


def _run(cmd: list[str], cwd: Path, timeout: float) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built offline with the setuptools of this virtualenv."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    dist = tmp / "dist"
    build = [PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist)]
    _run([*build, "--no-index", "."], cwd=src, timeout=300)
    (built,) = dist.glob("imgserve-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory) -> Path:
    """The wheel installed into its own directory, as ``pip install`` lays it out."""
    target = tmp_path_factory.mktemp("installed") / "site"
    _run(
        [
            PYTHON,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(wheel),
        ],
        cwd=wheel.parent,
        timeout=300,
    )
    return target


def test_wheel_carries_the_data_files_and_the_license(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(zf.read(metadata))
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = zf.read(entry_points).decode()
    assert "imgserve = imgserve.cli:main" in scripts
    assert "imgserve-train = training.cli:console_main" in scripts
    missing = [f for f in DATA_FILES if f not in names]
    assert not missing, f"wheel lacks {missing}"
    assert meta["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in meta.get_all("License-File", [])
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_installed_command_line_runs(site: Path, tmp_path: Path):
    # The console script pip wrote, run outside the checkout with only the install on the path.
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSERVE_")}
    env["PYTHONPATH"] = str(site)
    for name, argv, shown in (
        ("imgserve", ["--help"], "classify"),
        ("imgserve", ["classify", "--help"], "--grpc"),
        ("imgserve-train", ["--help"], "classifier"),
    ):
        done = subprocess.run(
            [str(site / "bin" / name), *argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"usage: {' '.join([name, *argv[:-1]])} ")
        assert shown in done.stdout


def test_installed_gateway_serves_openapi_and_classify(site: Path, tmp_path: Path, images):
    base = tmp_path / "models"
    tiny_models.export_classifier(base)
    # Outside the checkout: gunicorn puts its working directory on sys.path first.
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "origin_app.py").write_text(_ORIGIN_APP)
    port = free_port()
    log = tmp_path / "gunicorn.log"
    env = {
        "PYTHONPATH": str(site),
        "IMGSERVE_MODEL_BASE": str(base),
        "IMGSERVE_BIND": f"127.0.0.1:{port}",
        "IMGSERVE_WORKERS": "1",
    }
    conf = site / "serving" / "gunicorn.conf.py"
    # As tests.helpers.servers.start, but in ``workdir`` and with only the install on PYTHONPATH.
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSERVE_")}
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    full_env.update(env)
    proc = subprocess.Popen(
        [GUNICORN, "-c", str(conf), "origin_app:app"],
        cwd=workdir,
        env=full_env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/readyz", proc, log, timeout=180)
        origin = requests.get(url + "/_test/origin", timeout=10).json()
        assert Path(origin["serving"]).resolve().is_relative_to(site.resolve()), origin
        assert Path(origin["openapi"]).is_relative_to(site.resolve()), origin

        r = requests.get(url + "/openapi.json", timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["openapi"].startswith("3.")
        r = requests.get(url + "/", timeout=10)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html"), r.text
        assert requests.get(url + "/try-it/page.js", timeout=10).status_code == 200
        r = requests.post(
            url + "/v1/classify",
            data=images["jpeg"],
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["model"]["name"] == tiny_models.CLASSIFIER
        assert r.json()["predictions"][0]["classes"]
    finally:
        stop(proc)
