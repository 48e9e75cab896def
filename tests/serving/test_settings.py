"""Settings: environment parsing, validation, derived sizing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from serving.settings import Settings, SettingsError, split_host_port


def test_defaults_match_the_documented_interface():
    s = Settings.from_env(environ={})
    assert s.model_base == "./models"
    assert s.backend == "embedded"
    assert s.tfserving_grpc == "localhost:8500"
    assert s.tfserving_rest == "http://localhost:8501"
    assert s.bind == "127.0.0.1:8080"
    assert s.grpc_bind == "127.0.0.1:9000"
    assert s.queue_capacity == s.max_batch_size * s.max_enqueued_batches
    assert (s.log_level, s.access_log, s.access_log_probes) == ("info", True, False)


def test_logging_settings_come_from_the_environment():
    s = Settings.from_env(
        environ={
            "IMGSERVE_LOG_LEVEL": "WARNING",
            "IMGSERVE_ACCESS_LOG": "off",
            "IMGSERVE_ACCESS_LOG_PROBES": "1",
        }
    )
    assert (s.log_level, s.access_log, s.access_log_probes) == ("WARNING", False, True)


def test_environment_variables_are_typed():
    env = {
        "IMGSERVE_BACKEND": "tfserving-grpc",
        "IMGSERVE_MAX_BATCH_SIZE": "8",
        "IMGSERVE_REQUEST_TIMEOUT_S": "2.5",
        "IMGSERVE_ADMIN_TOKEN": "secret",
        "UNRELATED": "x",
    }
    s = Settings.from_env(environ=env)
    assert (s.backend, s.max_batch_size, s.request_timeout_s, s.admin_token) == (
        "tfserving-grpc",
        8,
        2.5,
        "secret",
    )
    assert s.batch_threads == 4  # remote backends overlap forward passes
    assert Settings.from_env(environ={}).batch_threads == 1


@pytest.mark.parametrize(
    "env",
    [
        {"IMGSERVE_BACKEND": "triton"},
        {"IMGSERVE_MAX_BATCH_SIZE": "0"},
        {"IMGSERVE_MAX_BATCH_SIZE": "many"},
        {"IMGSERVE_BIND": "8080"},
        {"IMGSERVE_BIND": "0.0.0.0:²"},  # a Unicode digit int() refuses
        {"IMGSERVE_MULTI_FRAME": "all"},
        {"IMGSERVE_LOG_LEVEL": "verbose"},
        {"IMGSERVE_ACCESS_LOG": "sometimes"},
        {"IMGSERVE_REQUEST_TIMEOUT_S": "-1"},
        {"IMGSERVE_AUTO_CALIBRATE_AFTER_S": "60"},  # without a capture directory
        {
            "IMGSERVE_AUTO_CALIBRATE_AFTER_S": "60",
            "IMGSERVE_CAPTURE_DIR": "/x",
            "IMGSERVE_AUTO_CALIBRATE_PROMOTE": "prod",
        },
    ],
)
def test_invalid_values_fail_at_start(env):
    with pytest.raises(SettingsError):
        Settings.from_env(environ=env)


def test_every_field_is_documented_in_the_source():
    import inspect

    import serving.settings as module

    source = inspect.getsource(module.Settings)
    for f in dataclasses.fields(Settings):
        # The attribute docstring follows the field line.
        block = source.split(f"    {f.name}:", 1)[1].split("\n", 2)
        assert block[1].strip().startswith('"""'), f"{f.name} has no docstring"


def test_mapping_overrides_and_unknown_keys():
    s = Settings.from_mapping({"IMGSERVE_MAX_BATCH_SIZE": 4, "threads": 2})
    assert (s.max_batch_size, s.threads) == (4, 2)
    with pytest.raises(SettingsError):
        Settings.from_mapping({"max_batch": 4})


def test_tensorflow_threads_share_the_cores_between_workers():
    s = Settings.from_env(environ={}, workers=2)
    assert s.intra_op_threads(cpus=8) == 3  # a core's worth left for request threads
    assert Settings.from_env(environ={}).intra_op_threads(cpus=2) == 1
    # Embedded: a worker per core, each with a one-thread pool.
    assert Settings.from_env(environ={}).worker_count(cpus=8) == 8
    assert Settings.from_env(environ={}).intra_op_threads(cpus=8) == 1
    assert Settings.from_env(environ={}, workers=1).intra_op_threads(cpus=8) == 7
    assert Settings.from_env(environ={}, backend="tfserving-rest").worker_count(cpus=2) == 4


def test_grpc_workers_default_to_the_http_gateways_sizing():
    s = Settings.from_env(environ={})
    assert s.grpc_workers == 0
    assert s.grpc_worker_count(cpus=8) == s.worker_count(cpus=8) == 8
    assert Settings.from_env(environ={}, backend="tfserving-rest").grpc_worker_count(cpus=2) == 4
    assert Settings.from_env(environ={"IMGSERVE_WORKERS": "3"}).grpc_worker_count(cpus=8) == 3
    explicit = Settings.from_env(environ={"IMGSERVE_GRPC_WORKERS": "2", "IMGSERVE_WORKERS": "8"})
    assert explicit.grpc_worker_count(cpus=8) == 2
    # Each gRPC process sizes its TensorFlow pool as one of the gRPC processes.
    process = explicit.grpc_process_settings(cpus=8)
    assert (process.workers, process.intra_op_threads(cpus=8)) == (2, 3)
    single = Settings.from_env(environ={}, grpc_workers=1).grpc_process_settings(cpus=8)
    assert single.intra_op_threads(cpus=8) == 7  # the only process: the whole machine
    with pytest.raises(SettingsError):
        Settings.from_env(environ={"IMGSERVE_GRPC_WORKERS": "-1"})
    with pytest.raises(SettingsError):
        Settings.from_env(environ={"IMGSERVE_GRPC_WORKERS": "two"})


def test_split_host_port():
    assert split_host_port("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert split_host_port("[::1]:80") == ("::1", 80)
    with pytest.raises(SettingsError):
        split_host_port("localhost")


def test_operations_doc_carries_the_generated_settings_reference():
    """docs/operations.md's table is what ``make docs`` generates from the class today."""
    from serving import settings_reference

    doc = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
    text = doc.read_text()
    assert text == settings_reference.render_into(text), "run `make docs`"
    for f in dataclasses.fields(Settings):
        assert f"`IMGSERVE_{f.name.upper()}`" in text
    assert "has no docstring" not in text
    # Every row has a meaning: a field whose docstring the generator missed shows up empty.
    rows = settings_reference.markdown().splitlines()[2:]
    assert len(rows) == len(dataclasses.fields(Settings))
    assert all(not r.endswith("|  |") for r in rows)
