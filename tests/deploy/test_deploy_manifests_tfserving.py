"""The Kubernetes manifests of TF Serving and the model repository: flags that name mounted
files, probes, the models.config seed, GPU scheduling, and ConfigMaps that are exactly the
files in models/ and monitoring/ (the generated copies up to date).
"""

from __future__ import annotations

import sys
from typing import Any

from google.protobuf import text_format

from tests.deploy import k8s_model as km
from tests.deploy import manifests
from tests.deploy.manifests import K8S
from tests.deploy.tfserving_protos import ModelServerConfig, MonitoringConfig
from tests.deploy.tools import REPO_ROOT

TFSERVING_PORTS = {"grpc": 8500, "rest": 8501}


# -- TF Serving -------------------------------------------------------------------------------


def _tfserving(resources):
    deployment = km.find(resources, "Deployment", "imgserve-tfserving")
    spec = km.pod_spec(deployment)
    return deployment, spec, km.container(spec, "tfserving")


def _flags(c: dict[str, Any]) -> dict[str, str]:
    flags = {}
    for arg in c["args"]:
        key, _, value = arg.partition("=")
        flags[key] = value
    return flags


def test_tfserving_flags_name_mounted_files(overlay):
    _, resources = overlay
    _, spec, c = _tfserving(resources)
    assert c["command"] == ["/usr/bin/tensorflow_model_server"]
    flags = _flags(c)
    assert flags["--port"] == "8500" and flags["--rest_api_port"] == "8501"
    assert int(flags["--model_config_file_poll_wait_seconds"]) > 0
    assert int(flags["--file_system_poll_wait_seconds"]) > 0
    assert flags["--enable_batching"] == "true"
    assert flags["--enable_model_warmup"] == "true"
    # A cold start's seeded labels point at versions still loading; moves stay two writes.
    assert flags["--allow_version_labels_for_unavailable_models"] == "true"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == TFSERVING_PORTS
    mounts = km.mounts_by_volume(spec, c)
    # models.config is the live one on the model volume (calibration moves labels in it).
    models_mount = mounts["pvc:imgserve-models"]
    assert models_mount["readOnly"] is True
    assert flags["--model_config_file"] == f"{models_mount['mountPath']}/models.config"
    # monitoring and batching files are keys of the mounted ConfigMap.
    config_mount = next(
        m for k, m in mounts.items() if k.startswith("configMap:imgserve-model-server-config")
    )
    cm_name = next(
        k for k in mounts if k.startswith("configMap:imgserve-model-server-config")
    ).split(":")[1]
    data = manifests.configmap_data(resources, cm_name)
    for flag, key in (
        ("--monitoring_config_file", "monitoring.config"),
        ("--batching_parameters_file", "batching.config"),
    ):
        assert flags[flag] == f"{config_mount['mountPath']}/{key}"
        assert key in data


def test_tfserving_probes(overlay):
    _, resources = overlay
    _, spec, c = _tfserving(resources)
    startup = c["startupProbe"]
    # Loading, warming up and (on GPU) initialising CUDA takes minutes.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    ready_cmd = c["readinessProbe"]["exec"]["command"]
    assert startup["exec"]["command"] == ready_cmd
    assert ready_cmd[0] == "/bin/bash" and ready_cmd[1].endswith("/ready.sh")
    # The script is the ConfigMap's ready.sh, byte for byte tfserving-ready.sh.
    mounts = km.mounts_by_volume(spec, c)
    probe_key = next(k for k in mounts if k.startswith("configMap:imgserve-tfserving-probe"))
    assert ready_cmd[1] == f"{mounts[probe_key]['mountPath']}/ready.sh"
    script = manifests.configmap_data(resources, probe_key.split(":")[1])["ready.sh"]
    assert script == (K8S / "base" / "tfserving-ready.sh").read_text()
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["TFS_MODEL_CONFIG"] == _flags(c)["--model_config_file"]
    assert env["TFS_REST_PORT"] == _flags(c)["--rest_api_port"]
    # Liveness does not depend on a model being loaded.
    assert c["livenessProbe"]["tcpSocket"]["port"] == "rest"


def test_tfserving_seeds_models_config_without_overwriting(overlay):
    _, resources = overlay
    _, spec, _ = _tfserving(resources)
    seed = km.container(spec, "seed-models-config")
    script = seed["args"][0]
    assert "if [ ! -e /models/models.config ]" in script and "ln " in script
    mounts = km.mounts_by_volume(spec, seed)
    assert mounts["pvc:imgserve-models"]["mountPath"] == "/models"
    assert not mounts["pvc:imgserve-models"].get("readOnly")


def test_prod_runs_tfserving_on_a_gpu(rendered):
    _, spec, c = _tfserving(rendered["prod"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert c["image"].startswith("tensorflow/serving:") and c["image"].endswith("-gpu")
    deployment = km.find(rendered["prod"], "Deployment", "imgserve-tfserving")
    assert deployment["spec"]["replicas"] >= 2
    # No spare GPU is needed to roll: one pod at a time is replaced.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_dev_runs_tfserving_on_cpu(rendered):
    _, spec, c = _tfserving(rendered["dev"])
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert "nodeSelector" not in spec and "tolerations" not in spec
    assert c["image"].startswith("tensorflow/serving:") and not c["image"].endswith("-gpu")
    # Same TF Serving release in both.
    _, _, prod = _tfserving(rendered["prod"])
    assert prod["image"] == c["image"] + "-gpu"


# -- the model repository, ConfigMaps from models/ and monitoring/ ------------------------------


def test_model_server_configmap_is_models_dir(overlay):
    _, resources = overlay
    data = manifests.configmap_data(resources, "imgserve-model-server-config")
    assert set(data) == {"models.config", "monitoring.config", "batching.config"}
    for key, content in data.items():
        assert content == (REPO_ROOT / "models" / key).read_text(), (
            f"{key} differs from models/{key}"
        )


def test_seeded_models_config_names_models_at_their_serving_paths(overlay):
    _, resources = overlay
    config = text_format.Parse(
        manifests.configmap_data(resources, "imgserve-model-server-config")["models.config"],
        ModelServerConfig(),
    )
    entries = list(config.model_config_list.config)
    assert entries, "models.config lists no model"
    _, spec, c = _tfserving(resources)
    mount = km.mounts_by_volume(spec, c)["pvc:imgserve-models"]["mountPath"]
    for entry in entries:
        assert entry.base_path == f"{mount}/{entry.name}"


def test_metrics_path_matches_monitoring_config(overlay):
    _, resources = overlay
    monitoring = text_format.Parse(
        manifests.configmap_data(resources, "imgserve-model-server-config")["monitoring.config"],
        MonitoringConfig(),
    )
    monitor = km.find(resources, "ServiceMonitor", "imgserve-tfserving")
    assert monitoring.prometheus_config.enable
    assert [e["path"] for e in monitor["spec"]["endpoints"]] == [monitoring.prometheus_config.path]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["rest"]


def test_model_volume_is_shared_read_only_except_for_the_calibrator(overlay):
    _, resources = overlay
    access = {}
    for workload in km.workloads(resources):
        spec = km.pod_spec(workload)
        for c in spec["containers"]:
            mounts = km.mounts_by_volume(spec, c)
            for claim in ("pvc:imgserve-models", "pvc:imgserve-samples"):
                if claim in mounts:
                    access[(c["name"], claim)] = (
                        mounts[claim]["mountPath"],
                        bool(mounts[claim].get("readOnly")),
                    )
    assert access[("tfserving", "pvc:imgserve-models")] == ("/models", True)
    assert access[("http", "pvc:imgserve-models")] == ("/models", True)
    assert access[("grpc", "pvc:imgserve-models")] == ("/models", True)
    assert access[("calibrate", "pvc:imgserve-models")] == ("/models", False)
    # Captured samples: written by the gateway, read by the calibrator.
    assert access[("http", "pvc:imgserve-samples")] == ("/samples", False)
    assert access[("calibrate", "pvc:imgserve-samples")] == ("/samples", True)
    assert ("tfserving", "pvc:imgserve-samples") not in access


def test_generated_files_are_up_to_date():
    sys.path.insert(0, str(K8S))
    try:
        import generate
    finally:
        sys.path.remove(str(K8S))
    assert generate.stale_files() == [], "run: python k8s/generate.py"


def test_generate_check_detects_a_stale_copy(tmp_path):
    """--check is not vacuous: a source edited without regenerating is reported."""
    sys.path.insert(0, str(K8S))
    try:
        import generate
    finally:
        sys.path.remove(str(K8S))
    root = tmp_path / "repo"
    for source in [*generate.COPIES.values(), generate.RULES_SOURCE]:
        (root / source).parent.mkdir(parents=True, exist_ok=True)
        (root / source).write_bytes((REPO_ROOT / source).read_bytes())
    out = tmp_path / "generated"
    generate.write_files(root, out)
    assert generate.stale_files(root, out) == []
    (root / "models/batching.config").write_text("max_batch_size { value: 8 }\n")
    assert generate.stale_files(root, out) == ["batching.config: differs from its source"]
