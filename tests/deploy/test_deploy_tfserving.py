"""TF Serving's side: its configuration files parse as its protos; its probe and seed scripts work.

The readiness script runs for real (bash, /dev/tcp) against a loopback HTTP server
that answers like TF Serving's model-status API (``GET /v1/models/<name>``), in the
states the server goes through: not listening, LOADING, AVAILABLE, unknown model.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from google.protobuf import text_format

from tests.deploy import k8s_model as km
from tests.deploy.tfserving_protos import BatchingParameters, ModelServerConfig, MonitoringConfig
from tests.deploy.tools import REPO_ROOT, find_tool

MODELS = REPO_ROOT / "models"
READY_SCRIPT = REPO_ROOT / "k8s" / "base" / "tfserving-ready.sh"


# -- configuration files -------------------------------------------------------------------------


def test_models_config_parses_as_model_server_config():
    config = text_format.Parse((MODELS / "models.config").read_text(), ModelServerConfig())
    entries = list(config.model_config_list.config)
    assert entries, "models.config lists no model"
    assert len({e.name for e in entries}) == len(entries)
    for entry in entries:
        assert entry.base_path == f"/models/{entry.name}"  # where TF Serving's volume is mounted
        assert entry.model_platform == "tensorflow"
        served = set(entry.model_version_policy.specific.versions)
        # TF Serving assigns a label only to a version it loads.
        for label, version in entry.version_labels.items():
            assert not served or version in served, (
                f"{entry.name}: label {label} -> unserved {version}"
            )


def test_monitoring_config_parses_and_enables_prometheus():
    config = text_format.Parse((MODELS / "monitoring.config").read_text(), MonitoringConfig())
    assert config.prometheus_config.enable
    assert config.prometheus_config.path == "/monitoring/prometheus/metrics"


def test_batching_config_parses_and_matches_the_gateway():
    from serving.settings import Settings

    params = text_format.Parse((MODELS / "batching.config").read_text(), BatchingParameters())
    assert params.HasField("max_batch_size") and params.max_batch_size.value >= 1
    assert params.batch_timeout_micros.value >= 0
    assert params.num_batch_threads.value >= 1
    # The gateway batches up to the same size, so its batches are never split.
    assert params.max_batch_size.value == Settings().max_batch_size
    if params.allowed_batch_sizes:
        assert params.allowed_batch_sizes[-1] == params.max_batch_size.value


def test_batching_schema_rejects_what_tf_serving_rejects():
    with pytest.raises(text_format.ParseError):
        text_format.Parse("max_batch_size: 32", BatchingParameters())  # wrapper, needs { value: }
    with pytest.raises(text_format.ParseError):
        text_format.Parse("max_batchsize { value: 32 }", BatchingParameters())
    with pytest.raises(text_format.ParseError):
        text_format.Parse("prometheus_config { enabled: true }", MonitoringConfig())


# -- the readiness probe script --------------------------------------------------------------


class _ModelStatus(BaseHTTPRequestHandler):
    """``GET /v1/models/<name>`` with the body TF Serving returns; states set by the test."""

    states: dict[str, list[str]] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        name = self.path.removeprefix("/v1/models/")
        if name not in self.states:
            body = json.dumps({"error": f"Servable not found for request: Latest({name})"})
            self.send_response(404)
        else:
            body = json.dumps(
                {
                    "model_version_status": [
                        {
                            "version": str(i + 1),
                            "state": s,
                            "status": {"error_code": "OK", "error_message": ""},
                        }
                        for i, s in enumerate(self.states[name])
                    ]
                },
                indent=1,
            )
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def status_server() -> Iterator[tuple[int, type[_ModelStatus]]]:
    handler = type("Handler", (_ModelStatus,), {"states": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _ready(config: Path, port: int) -> subprocess.CompletedProcess:
    env = {"TFS_MODEL_CONFIG": str(config), "TFS_REST_PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [find_tool("bash"), str(READY_SCRIPT)], env=env, capture_output=True, text=True, timeout=30
    )


@pytest.fixture
def two_models(tmp_path) -> Path:
    config = ModelServerConfig()
    for name in ("demo_classifier", "demo_detector"):
        entry = config.model_config_list.config.add(name=name, base_path=f"/models/{name}")
        entry.model_platform = "tensorflow"
        entry.version_labels["stable"] = 1
    path = tmp_path / "models.config"
    path.write_text(text_format.MessageToString(config))
    return path


def test_ready_script_is_valid_bash():
    assert subprocess.run([find_tool("bash"), "-n", str(READY_SCRIPT)], timeout=10).returncode == 0


def test_ready_when_every_model_has_an_available_version(status_server, two_models):
    port, handler = status_server
    handler.states.update({"demo_classifier": ["AVAILABLE"], "demo_detector": ["END", "AVAILABLE"]})
    result = _ready(two_models, port)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo_classifier" in result.stdout and "demo_detector" in result.stdout


def test_not_ready_while_a_model_is_loading(status_server, two_models):
    port, handler = status_server
    handler.states.update({"demo_classifier": ["AVAILABLE"], "demo_detector": ["LOADING"]})
    result = _ready(two_models, port)
    assert result.returncode == 1
    assert "demo_detector has no AVAILABLE version" in result.stdout


def test_not_ready_for_an_unknown_model(status_server, two_models):
    port, handler = status_server
    handler.states.update({"demo_classifier": ["AVAILABLE"]})
    result = _ready(two_models, port)
    assert result.returncode == 1 and "404" in result.stdout


def test_not_ready_when_the_server_does_not_listen(status_server, two_models):
    port, handler = status_server
    handler.states.update({"demo_classifier": ["AVAILABLE"], "demo_detector": ["AVAILABLE"]})
    assert _ready(two_models, port).returncode == 0
    # A port nothing listens on (the server's, after it is closed).
    closed = ThreadingHTTPServer(("127.0.0.1", 0), _ModelStatus)
    dead_port = closed.server_address[1]
    closed.server_close()
    result = _ready(two_models, dead_port)
    assert result.returncode == 1 and "does not answer" in result.stdout


def test_not_ready_without_models_config(status_server, tmp_path):
    port, _ = status_server
    assert _ready(tmp_path / "missing.config", port).returncode == 1
    empty = tmp_path / "empty.config"
    empty.write_text("model_config_list {}\n")
    result = _ready(empty, port)
    assert result.returncode == 1 and "no model" in result.stdout


def test_ready_script_reads_the_real_models_config(status_server):
    port, handler = status_server
    config = text_format.Parse((MODELS / "models.config").read_text(), ModelServerConfig())
    handler.states.update({e.name: ["AVAILABLE"] for e in config.model_config_list.config})
    result = _ready(MODELS / "models.config", port)
    assert result.returncode == 0, result.stdout


# -- the models.config seed init container -----------------------------------------------------


def _seed_script(rendered) -> str:
    spec = km.pod_spec(km.find(rendered["prod"], "Deployment", "imgserve-tfserving"))
    return km.container(spec, "seed-models-config")["args"][0]


def _run_seed(script: str, models: Path, seed_dir: Path) -> subprocess.CompletedProcess:
    # Same script, absolute paths moved into the test's directories.
    script = script.replace("/etc/tfserving/config", str(seed_dir))
    script = re.sub(r"(?<=[\s\"'`])/models(?=/)", str(models), script)
    assert "/models/" not in script.replace(str(models), "")
    return subprocess.run(
        [find_tool("sh"), "-c", script], capture_output=True, text=True, timeout=30
    )


def test_seed_copies_models_config_onto_an_empty_volume(rendered, tmp_path):
    models, seed_dir = tmp_path / "volume", tmp_path / "seed"
    models.mkdir()
    seed_dir.mkdir()
    (seed_dir / "models.config").write_text((MODELS / "models.config").read_text())
    result = _run_seed(_seed_script(rendered), models, seed_dir)
    assert result.returncode == 0, result.stderr
    assert (models / "models.config").read_text() == (MODELS / "models.config").read_text()
    assert [p.name for p in models.iterdir()] == ["models.config"]  # no temporary left


def test_seed_never_overwrites_the_live_models_config(rendered, tmp_path):
    models, seed_dir = tmp_path / "volume", tmp_path / "seed"
    models.mkdir()
    seed_dir.mkdir()
    (seed_dir / "models.config").write_text("model_config_list {}\n")
    live = '# moved by a calibration\nmodel_config_list { config { name: "x" } }\n'
    (models / "models.config").write_text(live)
    result = _run_seed(_seed_script(rendered), models, seed_dir)
    assert result.returncode == 0, result.stderr
    assert (models / "models.config").read_text() == live
