"""A protocol-faithful TensorFlow Serving stand-in for tests, backed by the real SavedModels.

The TF Serving binary cannot be installed on the test machines, so the gateway's
``tfserving-grpc`` and ``tfserving-rest`` backends are tested against this. It
speaks the real protocols, with TF Serving's messages and status codes:

- gRPC ``tensorflow.serving.PredictionService`` (``Predict``, ``GetModelMetadata``;
  ``Classify``/``Regress``/``MultiInference`` are UNIMPLEMENTED) and
  ``tensorflow.serving.ModelService`` (``GetModelStatus``), from the
  ``tensorflow_serving.apis`` stubs;
- REST ``GET /v1/models/<name>[/versions/<v>|/labels/<l>][/metadata]`` and
  ``POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict`` (row ``instances``
  and columnar ``inputs`` formats), errors as ``{"error": "..."}`` with the HTTP
  status TF Serving's ``ToHTTPStatusCode`` gives the error code.

It reads ``models.config`` (version policy, version labels) like
``--model_config_file`` and loads each wanted version with
``tf.saved_model.load``. Like ``ServerCore``, a reload whose version label points
at a version that is not loaded and AVAILABLE yet is refused whole (nothing loads,
the previous labels stay, the reason is logged and kept in
``ModelManager.rejected``); ``allow_unavailable_labels`` is
``--allow_version_labels_for_unavailable_models``: a *new* label may then point at
an unloaded version, an existing one still may not move onto one. The first load
(start-up) is not checked. Test knobs: ``delay_s`` (sleep before each predict),
``fail`` (a ``(grpc.StatusCode, message)`` every predict returns), ``stop()``
(the server goes away).

Also runnable for local experiments and benchmarks::

    python -m tests.helpers.tfserving_standin --model-base models --grpc-port 8500 --rest-port 8501
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from google.protobuf import json_format, text_format  # noqa: E402
from tensorflow.core.protobuf import saved_model_pb2  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402
from werkzeug.wrappers import Request, Response  # noqa: E402

log = logging.getLogger("tfserving_standin")

DEFAULT_SIGNATURE = "serving_default"
Code = grpc.StatusCode

#: TF Serving's ``ToHTTPStatusCode`` (model_servers/http_server.cc).
HTTP_STATUS = {
    Code.OK: 200,
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}
_PREDICT_PATH = re.compile(
    r"(?i)/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)"
)
_STATUS_PATH = re.compile(
    r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?"
)


class ServingStatus(Exception):
    """A TF Serving status: a gRPC code and TF Serving's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Loaded:
    name: str
    version: int
    model: Any
    signature_defs: Any  # {name: SignatureDef}


class ModelManager:
    """Loads the versions ``models.config`` asks for; resolves ModelSpecs like ServerCore."""

    def __init__(
        self, model_base: str | os.PathLike[str], *, allow_unavailable_labels: bool = False
    ) -> None:
        self.base = Path(model_base)
        self.allow_unavailable_labels = allow_unavailable_labels
        self._lock = threading.Lock()
        self._loaded: dict[tuple[str, int], _Loaded] = {}
        self._labels: dict[str, dict[str, int]] = {}
        self._models: set[str] = set()
        self._started = False
        #: Why each refused reload was refused, oldest first.
        self.rejected: list[str] = []

    def reload(self) -> None:
        """Re-read ``models.config`` and the base path; load new versions, unload dropped ones."""
        config = model_server_config_pb2.ModelServerConfig()
        path = self.base / "models.config"
        if path.exists():
            text_format.Parse(path.read_text(), config)
        wanted: set[tuple[str, int]] = set()
        labels: dict[str, dict[str, int]] = {}
        for entry in config.model_config_list.config:
            model_dir = self.base / entry.name
            on_disk = (
                sorted(
                    int(p.name)
                    for p in model_dir.iterdir()
                    if p.is_dir() and p.name.isascii() and p.name.isdigit()
                )
                if model_dir.is_dir()
                else []
            )
            policy = entry.model_version_policy
            which = policy.WhichOneof("policy_choice")
            if which == "all":
                versions = on_disk
            elif which == "specific":
                versions = [v for v in policy.specific.versions if v in on_disk]
            else:
                n = policy.latest.num_versions or 1
                versions = on_disk[-n:]
            wanted |= {(entry.name, v) for v in versions}
            labels[entry.name] = dict(entry.version_labels)
        if self._started:
            # ServerCore updates the label map before loading anything new.
            refused = self._label_violation(labels, set(self._loaded))
            if refused:
                self.rejected.append(refused)
                log.warning("config reload refused: %s", refused)
                return
        loaded = dict(self._loaded)
        for name, version in sorted(wanted - set(loaded)):
            vdir = self.base / name / str(version)
            proto = saved_model_pb2.SavedModel.FromString((vdir / "saved_model.pb").read_bytes())
            loaded[(name, version)] = _Loaded(
                name, version, tf.saved_model.load(str(vdir)), proto.meta_graphs[0].signature_def
            )
        for key in set(loaded) - wanted:
            del loaded[key]
        # Start-up is not checked: TF Serving would refuse to start, and tests that
        # label a broken version on purpose need a server to talk to.
        self._started = True
        with self._lock:
            self._loaded = loaded
            self._labels = labels
            self._models = {name for name, _ in wanted} | set(labels)

    def _label_violation(
        self, labels: dict[str, dict[str, int]], available: set[tuple[str, int]]
    ) -> str | None:
        """TF Serving's label rule: the first label that points at an unavailable version."""
        for name, mapping in sorted(labels.items()):
            for label, version in sorted(mapping.items()):
                if (name, version) in available or self._labels.get(name, {}).get(label) == version:
                    continue
                is_new = label not in self._labels.get(name, {})
                if is_new and self.allow_unavailable_labels:
                    continue
                return (
                    f"Request to assign label to version {version} of model {name}, "
                    "which is not currently available for inference"
                )
        return None

    def versions(self, name: str) -> list[int]:
        return sorted(v for n, v in self._loaded if n == name)

    def resolve(self, name: str, version: int | None, label: str | None) -> _Loaded:
        """ServerCore::GetServableHandle: Latest / Specific / label, with its error messages."""
        if label:
            target = self._labels.get(name, {}).get(label)
            if target is None:
                raise ServingStatus(
                    Code.INVALID_ARGUMENT, f"Unrecognized servable version label: {label}"
                )
            version = target
        if version is None:
            versions = self.versions(name)
            if not versions:
                raise ServingStatus(
                    Code.NOT_FOUND, f"Servable not found for request: Latest({name})"
                )
            version = versions[-1]
        found = self._loaded.get((name, version))
        if found is None:
            raise ServingStatus(
                Code.NOT_FOUND, f"Servable not found for request: Specific({name}, {version})"
            )
        return found

    def status(self, name: str, version: int | None, label: str | None) -> list[int]:
        """GetModelStatusImpl: the versions to report, or TF Serving's NOT_FOUND."""
        if label:
            version = self.resolve(name, None, label).version
        versions = self.versions(name)
        if version is not None:
            if version not in versions:
                raise ServingStatus(
                    Code.NOT_FOUND, f"Could not find version {version} of model {name}"
                )
            return [version]
        if not versions:
            raise ServingStatus(Code.NOT_FOUND, f"Could not find any versions of model {name}")
        return versions


class TFServingStandIn:
    """gRPC and REST servers on loopback in front of a :class:`ModelManager`."""

    def __init__(
        self,
        model_base: str | os.PathLike[str],
        *,
        grpc_port: int = 0,
        rest_port: int = 0,
        host: str = "127.0.0.1",
        poll_s: float = 0.0,
        allow_unavailable_labels: bool = False,
    ) -> None:
        self.manager = ModelManager(model_base, allow_unavailable_labels=allow_unavailable_labels)
        self.manager.reload()
        self.delay_s = 0.0
        self.fail: tuple[grpc.StatusCode, str] | None = None
        self.predict_calls = 0
        self.last_metadata: dict[str, str] = {}
        self._host = host
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16),
            options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
        )
        servicer = _GrpcServicer(self)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, self._grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelServicer(self), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"{host}:{grpc_port}")
        self._http = make_server(host, rest_port, self._wsgi, threaded=True)
        self.rest_port = self._http.server_port
        self._http_thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True)

    @property
    def grpc_address(self) -> str:
        return f"{self._host}:{self.grpc_port}"

    @property
    def rest_url(self) -> str:
        return f"http://{self._host}:{self.rest_port}"

    def start(self) -> TFServingStandIn:
        self._grpc.start()
        self._http_thread.start()
        if self._poll_s:
            self._poller.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._grpc.stop(0).wait()
        self._http.shutdown()
        self._http.server_close()

    def _poll(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.manager.reload()
            except Exception:
                log.exception("reload failed")

    # -- the shared predict --------------------------------------------------------------
    def predict(
        self,
        name: str,
        version: int | None,
        label: str | None,
        signature: str,
        inputs: dict[str, np.ndarray],
        output_filter: list[str],
    ) -> tuple[_Loaded, dict]:
        self.predict_calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail is not None:
            raise ServingStatus(*self.fail)
        servable = self.manager.resolve(name, version, label)
        signature = signature or DEFAULT_SIGNATURE
        if signature not in servable.signature_defs:
            raise ServingStatus(
                Code.INVALID_ARGUMENT,
                f'Serving signature name: "{signature}" not found in signature def',
            )
        sig = servable.signature_defs[signature]
        expected = set(sig.inputs)
        if set(inputs) != expected:
            raise ServingStatus(
                Code.INVALID_ARGUMENT,
                f"input size does not match signature: {len(inputs)}!={len(expected)} len({{"
                f"{','.join(sorted(inputs))}}}) != len({{{','.join(sorted(expected))}}}).",
            )
        args = {}
        for key, value in inputs.items():
            want = tf.dtypes.as_dtype(sig.inputs[key].dtype)
            if value.dtype != want.as_numpy_dtype:
                raise ServingStatus(
                    Code.INVALID_ARGUMENT,
                    f"Expects arg[0] to be {want.name} but {tf.as_dtype(value.dtype).name} is provided",
                )
            args[key] = tf.constant(value)
        for alias in output_filter:
            if alias not in sig.outputs:
                raise ServingStatus(
                    Code.INVALID_ARGUMENT, f"output tensor alias not found in signature: {alias}"
                )
        try:
            out = servable.model.signatures[signature](**args)
        except tf.errors.OpError as exc:
            raise ServingStatus(Code.INVALID_ARGUMENT, exc.message) from exc
        keep = output_filter or list(out)
        return servable, {k: out[k].numpy() for k in keep}

    def signature_map(self, name: str, version: int | None, label: str | None):
        servable = self.manager.resolve(name, version, label)
        sigmap = get_model_metadata_pb2.SignatureDefMap()
        for key, value in servable.signature_defs.items():
            sigmap.signature_def[key].CopyFrom(value)
        return servable, sigmap

    # -- REST ------------------------------------------------------------------------------
    def _wsgi(self, environ: dict, start_response: Any) -> Any:
        request = Request(environ)
        try:
            body = self._rest(request)
            response = Response(body, status=200, content_type="application/json")
        except ServingStatus as exc:
            doc = '{ "error": "' + json.dumps(exc.message)[1:-1] + '" }'
            response = Response(doc, status=HTTP_STATUS[exc.code], content_type="application/json")
        return response(environ, start_response)

    def _rest(self, request: Request) -> str:
        path = request.path
        if request.method == "POST":
            m = _PREDICT_PATH.fullmatch(path)
            if m:
                name, version, label, method = m.groups()
                if method != "predict":
                    raise ServingStatus(
                        Code.UNIMPLEMENTED, f"{method} is not supported by this server"
                    )
                return self._rest_predict(name, _int(version), label, request.get_data())
        elif request.method == "GET":
            m = _STATUS_PATH.fullmatch(path)
            if m:
                name, version, label, metadata = m.groups()
                if not name:
                    raise ServingStatus(Code.INVALID_ARGUMENT, "Missing model name in request.")
                if metadata:
                    servable, sigmap = self.signature_map(name, _int(version), label)
                    # TF Serving's ToJsonString: field names kept, defaults printed.
                    opts = {
                        "preserving_proto_field_name": True,
                        "always_print_fields_with_no_presence": True,
                    }
                    return json.dumps(
                        {
                            "model_spec": {
                                "name": name,
                                "signature_name": "",
                                "version": str(servable.version),
                            },
                            "metadata": {
                                "signature_def": json_format.MessageToDict(sigmap, **opts)
                            },
                        }
                    )
                response = get_model_status_pb2.GetModelStatusResponse()
                for v in self.manager.status(name, _int(version), label):
                    _add_status(response, v)
                return json_format.MessageToJson(
                    response,
                    preserving_proto_field_name=True,
                    always_print_fields_with_no_presence=True,
                )
        raise ServingStatus(Code.INVALID_ARGUMENT, f"Malformed request: {request.method} {path}")

    def _rest_predict(self, name: str, version: int | None, label: str | None, body: bytes) -> str:
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise ServingStatus(Code.INVALID_ARGUMENT, f"JSON Parse error: {exc}") from exc
        if not isinstance(doc, dict):
            raise ServingStatus(Code.INVALID_ARGUMENT, "JSON Value not an object")
        if ("instances" in doc) == ("inputs" in doc):
            raise ServingStatus(Code.INVALID_ARGUMENT, "Missing 'inputs' or 'instances' key")
        signature = doc.get("signature_name", DEFAULT_SIGNATURE)
        if not isinstance(signature, str):
            raise ServingStatus(
                Code.INVALID_ARGUMENT, "'signature_name' key must be a string value."
            )
        servable = self.manager.resolve(name, version, label)
        sig = servable.signature_defs.get(signature)
        if sig is None:
            raise ServingStatus(
                Code.INVALID_ARGUMENT,
                f'Serving signature name: "{signature}" not found in signature def',
            )
        input_names = list(sig.inputs)
        dtypes = {k: tf.dtypes.as_dtype(sig.inputs[k].dtype).as_numpy_dtype for k in input_names}
        if "instances" in doc:
            rows = doc["instances"]
            if not isinstance(rows, list):
                raise ServingStatus(
                    Code.INVALID_ARGUMENT, "Expecting 'instances' to be an list/array"
                )
            if len(input_names) == 1 and not (rows and isinstance(rows[0], dict)):
                inputs = {input_names[0]: rows}
            else:
                inputs = {k: [r[k] for r in rows] for k in input_names if rows and k in rows[0]}
        else:
            value = doc["inputs"]
            inputs = value if isinstance(value, dict) else {input_names[0]: value}
        try:
            arrays = {k: np.asarray(v, dtype=dtypes.get(k, np.float32)) for k, v in inputs.items()}
        except (ValueError, TypeError) as exc:
            raise ServingStatus(Code.INVALID_ARGUMENT, f"Failed to process element: {exc}") from exc
        _, outputs = self.predict(name, servable.version, None, signature, arrays, [])
        if "instances" in doc:
            n = next(iter(outputs.values())).shape[0]
            if len(outputs) == 1:
                return json.dumps({"predictions": next(iter(outputs.values())).tolist()})
            return json.dumps(
                {"predictions": [{k: v[i].tolist() for k, v in outputs.items()} for i in range(n)]}
            )
        if len(outputs) == 1:
            return json.dumps({"outputs": next(iter(outputs.values())).tolist()})
        return json.dumps({"outputs": {k: v.tolist() for k, v in outputs.items()}})


def _int(text: str | None) -> int | None:
    return int(text) if text else None


def _add_status(response: Any, version: int) -> None:
    status = response.model_version_status.add()
    status.version = version
    status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    status.status.error_code = 0
    status.status.error_message = ""


def _spec_choice(spec: Any) -> tuple[int | None, str | None]:
    which = spec.WhichOneof("version_choice")
    if which == "version":
        return spec.version.value, None
    if which == "version_label":
        return None, spec.version_label
    return None, None


class _GrpcServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, standin: TFServingStandIn) -> None:
        self.standin = standin

    def Predict(self, request, context):
        self.standin.last_metadata = dict(context.invocation_metadata() or ())
        version, label = _spec_choice(request.model_spec)
        try:
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            servable, outputs = self.standin.predict(
                request.model_spec.name,
                version,
                label,
                request.model_spec.signature_name,
                inputs,
                list(request.output_filter),
            )
        except ServingStatus as exc:
            context.abort(exc.code, exc.message)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    def GetModelMetadata(self, request, context):
        fields = list(request.metadata_field)
        if not fields:
            context.abort(
                Code.INVALID_ARGUMENT,
                "GetModelMetadataRequest must specify at least one metadata_field",
            )
        for f in fields:
            if f != "signature_def":
                context.abort(Code.INVALID_ARGUMENT, f"Metadata field {f} is not supported")
        version, label = _spec_choice(request.model_spec)
        try:
            servable, sigmap = self.standin.signature_map(request.model_spec.name, version, label)
        except ServingStatus as exc:
            context.abort(exc.code, exc.message)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(sigmap)
        return response

    def Classify(self, request, context):
        context.abort(Code.UNIMPLEMENTED, "Classify is not supported by this server")

    def Regress(self, request, context):
        context.abort(Code.UNIMPLEMENTED, "Regress is not supported by this server")

    def MultiInference(self, request, context):
        context.abort(Code.UNIMPLEMENTED, "MultiInference is not supported by this server")


class _ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, standin: TFServingStandIn) -> None:
        self.standin = standin

    def GetModelStatus(self, request, context):
        version, label = _spec_choice(request.model_spec)
        try:
            versions = self.standin.manager.status(request.model_spec.name, version, label)
        except ServingStatus as exc:
            context.abort(exc.code, exc.message)
        response = get_model_status_pb2.GetModelStatusResponse()
        for v in versions:
            _add_status(response, v)
        return response

    def HandleReloadConfigRequest(self, request, context):
        context.abort(Code.UNIMPLEMENTED, "config reload over gRPC is not supported by this server")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="TF Serving stand-in (gRPC + REST) for local tests"
    )
    parser.add_argument("--model-base", default="models")
    parser.add_argument("--grpc-port", type=int, default=8500)
    parser.add_argument("--rest-port", type=int, default=8501)
    parser.add_argument("--poll-seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    standin = TFServingStandIn(
        args.model_base,
        grpc_port=args.grpc_port,
        rest_port=args.rest_port,
        poll_s=args.poll_seconds,
    ).start()
    log.info("TF Serving stand-in: gRPC %s, REST %s", standin.grpc_address, standin.rest_url)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        standin.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
