"""The Kubernetes manifests: they build, validate strictly, and keep their promises for pods
and the gateway.

Every overlay (dev: CPU TF Serving, prod: GPU) is rendered with ``kubectl kustomize``
and validated with kubernetes-validate's strict schemas for a pinned Kubernetes
version; the Prometheus Operator resources (no schema there) are checked field by
field. The rest asserts behaviour: Pod Security "restricted", the gateway's probes,
settings, processes, autoscaling, disruption budgets and services, pinned images.
TF Serving and the model repository: ``test_deploy_manifests_tfserving.py``;
monitoring, network policy, calibration and its permissions:
``test_deploy_manifests_operations.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from tests.deploy import k8s_model as km
from tests.deploy import manifests
from tests.deploy.manifests import K8S
from tests.deploy.tools import KUBERNETES_VERSION, REPO_ROOT, find_tool, run_tool

CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}


def _validate(resource: dict[str, Any]) -> None:
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


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
    data = manifests.configmap_data(resources, proxy_volume(spec, proxy, "/etc/nginx/templates"))
    assert data == {
        "gateway.conf.template": (REPO_ROOT / "proxy/gateway.conf.template").read_text()
    }
    env = {e["name"]: e["value"] for e in proxy["env"]}
    assert env["NGINX_ENVSUBST_FILTER"] == "IMGSERVE_PROXY_"
    http_port = {p["name"]: p["containerPort"] for p in proxy["ports"]}["http"]
    assert env["IMGSERVE_PROXY_LISTEN"] == str(http_port)
    settings = Settings.from_env(
        {k: v for k, v in manifests.gateway_env(resources, "http").items() if isinstance(v, str)}
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
        env = manifests.gateway_env(resources, name)
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
    http_env = manifests.gateway_env(resources, "http")
    mounts = km.mounts_by_volume(spec, km.container(spec, "http"))
    assert any(
        k.startswith("emptyDir:") and m["mountPath"] == http_env["PROMETHEUS_MULTIPROC_DIR"]
        for k, m in mounts.items()
    )
    assert manifests.gateway_env(resources, "grpc")["PROMETHEUS_MULTIPROC_DIR"] == ""


def test_gateway_processes_are_two_per_core_of_their_container(overlay):
    """gunicorn's workers and the gRPC server's, each sized like the other for its CPU limit."""
    from serving.settings import Settings

    _, resources = overlay
    spec = km.pod_spec(km.find(resources, "Deployment", "imgserve-gateway"))
    for name, field in (("http", "workers"), ("grpc", "grpc_workers")):
        env = {
            k: v for k, v in manifests.gateway_env(resources, name).items() if isinstance(v, str)
        }
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


def test_images_are_pinned(rendered):
    for name, resources in rendered.items():
        for workload in km.workloads(resources):
            for c in km.all_containers(km.pod_spec(workload)):
                image = c["image"]
                repo, _, tag = image.rpartition(":")
                assert repo and tag and tag != "latest" and "/" not in tag, (name, image)


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
