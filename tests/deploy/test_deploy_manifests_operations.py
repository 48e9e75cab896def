"""The Kubernetes manifests of operations: the Prometheus Operator resources and the
dashboard, who may talk to whom (NetworkPolicy), calibration (CronJob, one-off Job, label
moves) with minimal RBAC, and the admin token as a Secret never committed.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.deploy import k8s_model as km
from tests.deploy import manifests
from tests.deploy.manifests import K8S
from tests.deploy.tools import REPO_ROOT

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
    assert split_host_port(manifests.gateway_env(resources, "http")[READY_GRPC_ENV]) == expected
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
    served = {entry.name for entry in manifests.models_config().model_config_list.config}
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
