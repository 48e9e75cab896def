"""TensorFlow's start-up environment: CPU only without an NVIDIA device, native lines as records."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from contract.tf_environment import (
    has_nvidia_device,
    native_stderr_logged,
    prepare_tensorflow_environment,
)
from tests.helpers.log_lines import parse_lines

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_without_an_nvidia_device_only_the_cpu_is_enabled(tmp_path):
    (tmp_path / "nvidiactl").touch()  # the control node alone is no GPU
    env: dict[str, str] = {}
    prepare_tensorflow_environment(env, dev=tmp_path)
    assert env == {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLED_DEVICE_TYPES": "CPU"}


def test_an_nvidia_device_or_the_users_choice_is_left_alone(tmp_path):
    (tmp_path / "nvidia0").touch()
    assert has_nvidia_device(tmp_path)
    env: dict[str, str] = {"TF_CPP_MIN_LOG_LEVEL": "0"}
    prepare_tensorflow_environment(env, dev=tmp_path)
    assert env == {"TF_CPP_MIN_LOG_LEVEL": "0"}
    for choice in ("CUDA_VISIBLE_DEVICES", "TF_ENABLED_DEVICE_TYPES"):
        env = {choice: ""}
        prepare_tensorflow_environment(env, dev=tmp_path / "absent")
        assert env == {choice: "", "TF_CPP_MIN_LOG_LEVEL": "2"}


def test_native_lines_become_json_records_at_their_level_and_other_text_survives(capfd):
    logger = logging.getLogger("tests.native")
    logger.setLevel(logging.DEBUG)
    with native_stderr_logged(logger):
        os.write(
            2,
            b"plain text before any native line\n"
            b"WARNING: All log messages before absl::InitializeLog() is called are written"
            b" to STDERR\n"
            b"I0000 00:00:1796604304.615168   30236 port.cc:153] oneDNN is on.\n"
            b"I0000 00:00:1796604304.660042   30236 cpu_feature_guard.cc:227] Optimised.\n"
            b"To enable the following instructions: AVX2, rebuild.\n"
            b"E0000 00:00:1796604307.908101   30236 cuda_platform.cc:52] a real error\n"
            b'{"a JSON line": "from Python logging meanwhile"}\n',
        )
    err = capfd.readouterr().err.splitlines()
    assert err[0] == "plain text before any native line"
    assert err[-1] == '{"a JSON line": "from Python logging meanwhile"}'
    lines = parse_lines("\n".join(err[1:-1]))
    assert [(x["level"], x["source"], x["message"]) for x in lines] == [
        ("DEBUG", "port.cc:153", "oneDNN is on."),
        (
            "DEBUG",
            "cpu_feature_guard.cc:227",
            "Optimised.\nTo enable the following instructions: AVX2, rebuild.",
        ),
        ("ERROR", "cuda_platform.cc:52", "a real error"),
    ]
    assert {(x["logger"], x["process"]) for x in lines} == {("tests.native", os.getpid())}


def test_a_fatal_error_inside_the_block_is_still_reported():
    code = (
        "import logging, os\n"
        "from contract.tf_environment import native_stderr_logged\n"
        "with native_stderr_logged(logging.getLogger('tf')):\n"
        "    os.write(2, b'F0000 00:00:1.5   7 cpu_feature_guard.cc:1] needs AVX\\n')\n"
        "    os.abort()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    (line,) = parse_lines(done.stderr)
    assert (line["level"], line["message"]) == ("CRITICAL", "needs AVX")


@pytest.mark.slow
def test_the_grpc_server_module_imports_tensorflow_with_json_lines_only_and_no_cuinit():
    """The real import on this machine: no ``cuInit`` error, and every stderr line is JSON."""
    code = (
        "from contract.logs import configure_logging\n"
        "configure_logging('debug')\n"
        "import serving.api.grpc.server\n"
        "import tensorflow as tf\n"
        "import os\n"
        "print(len(tf.config.list_physical_devices()), os.environ.get('TF_ENABLED_DEVICE_TYPES'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLED_DEVICE_TYPES",)}
    env["PYTHONPATH"] = ROOT
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cuInit" not in done.stderr
    parse_lines(done.stderr)  # every line JSON
    if not has_nvidia_device() and "CUDA_VISIBLE_DEVICES" not in env:
        assert done.stdout.split() == ["1", "CPU"]  # the CPU alone, no GPU factory tried
