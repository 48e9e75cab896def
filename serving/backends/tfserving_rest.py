"""The ``tfserving-rest`` backend: TF Serving's REST API.

- ``POST /v1/models/<name>/versions/<v>:predict`` in the columnar format
  (``{"signature_name": ..., "inputs": {"images": [...]}}`` -> ``{"outputs": {...}}``),
  with the remaining deadline as the HTTP timeout;
- ``GET /v1/models/<name>`` for version states, ``GET .../versions/<v>/metadata``
  for the signature check;
- TF Serving's ``{"error": "..."}`` answers mapped to the gateway's errors by the
  HTTP status TF Serving chose for its error code.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import requests
from requests.adapters import HTTPAdapter

from serving.backends.base import Servable, VersionStatus
from serving.backends.remote import (
    CONTROL_TIMEOUT_S,
    FORWARDED_IDS,
    RemoteBackend,
    SignatureSpec,
    TensorSpec,
    unreachable,
)
from serving.catalog import ModelVersion
from serving.errors import BackendError, BackendTimeout, ServiceUnavailable, ServingError
from serving.settings import Settings

_DTYPES = {"float32": np.float32, "float64": np.float64, "int32": np.int32, "int64": np.int64}


def map_http_error(status: int, body: str) -> ServingError:
    """A TF Serving REST error (status + ``{"error": ...}``) -> the gateway's error."""
    try:
        message = json.loads(body).get("error", body)
    except (ValueError, AttributeError):
        message = body
    message = str(message)[:500]
    if status == 504:
        return BackendTimeout(f"TF Serving did not answer in time: {message}")
    if status in (404, 429, 503):
        # Version unloaded since the last poll, or TF Serving's queue is full.
        return ServiceUnavailable(f"TF Serving ({status}): {message}", retry_after=1)
    return BackendError(f"TF Serving ({status}): {message}")


class RestServable(Servable):
    """Forwards batches to ``:predict`` for one version."""

    def __init__(self, mv: ModelVersion, backend: TFServingRestBackend) -> None:
        super().__init__(mv)
        self._backend = backend
        self._url = f"{backend.base_url}/v1/models/{mv.name}/versions/{mv.version}:predict"
        outputs = mv.card.signature.outputs
        self._dtypes = {k: _DTYPES.get(v.dtype, np.float32) for k, v in outputs.items()}

    def predict(
        self, images: np.ndarray, *, timeout: float, request_ids: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        body = {
            "signature_name": self.model.signature_name,
            "inputs": {self.model.input_name: images.tolist()},
        }
        headers = {"X-Request-ID": ",".join(request_ids[:FORWARDED_IDS])} if request_ids else {}
        response = self._backend.request(
            "POST", self._url, json=body, timeout=timeout, headers=headers
        )
        if response.status_code != 200:
            raise map_http_error(response.status_code, response.text)
        try:
            outputs = response.json()["outputs"]
        except (ValueError, KeyError) as exc:
            raise BackendError(f"TF Serving answered without 'outputs': {exc}") from None
        if not isinstance(outputs, dict):
            # A single-output signature answers with the bare value.
            outputs = {next(iter(self._dtypes), "output"): outputs}
        return {k: np.asarray(v, dtype=self._dtypes.get(k, np.float32)) for k, v in outputs.items()}


class TFServingRestBackend(RemoteBackend):
    """TF Serving over REST (``IMGSERVE_TFSERVING_REST``)."""

    name = "tfserving-rest"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.base_url = settings.tfserving_rest.rstrip("/")
        self._pool_size = max(4, 2 * settings.batch_threads)
        self._local = threading.local()

    def _session(self) -> requests.Session:
        # One session per thread: connection reuse without sharing a Session across threads.
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self._pool_size, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """One HTTP call; connection failures and timeouts become the gateway's errors."""
        try:
            return self._session().request(method, url, **kwargs)
        except requests.Timeout:
            raise BackendTimeout(f"TF Serving did not answer {url} in time") from None
        except requests.RequestException as exc:
            raise unreachable(self.base_url, type(exc).__name__) from None

    def fetch_status(self, name: str) -> list[VersionStatus]:
        response = self.request(
            "GET", f"{self.base_url}/v1/models/{name}", timeout=CONTROL_TIMEOUT_S
        )
        if response.status_code == 404:
            return []
        if response.status_code != 200:
            raise unreachable(
                self.base_url, f"status {response.status_code}: {response.text[:200]}"
            )
        return [
            VersionStatus(
                int(s["version"]),
                s.get("state", "UNKNOWN"),
                s.get("status", {}).get("error_message", ""),
            )
            for s in response.json().get("model_version_status", [])
        ]

    def fetch_signature(self, mv: ModelVersion) -> SignatureSpec:
        url = f"{self.base_url}/v1/models/{mv.name}/versions/{mv.version}/metadata"
        response = self.request("GET", url, timeout=CONTROL_TIMEOUT_S)
        if response.status_code != 200:
            raise unreachable(self.base_url, f"metadata status {response.status_code}")
        sigmap = (
            response.json().get("metadata", {}).get("signature_def", {}).get("signature_def", {})
        )
        sig = sigmap.get(mv.signature_name)
        if sig is None:
            return SignatureSpec({}, {})

        def spec(info: dict[str, Any]) -> TensorSpec:
            shape_info = info.get("tensor_shape", {})
            shape = None
            if not shape_info.get("unknown_rank", False):
                shape = tuple(int(d.get("size", 0)) for d in shape_info.get("dim", []))
            return TensorSpec(info.get("dtype", "DT_INVALID"), shape)

        return SignatureSpec(
            {k: spec(v) for k, v in sig.get("inputs", {}).items()},
            {k: spec(v) for k, v in sig.get("outputs", {}).items()},
        )

    def make_servable(self, mv: ModelVersion) -> RestServable:
        return RestServable(mv, self)
