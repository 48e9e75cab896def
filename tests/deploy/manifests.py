"""What the manifest tests share: the ``k8s/`` directory and readers of imgserve's resources."""

from __future__ import annotations

from typing import Any

from google.protobuf import text_format

from tests.deploy import k8s_model as km
from tests.deploy.tfserving_protos import ModelServerConfig
from tests.deploy.tools import REPO_ROOT

K8S = REPO_ROOT / "k8s"


def models_config() -> Any:
    """``models/models.config`` parsed as TF Serving's ModelServerConfig."""
    return text_format.Parse((REPO_ROOT / "models/models.config").read_text(), ModelServerConfig())


def configmap_data(resources: list[dict[str, Any]], name: str) -> dict[str, str]:
    """The ``data`` of the ConfigMap ``name`` (a generated name's hash suffix ignored)."""
    return km.find(resources, "ConfigMap", name)["data"]


def gateway_env(resources: list[dict[str, Any]], container_name: str) -> dict[str, Any]:
    """The environment a gateway container gets: its ConfigMaps, then its own ``env``."""
    spec = km.pod_spec(km.find(resources, "Deployment", "imgserve-gateway"))
    c = km.container(spec, container_name)
    env: dict[str, Any] = {}
    for source in c.get("envFrom", []):
        cm = km.find(resources, "ConfigMap", source["configMapRef"]["name"])
        env.update(cm["data"])
    for item in c.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env
