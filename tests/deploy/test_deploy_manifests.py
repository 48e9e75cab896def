"""The Kubernetes manifests: they build, validate strictly, and say what the deployment promises.

Every overlay (dev: CPU TF Serving, prod: GPU) is rendered with ``kubectl kustomize``
and validated with kubernetes-validate's strict schemas for a pinned Kubernetes
version; the Prometheus Operator resources (no schema there) are checked field by
field. The rest asserts behaviour: Pod Security "restricted", probes, TF Serving's
flags and files, GPU scheduling, autoscaling, disruption budgets, who may talk to
whom, the shared model volume, calibration and its permissions, and that the
ConfigMaps and the PrometheusRule are exactly the files in models/ and monitoring/.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from google.protobuf import text_format
from kubernetes_validate.utils import SchemaNotFoundError

from tests.deploy import k8s_model as km
from tests.deploy.tfserving_protos import ModelServerConfig, MonitoringConfig
from tests.deploy.tools import KUBERNETES_VERSION, REPO_ROOT, find_tool, run_tool

K8S = REPO_ROOT / "k8s"
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}
TFSERVING_PORTS = {"grpc": 8500, "rest": 8501}


def _validate(resource: dict[str, Any]) -> None:
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def _models_config() -> Any:
    return text_format.Parse((REPO_ROOT / "models/models.config").read_text(), ModelServerConfig())


def _configmap_data(resources: list[dict[str, Any]], name: str) -> dict[str, str]:
    return km.find(resources, "ConfigMap", name)["data"]


def _gateway_env(resources: list[dict[str, Any]], container_name: str) -> dict[str, Any]:
    spec = km.pod_spec(km.find(resources, "Deployment", "imgserve-gateway"))
    c = km.container(spec, container_name)
    env: dict[str, Any] = {}
    for source in c.get("envFrom", []):
        cm = km.find(resources, "ConfigMap", source["configMapRef"]["name"])
        env.update(cm["data"])
    for item in c.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


# -- building and validating ---------------------------------------------------------------


def test_every_kustomization_validates_strictly(rendered):
    for name, resources in rendered.items():
        unvalidated = set()
        for resource in resources:
            try:
                _validate(resource)
            except SchemaNotFoundError:
                unvalidated.add(resource["kind"])
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(
                    f"{name}: {resource['kind']}/{resource['metadata']['name']}: {path}: {exc.message}"
                )
        # Only the Prometheus Operator CRs lack a schema; they are checked below.
        assert unvalidated <= CUSTOM_KINDS, (name, unvalidated)


def test_kubernetes_validate_cli_accepts_every_kustomization(rendered, tmp_path):
    """The command operators and CI run: only the CRs go without a schema."""
    for name, resources in rendered.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(resources))
        result = run_tool(
            [
                find_tool("kubernetes-validate"),
                "--strict",
                "-k",
                KUBERNETES_VERSION,
                "--quiet",
                str(path),
            ]
        )
        assert result.returncode == 0, result.stdout + result.stderr
        for line in result.stdout.splitlines():
            assert line.startswith("WARN") and any(k in line for k in CUSTOM_KINDS), line


def test_strict_validation_rejects_a_misspelt_field(rendered):
    """The validator really is strict: one typo in a pod spec fails it."""
    deployment = copy.deepcopy(km.find(rendered["prod"], "Deployment", "imgserve-gateway"))
    _validate(deployment)
    km.pod_spec(deployment)["securityContext"]["runAsNonRot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)


def test_overlays_render_the_same_workloads(rendered):
    kinds = {
        name: sorted(
            (r["kind"], re.sub(r"-[a-z0-9]{10}$", "", r["metadata"]["name"]))
            for r in res
            if r["kind"] != "Namespace"
        )
        for name, res in rendered.items()
        if name in ("dev", "prod")
    }
    assert kinds["dev"] == kinds["prod"]
    namespaces = {
        r["metadata"].get("namespace") for r in rendered["dev"] if r["kind"] != "Namespace"
    }
    assert namespaces == {"imgserve-dev"}
    assert {
        r["metadata"].get("namespace") for r in rendered["prod"] if r["kind"] != "Namespace"
    } == {"imgserve"}


# -- Pod Security "restricted" --------------------------------------------------------------


def test_namespace_enforces_restricted_pod_security(overlay):
    _, resources = overlay
    ns = km.find(resources, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_pod_meets_restricted_pod_security(rendered):
    checked = 0
    for name, resources in rendered.items():
        for workload in km.workloads(resources):
            where = f"{name}:{workload['kind']}/{workload['metadata']['name']}"
            spec = km.pod_spec(workload)
            pod_sc = spec["securityContext"]
            assert pod_sc["runAsNonRoot"] is True, where
            assert pod_sc["runAsUser"] != 0 and pod_sc["runAsGroup"] != 0, where
            assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", where
            assert spec["automountServiceAccountToken"] is False, where
            for key in ("hostNetwork", "hostPID", "hostIPC"):
                assert not spec.get(key), where
            assert not any("hostPath" in v for v in spec.get("volumes", [])), where
            for c in km.all_containers(spec):
                sc = c["securityContext"]
                cwhere = f"{where}/{c['name']}"
                assert sc["allowPrivilegeEscalation"] is False, cwhere
                assert sc["capabilities"]["drop"] == ["ALL"], cwhere
                assert not sc["capabilities"].get("add"), cwhere
                assert not sc.get("privileged"), cwhere
                assert sc.get("runAsUser", pod_sc["runAsUser"]) != 0, cwhere
                assert sc["readOnlyRootFilesystem"] is True, cwhere
                # With a read-only root, every process needs a writable /tmp volume.
                mounts = km.mounts_by_volume(spec, c)
                if c["name"] != "seed-models-config":
                    assert any(
                        key.startswith("emptyDir:") and m["mountPath"] == "/tmp"
                        for key, m in mounts.items()
                    ), f"{cwhere} has no writable /tmp"
                assert (
                    "cpu" in c["resources"]["requests"] and "memory" in c["resources"]["limits"]
                ), cwhere
                checked += 1
    # gateway (http, proxy, grpc), tfserving (+ seed), calibrator: 6 in dev, 6 in prod, 1 in
    # the Job.
    assert checked == 13


def test_service_accounts_have_no_token(overlay):
    _, resources = overlay
    accounts = km.find_all(resources, "ServiceAccount")
    assert {a["metadata"]["name"] for a in accounts} == {
        "imgserve-gateway",
        "imgserve-tfserving",
        "imgserve-calibrator",
    }
    assert all(a["automountServiceAccountToken"] is False for a in accounts)
    for workload in km.workloads(resources):
        assert km.pod_spec(workload)["serviceAccountName"] in {
            a["metadata"]["name"] for a in accounts
        }


# -- the gateway ------------------------------------------------------------------------------


def test_gateway_probes_and_ports(overlay):
    _, resources = overlay
    spec = km.pod_spec(km.find(resources, "Deployment", "imgserve-gateway"))
    http = km.container(spec, "http")
    assert http["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert http["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert http["startupProbe"]["httpGet"]["path"] == "/healthz"
    # gunicorn behind the proxy sidecar, which holds the pod's http port.
    assert {p["name"]: p["containerPort"] for p in http["ports"]} == {"gunicorn": 8081}
    assert "command" not in http  # the image's entrypoint: gunicorn -c serving/gunicorn.conf.py
    proxy = km.container(spec, "proxy")
    assert {p["name"]: p["containerPort"] for p in proxy["ports"]} == {"http": 8080}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    grpc = km.container(spec, "grpc")
    assert grpc["command"] == ["python", "-m", "serving.api.grpc"]
    assert grpc["readinessProbe"]["grpc"]["port"] == 9000
    assert "tcpSocket" in grpc["livenessProbe"]  # alive even while TF Serving is down
    assert {p["name"]: p["containerPort"] for p in grpc["ports"]} == {
        "grpc": 9000,
        "grpc-metrics": 9001,
    }
    for c in (http, proxy, grpc):
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            port = c[probe].get("httpGet", c[probe].get("tcpSocket", {})).get("port")
            if isinstance(port, str):
                assert port in {p["name"] for p in c["ports"]}, (c["name"], probe)
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
        assert c["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    assert spec["terminationGracePeriodSeconds"] >= 35  # preStop + gunicorn graceful_timeout


def test_gateway_proxy_renders_the_template_in_front_of_gunicorn(overlay):
    """The nginx sidecar: proxy/gateway.conf.template, its variables, gunicorn's address."""
    from serving.settings import Settings, split_host_port

    _, resources = overlay
    spec = km.pod_spec(km.find(resources, "Deployment", "imgserve-gateway"))
    proxy = km.container(spec, "proxy")
    assert proxy["image"].startswith("nginx:")
    data = _configmap_data(resources, proxy_volume(spec, proxy, "/etc/nginx/templates"))
    assert data == {
        "gateway.conf.template": (REPO_ROOT / "proxy/gateway.conf.template").read_text()
    }
    env = {e["name"]: e["value"] for e in proxy["env"]}
    assert env["NGINX_ENVSUBST_FILTER"] == "IMGSERVE_PROXY_"
    http_port = {p["name"]: p["containerPort"] for p in proxy["ports"]}["http"]
    assert env["IMGSERVE_PROXY_LISTEN"] == str(http_port)
    settings = Settings.from_env(
        {k: v for k, v in _gateway_env(resources, "http").items() if isinstance(v, str)}
    )
    assert env["IMGSERVE_PROXY_UPSTREAM"] == f"127.0.0.1:{split_host_port(settings.bind)[1]}"
    # Writable: the rendered conf.d, buffered bodies, the pid file.
    writable = {
        m["mountPath"]
        for k, m in km.mounts_by_volume(spec, proxy).items()
        if k.startswith("emptyDir:")
    }
    assert {"/etc/nginx/conf.d", "/var/cache/nginx", "/var/run", "/tmp"} <= writable


def proxy_volume(spec: dict[str, Any], container: dict[str, Any], path: str) -> str:
    """The ConfigMap mounted at ``path`` in ``container``."""
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == path]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return volume["configMap"]["name"]


def test_gateway_settings_are_real_and_point_at_tfserving(overlay):
    from contract.repository import READY_GRPC_ENV
    from serving.settings import ENV_PREFIX, Settings, split_host_port

    _, resources = overlay
    fields = {f.name for f in dataclasses.fields(Settings)}
    service = km.find(resources, "Service", "imgserve-tfserving")
    service_ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    for name in ("http", "grpc"):
        env = _gateway_env(resources, name)
        settings_env = {
            k: v for k, v in env.items() if k.startswith(ENV_PREFIX) and isinstance(v, str)
        }
        # IMGSERVE_LABEL_READY_GRPC is contract.repository's, read by calibration jobs.
        unknown = {
            k
            for k in settings_env
            if k.removeprefix(ENV_PREFIX).lower() not in fields and k != READY_GRPC_ENV
        }
        assert not unknown, f"settings the gateway does not have: {unknown}"
        settings = Settings.from_env(settings_env)  # validates every value
        assert settings.backend == "tfserving-grpc"
        assert settings.model_base == "/models"
        assert split_host_port(settings.tfserving_grpc) == (
            "imgserve-tfserving",
            service_ports["grpc"],
        )
        assert settings.tfserving_rest == f"http://imgserve-tfserving:{service_ports['rest']}"
        assert split_host_port(settings.bind)[1] == 8081  # behind the proxy on 8080
        assert split_host_port(settings.grpc_bind)[1] == 9000
        assert split_host_port(settings.grpc_metrics_bind)[1] == 9001
        # The default worker counts follow the node's cores, not the pod's: set them.
        assert settings.workers >= 1 and settings.grpc_workers >= 1
        # glibc arenas: 2.9-3.4 GB after image floods, 1.25 GB with 2 (gunicorn.conf.py).
        assert env["MALLOC_ARENA_MAX"] == "2"
        token = env["IMGSERVE_ADMIN_TOKEN"]
        assert token == {"secretKeyRef": {"name": "imgserve-admin", "key": "token"}}
    # gunicorn's workers share one multiprocess directory on an emptyDir; the gRPC
    # process must not read it, or both endpoints would report the same samples.
    spec = km.pod_spec(km.find(resources, "Deployment", "imgserve-gateway"))
    http_env = _gateway_env(resources, "http")
    mounts = km.mounts_by_volume(spec, km.container(spec, "http"))
    assert any(
        k.startswith("emptyDir:") and m["mountPath"] == http_env["PROMETHEUS_MULTIPROC_DIR"]
        for k, m in mounts.items()
    )
    assert _gateway_env(resources, "grpc")["PROMETHEUS_MULTIPROC_DIR"] == ""


def test_gateway_processes_are_two_per_core_of_their_container(overlay):
    """gunicorn's workers and the gRPC server's, each sized like the other for its CPU limit."""
    from serving.settings import Settings

    _, resources = overlay
    spec = km.pod_spec(km.find(resources, "Deployment", "imgserve-gateway"))
    for name, field in (("http", "workers"), ("grpc", "grpc_workers")):
        env = {k: v for k, v in _gateway_env(resources, name).items() if isinstance(v, str)}
        cpu = km.container(spec, name)["resources"]["limits"]["cpu"]
        cores = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
        assert getattr(Settings.from_env(env), field) == max(1, round(2 * cores)), name


def test_gateway_autoscaling(overlay):
    from serving.metrics import GatewayMetrics

    _, resources = overlay
    deployment = km.find(resources, "Deployment", "imgserve-gateway")
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    hpa = km.find(resources, "HorizontalPodAutoscaler", "imgserve-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "imgserve-gateway",
    }
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Resource"]["resource"]["target"]["type"] == "Utilization"
    pods_metric = metrics["Pods"]["pods"]["metric"]["name"]
    # The in-flight metric the adapter serves is a gauge the gateway really exports.
    families = {f.name: f.type for f in GatewayMetrics().registry.collect()}
    assert families.get(pods_metric) == "gauge", pods_metric


def test_disruption_budgets_select_their_pods(overlay):
    _, resources = overlay
    for name in ("imgserve-gateway", "imgserve-tfserving"):
        pdb = km.find(resources, "PodDisruptionBudget", name)
        assert pdb["spec"]["maxUnavailable"] == 1
        labels = km.pod_labels(km.find(resources, "Deployment", name))
        assert km.selector_matches(pdb["spec"]["selector"], labels)


def test_services_select_their_pods_and_ports(overlay):
    _, resources = overlay
    for name in ("imgserve-gateway", "imgserve-tfserving"):
        service = km.find(resources, "Service", name)
        assert service["spec"]["type"] == "ClusterIP"
        deployment = km.find(resources, "Deployment", name)
        assert km.selector_matches(
            {"matchLabels": service["spec"]["selector"]}, km.pod_labels(deployment)
        )
        named = km.workload_pod(deployment).ports
        for port in service["spec"]["ports"]:
            assert named[port["targetPort"]] == port["port"], (name, port)
    assert not [
        r for r in resources if r["kind"] == "Service" and r["spec"].get("type") != "ClusterIP"
    ]


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
    data = _configmap_data(resources, cm_name)
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
    script = _configmap_data(resources, probe_key.split(":")[1])["ready.sh"]
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


def test_images_are_pinned(rendered):
    for name, resources in rendered.items():
        for workload in km.workloads(resources):
            for c in km.all_containers(km.pod_spec(workload)):
                image = c["image"]
                repo, _, tag = image.rpartition(":")
                assert repo and tag and tag != "latest" and "/" not in tag, (name, image)


# -- the model repository, ConfigMaps from models/ and monitoring/ ------------------------------


def test_model_server_configmap_is_models_dir(overlay):
    _, resources = overlay
    data = _configmap_data(resources, "imgserve-model-server-config")
    assert set(data) == {"models.config", "monitoring.config", "batching.config"}
    for key, content in data.items():
        assert content == (REPO_ROOT / "models" / key).read_text(), (
            f"{key} differs from models/{key}"
        )


def test_seeded_models_config_names_models_at_their_serving_paths(overlay):
    _, resources = overlay
    config = text_format.Parse(
        _configmap_data(resources, "imgserve-model-server-config")["models.config"],
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
        _configmap_data(resources, "imgserve-model-server-config")["monitoring.config"],
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


# -- monitoring resources ---------------------------------------------------------------------


def _assert_keys(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    assert set(obj) <= allowed, f"{where}: unexpected fields {set(obj) - allowed}"


def test_service_monitors(overlay):
    _, resources = overlay
    monitors = km.find_all(resources, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"imgserve-gateway", "imgserve-tfserving"}
    expected_paths = {
        "imgserve-gateway": {"/metrics"},
        "imgserve-tfserving": {"/monitoring/prometheus/metrics"},
    }
    for m in monitors:
        name = m["metadata"]["name"]
        assert m["apiVersion"] == "monitoring.coreos.com/v1"
        _assert_keys(m, {"apiVersion", "kind", "metadata", "spec"}, name)
        _assert_keys(m["spec"], {"selector", "endpoints", "namespaceSelector", "jobLabel"}, name)
        assert m["metadata"]["labels"]["release"]
        service = km.find(resources, "Service", name)
        assert km.selector_matches(m["spec"]["selector"], service["metadata"]["labels"])
        service_ports = {p["name"] for p in service["spec"]["ports"]}
        for ep in m["spec"]["endpoints"]:
            _assert_keys(ep, {"port", "path", "interval", "scrapeTimeout"}, name)
            assert ep["port"] in service_ports, (name, ep["port"])
            assert re.fullmatch(r"\d+s", ep["interval"]) and re.fullmatch(
                r"\d+s", ep["scrapeTimeout"]
            )
            assert int(ep["scrapeTimeout"][:-1]) <= int(ep["interval"][:-1])
        assert {ep["path"] for ep in m["spec"]["endpoints"]} == expected_paths[name]
    gateway_ports = {
        ep["port"]
        for ep in km.find(resources, "ServiceMonitor", "imgserve-gateway")["spec"]["endpoints"]
    }
    assert gateway_ports == {"http", "grpc-metrics"}  # gunicorn and the gRPC process


def test_prometheus_rule_is_the_rules_file(overlay):
    _, resources = overlay
    rule = km.find(resources, "PrometheusRule", "imgserve")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    _assert_keys(rule, {"apiVersion", "kind", "metadata", "spec"}, "PrometheusRule")
    _assert_keys(rule["spec"], {"groups"}, "PrometheusRule.spec")
    assert rule["metadata"]["labels"]["release"]
    assert rule["spec"] == yaml.safe_load((REPO_ROOT / "monitoring/alerts.yml").read_text())
    for group in rule["spec"]["groups"]:
        _assert_keys(group, {"name", "interval", "rules"}, group["name"])
        for r in group["rules"]:
            _assert_keys(
                r, {"alert", "record", "expr", "for", "labels", "annotations"}, group["name"]
            )
            assert isinstance(r["expr"], str) and r["expr"].strip()


def test_grafana_dashboard_configmap(overlay):
    _, resources = overlay
    cm = km.find(resources, "ConfigMap", "imgserve-grafana-dashboard")
    assert cm["metadata"]["name"] == "imgserve-grafana-dashboard"  # no hash: no stale duplicates
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"] == {
        "imgserve.json": (REPO_ROOT / "monitoring/dashboards/imgserve.json").read_text()
    }


# -- network policy -----------------------------------------------------------------------------


def test_network_policy_only_the_gateway_reaches_tfserving(overlay):
    _, resources = overlay
    policies = km.find_all(resources, "NetworkPolicy")
    gateway = km.workload_pod(km.find(resources, "Deployment", "imgserve-gateway"))
    tfserving = km.workload_pod(km.find(resources, "Deployment", "imgserve-tfserving"))
    calibrator = km.workload_pod(km.find(resources, "CronJob", "imgserve-calibrate"))
    ns = gateway.namespace
    neighbour = km.Pod(ns, {"app": "something-else"})
    outsider = km.Pod("default", {"app": "client"})
    prometheus = km.Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
    dns = km.Pod("kube-system", {"k8s-app": "kube-dns"}, {"dns": 53})

    def allowed(src: km.Pod, dst: km.Pod, port: int, proto: str = "TCP") -> bool:
        return km.connection_allowed(policies, src, dst, port, proto)

    # TF Serving: the gateway (both ports), Prometheus (metrics port only) and the
    # calibrator (gRPC only: GetModelStatus before a label move), nobody else.
    assert allowed(gateway, tfserving, 8500) and allowed(gateway, tfserving, 8501)
    assert allowed(prometheus, tfserving, 8501) and not allowed(prometheus, tfserving, 8500)
    assert allowed(calibrator, tfserving, 8500) and not allowed(calibrator, tfserving, 8501)
    for src in (neighbour, outsider):
        assert not allowed(src, tfserving, 8500) and not allowed(src, tfserving, 8501)
    # The gateway is the exposed part: REST and gRPC from other namespaces (clients,
    # an Ingress controller), its gRPC metrics only from Prometheus.
    assert allowed(outsider, gateway, 8080) and allowed(outsider, gateway, 9000)
    assert not allowed(outsider, gateway, 9001)
    # gunicorn itself only through the proxy (loopback) and the kubelet's probes.
    assert not allowed(outsider, gateway, 8081) and not allowed(prometheus, gateway, 8081)
    # Anything else started in the namespace is denied by default, even its egress.
    assert not allowed(neighbour, gateway, 8080)
    assert allowed(prometheus, gateway, 8080) and allowed(prometheus, gateway, 9001)
    # Egress: the gateway and the calibrator reach TF Serving and DNS only; TF Serving
    # reaches nothing.
    for src in (gateway, calibrator):
        assert allowed(src, dns, 53, "UDP") and allowed(src, dns, 53, "TCP")
        assert not allowed(src, outsider, 443)
    assert not allowed(tfserving, dns, 53, "UDP") and not allowed(tfserving, outsider, 443)
    for src in (tfserving, calibrator):
        assert not allowed(src, gateway, 8080)
    assert not allowed(calibrator, prometheus, 9090)


# -- calibration, RBAC, secrets ------------------------------------------------------------------


def _calibration_args(workload: dict[str, Any]) -> list[str]:
    c = km.container(km.pod_spec(workload), "calibrate")
    assert "command" not in c  # the trainer image's entrypoint: python -m training
    assert c["image"].startswith("imgserve-trainer:")
    return c["args"]


def test_label_moves_wait_on_tfserving_grpc(overlay):
    """The containers that move labels (the gateway starts calibration jobs, the CronJob
    runs them) wait on TF Serving's gRPC Service before a label moves."""
    from contract.repository import READY_GRPC_ENV
    from serving.settings import split_host_port

    _, resources = overlay
    service = km.find(resources, "Service", "imgserve-tfserving")
    grpc_port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"]
    assert grpc_port == 8500
    expected = ("imgserve-tfserving", grpc_port)
    assert split_host_port(_gateway_env(resources, "http")[READY_GRPC_ENV]) == expected
    cron = km.find(resources, "CronJob", "imgserve-calibrate")
    spec = km.pod_spec(cron)
    env = {e["name"]: e.get("value") for e in km.container(spec, "calibrate").get("env", [])}
    assert split_host_port(env[READY_GRPC_ENV]) == expected


def test_calibration_cronjob(overlay):
    name, resources = overlay
    cron = km.find(resources, "CronJob", "imgserve-calibrate")
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    # dev calibrates on demand only; prod on schedule.
    assert cron["spec"].get("suspend", False) is (name == "dev")
    job = cron["spec"]["jobTemplate"]["spec"]
    assert (
        job["backoffLimit"] == 0
        and job["activeDeadlineSeconds"] > 0
        and job["ttlSecondsAfterFinished"] > 0
    )
    args = _calibration_args(cron)
    assert args[0] == "calibrate"
    options = dict(zip(args[1::2], args[2::2], strict=True))
    spec = km.pod_spec(cron)
    mounts = km.mounts_by_volume(spec, km.container(spec, "calibrate"))
    assert options["--model-base"] == mounts["pvc:imgserve-models"]["mountPath"]
    assert options["--samples"] == mounts["pvc:imgserve-samples"]["mountPath"]
    served = {entry.name for entry in _models_config().model_config_list.config}
    assert options["--name"] in served, f"{options['--name']} is not in models/models.config"


def test_calibration_arguments_parse_with_the_training_cli(rendered):
    from training.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    if "calibrate" not in commands:
        pytest.xfail("`python -m training calibrate` is not implemented yet (online calibration)")
    for resources in rendered.values():
        for workload in km.workloads(resources):
            if workload["metadata"]["name"].startswith("imgserve-calibrate"):
                parser.parse_args(_calibration_args(workload))


def test_one_off_job_runs_the_cronjob_pod(rendered):
    job = km.find(rendered["calibrate-once"], "Job", "imgserve-calibrate-once")
    cron = km.find(rendered["prod"], "CronJob", "imgserve-calibrate")
    assert job["metadata"]["namespace"] == cron["metadata"]["namespace"]
    # Same pod (the image tag is the operator's to set), same run limits.
    assert km.pod_spec(job) == km.pod_spec(cron)
    cron_job = cron["spec"]["jobTemplate"]["spec"]
    for key in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        assert job["spec"][key] == cron_job[key]


def test_rbac_is_minimal(rendered):
    for name, resources in rendered.items():
        assert not km.find_all(resources, "ClusterRole") and not km.find_all(
            resources, "ClusterRoleBinding"
        )
        for role in km.find_all(resources, "Role"):
            for rule in role["rules"]:
                for key in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[key], (name, rule)
                assert not {"secrets", "pods/exec", "pods/attach", "roles", "rolebindings"} & set(
                    rule["resources"]
                )
                assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
        for binding in km.find_all(resources, "RoleBinding"):
            assert binding["roleRef"]["kind"] == "Role"
            # Workloads need no API access: no binding names a ServiceAccount.
            assert all(s["kind"] != "ServiceAccount" for s in binding["subjects"]), binding
    operator = km.find(rendered["prod"], "Role", "imgserve-calibration-operator")
    granted = {
        (res, verb)
        for rule in operator["rules"]
        for res in rule["resources"]
        for verb in rule["verbs"]
    }
    # What `kubectl create job --from=cronjob/...` and following it need.
    assert {
        ("cronjobs", "get"),
        ("jobs", "create"),
        ("jobs", "get"),
        ("pods/log", "get"),
    } <= granted
    cron_rule = next(r for r in operator["rules"] if "cronjobs" in r["resources"])
    assert cron_rule["resourceNames"] == ["imgserve-calibrate"] and cron_rule["verbs"] == ["get"]


def test_admin_token_secret_is_referenced_never_committed(rendered):
    for resources in rendered.values():
        assert not km.find_all(resources, "Secret")
    committed = [
        p for p in K8S.rglob("*.yaml") if re.search(r"^kind:\s*Secret\s*$", p.read_text(), re.M)
    ]
    assert committed == []
    readme = (K8S / "README.md").read_text()
    assert "kubectl -n imgserve create secret generic imgserve-admin" in readme


def test_readme_documents_every_kustomization():
    readme = (K8S / "README.md").read_text()
    for path in (
        "k8s/overlays/dev",
        "k8s/overlays/prod",
        "k8s/jobs/calibrate-once",
        "python k8s/generate.py",
    ):
        assert path in readme, path
    assert Path(K8S / "generate.py").is_file()
