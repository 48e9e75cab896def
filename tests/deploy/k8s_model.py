"""Reading rendered Kubernetes manifests: lookups, pod specs, and NetworkPolicy semantics.

``connection_allowed`` evaluates the namespace's NetworkPolicies the way the API
defines them (a pod selected by a policy of a type is isolated for that direction;
traffic passes when some rule of a selecting policy admits it, on both the egress
side of the source and the ingress side of the destination), so tests can ask
"may A reach B on port P" instead of pattern-matching YAML.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

Resource = dict[str, Any]
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


def find(resources: list[Resource], kind: str, name: str | None = None) -> Resource:
    """The one resource of ``kind`` (and ``name``, matched with or without a hash suffix)."""
    matches = [
        r
        for r in resources
        if r["kind"] == kind
        and (name is None or r["metadata"]["name"] == name or _hashed(r["metadata"]["name"], name))
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def find_all(resources: list[Resource], kind: str) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind]


def _hashed(actual: str, name: str) -> bool:
    # kustomize's generators append "-<10 character hash>".
    return actual.startswith(name + "-") and len(actual) == len(name) + 11


def pod_spec(workload: Resource) -> dict[str, Any]:
    """The pod spec of a Deployment/StatefulSet/DaemonSet/Job/CronJob."""
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def pod_labels(workload: Resource) -> dict[str, str]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["metadata"].get("labels", {})


def workloads(resources: list[Resource]) -> Iterator[Resource]:
    return (r for r in resources if r["kind"] in WORKLOAD_KINDS)


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [c for c in all_containers(spec) if c["name"] == name]
    assert len(matches) == 1, f"no container {name!r}"
    return matches[0]


def mounts_by_volume(spec: dict[str, Any], c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``container``'s mounts keyed by the volume source: ``pvc:<claim>``, ``emptyDir:<name>``..."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    out = {}
    for m in c.get("volumeMounts", []):
        v = volumes[m["name"]]
        if "persistentVolumeClaim" in v:
            key = f"pvc:{v['persistentVolumeClaim']['claimName']}"
        elif "emptyDir" in v:
            key = f"emptyDir:{v['name']}"
        elif "configMap" in v:
            key = f"configMap:{v['configMap']['name']}"
        else:
            key = f"other:{v['name']}"
        out[key] = m
    return out


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Label-selector semantics (matchLabels and matchExpressions); ``{}`` matches everything."""
    if selector is None:
        return False
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


@dataclass(frozen=True)
class Pod:
    """A pod for NetworkPolicy questions: namespace, labels, named container ports."""

    namespace: str
    labels: dict[str, str]
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace}


def workload_pod(workload: Resource) -> Pod:
    spec = pod_spec(workload)
    ports = {
        p["name"]: p["containerPort"]
        for c in spec["containers"]
        for p in c.get("ports", [])
        if "name" in p
    }
    return Pod(workload["metadata"]["namespace"], pod_labels(workload), ports)


def _port_admitted(
    rule_ports: list[dict[str, Any]] | None, dst: Pod, port: int, proto: str
) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != proto:
            continue
        wanted = p.get("port")
        if wanted is None:
            return True
        number = dst.ports.get(wanted) if isinstance(wanted, str) else wanted
        end = p.get("endPort", number)
        if number is not None and number <= port <= end:
            return True
    return False


def _peer_admits(peers: list[dict[str, Any]] | None, policy_ns: str, other: Pod) -> bool:
    if not peers:
        return True
    for peer in peers:
        ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
        if ns_sel is None and pod_sel is None:
            continue  # ipBlock peers: this project uses none
        ns_ok = (
            selector_matches(ns_sel, other.namespace_labels)
            if ns_sel is not None
            else other.namespace == policy_ns
        )
        pod_ok = selector_matches(pod_sel, other.labels) if pod_sel is not None else True
        if ns_ok and pod_ok:
            return True
    return False


def _direction_allowed(
    policies: list[Resource],
    subject: Pod,
    other: Pod,
    dst: Pod,
    port: int,
    proto: str,
    egress: bool,
) -> bool:
    kind = "Egress" if egress else "Ingress"
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == subject.namespace
        and selector_matches(p["spec"]["podSelector"], subject.labels)
        and kind in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True  # not isolated in this direction
    for policy in selecting:
        for rule in policy["spec"].get(kind.lower(), []):
            peers = rule.get("to" if egress else "from")
            if _peer_admits(peers, subject.namespace, other) and _port_admitted(
                rule.get("ports"), dst, port, proto
            ):
                return True
    return False


def connection_allowed(
    policies: list[Resource], src: Pod, dst: Pod, port: int, proto: str = "TCP"
) -> bool:
    """Whether ``src`` may open a connection to ``dst`` on ``port`` under ``policies``."""
    return _direction_allowed(policies, src, dst, dst, port, proto, egress=True) and (
        _direction_allowed(policies, dst, src, dst, port, proto, egress=False)
    )
