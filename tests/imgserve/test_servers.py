"""``imgserve serve`` and ``imgserve grpc``: flags onto the gateway's settings, checked
before the server starts. (Starting them for real: ``test_predict.py``.)"""

from __future__ import annotations

import subprocess

import pytest

from imgserve.cli import build_parser
from imgserve.servers import GUNICORN_CONF, settings_environment
from serving.settings import Settings
from tests.helpers.servers import PYTHON, ROOT


def _settings(*argv: str) -> tuple[dict[str, str], Settings]:
    args = build_parser(argv[0]).parse_args(list(argv))
    env = settings_environment(args)
    return env, Settings.from_env(environ=env)


def test_serve_flags_set_the_gateway_settings_of_their_names():
    env, settings = _settings(
        "serve", "--bind", "0.0.0.0:8081", "--workers", "3", "--threads", "16"
    )
    assert env == {
        "IMGSERVE_BIND": "0.0.0.0:8081",
        "IMGSERVE_WORKERS": "3",
        "IMGSERVE_THREADS": "16",
    }
    assert (settings.bind, settings.workers, settings.threads) == ("0.0.0.0:8081", 3, 16)
    _, settings = _settings("serve", "--model-base", "/srv/models", "--backend", "tfserving-grpc")
    assert (settings.model_base, settings.backend) == ("/srv/models", "tfserving-grpc")


def test_grpc_flags_set_the_grpc_settings():
    env, settings = _settings(
        "grpc", "--bind", "127.0.0.1:9100", "--workers", "1", "--metrics-bind", ""
    )
    assert set(env) == {"IMGSERVE_GRPC_BIND", "IMGSERVE_GRPC_WORKERS", "IMGSERVE_GRPC_METRICS_BIND"}
    assert (settings.grpc_bind, settings.grpc_workers, settings.grpc_metrics_bind) == (
        "127.0.0.1:9100",
        1,
        "",
    )


def test_flags_left_out_leave_the_environment_alone():
    assert _settings("serve")[0] == {}
    assert _settings("grpc")[0] == {}


def test_gunicorn_reads_the_packaged_configuration():
    assert GUNICORN_CONF.is_file()
    assert "worker_class" in GUNICORN_CONF.read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--bind", "nowhere"], "bind must be host:port, got 'nowhere'"),
        (["serve", "--workers", "-1"], "IMGSERVE_WORKERS must be >= 0"),
        (["grpc", "--bind", "localhost"], "grpc_bind must be host:port, got 'localhost'"),
    ],
)
def test_a_bad_setting_fails_before_the_server_starts(argv, message):
    done = subprocess.run(
        [PYTHON, "-m", "imgserve", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"imgserve {argv[0]}: error: {message}"
