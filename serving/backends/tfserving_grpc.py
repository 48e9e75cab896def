"""The ``tfserving-grpc`` backend: TF Serving's ``PredictionService`` and ``ModelService``.

- ``Predict`` with the call's remaining deadline, ``ModelSpec`` naming the exact
  version the gateway preprocessed for (the gateway resolves version labels from
  the same ``models.config`` and moves a label only once TF Serving reports the
  target AVAILABLE, so the card used for preprocessing is always the answering
  version's), output tensors sent as raw ``tensor_content``;
- ``GetModelStatus`` on every poll for readiness and the versions in service;
- ``GetModelMetadata`` once per version, checked against the model card.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

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
from serving.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ServiceUnavailable,
    ServingError,
)
from serving.settings import Settings

#: Reconnect backoff bounds (ms). gRPC's defaults grow 1.6x per failed attempt up to
#: 120 s, so after a long TF Serving outage the channel could sit in TRANSIENT_FAILURE
#: (fast 502s) for tens of seconds after TF Serving is back; with a 1 s ceiling it
#: retries at least once a second and recovers within about a second.
RECONNECT_BACKOFF_MS = {"initial": 100, "min": 100, "max": 1000}
_CHANNEL_OPTIONS = [
    # Batches of images are large; TF Serving itself accepts messages up to 2 GiB.
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS["initial"]),
    ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS["min"]),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS["max"]),
]
_NUMPY = {
    types_pb2.DT_FLOAT: np.float32,
    types_pb2.DT_DOUBLE: np.float64,
    types_pb2.DT_INT32: np.int32,
    types_pb2.DT_INT64: np.int64,
}
_VAL_FIELDS = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_INT64: "int64_val",
}


def to_tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    """float32 ndarray -> TensorProto with raw ``tensor_content`` (no per-element encoding)."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape]
    )
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, tensor_shape=shape, tensor_content=array.tobytes()
    )


def from_tensor_proto(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """TensorProto (``tensor_content`` or typed ``*_val`` fields) -> ndarray."""
    dtype = _NUMPY.get(proto.dtype)
    if dtype is None:
        raise BackendError(f"unexpected output dtype {types_pb2.DataType.Name(proto.dtype)}")
    shape = [d.size for d in proto.tensor_shape.dim]
    if proto.tensor_content:
        return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape).copy()
    values = np.asarray(getattr(proto, _VAL_FIELDS[proto.dtype]), dtype=dtype)
    count = int(np.prod(shape)) if shape else 1
    if values.size == count:
        return values.reshape(shape)
    if values.size == 1:  # TF's compact encoding of a constant-filled tensor
        return np.full(shape, values[0], dtype=dtype)
    raise BackendError(f"tensor with shape {shape} carries {values.size} values")


def map_rpc_error(exc: grpc.RpcError, address: str) -> ServingError:
    """A failed TF Serving call -> the gateway's error (whose fault, and retryable or not)."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return BackendTimeout(f"TF Serving did not answer in time: {details}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return unreachable(address, details)
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND):
        # TF Serving's queue is full, or it unloaded the version since the last poll.
        return ServiceUnavailable(f"TF Serving: {details}", retry_after=1)
    # The gateway built the request from the model card, so anything else is not the
    # client's fault: a model/card mismatch or a TF Serving failure.
    return BackendError(f"TF Serving {code.name}: {details}")


class GrpcServable(Servable):
    """Forwards batches to ``PredictionService.Predict`` for one version."""

    def __init__(
        self,
        mv: ModelVersion,
        stub: prediction_service_pb2_grpc.PredictionServiceStub,
        address: str,
    ) -> None:
        super().__init__(mv)
        self._stub = stub
        self._address = address

    def predict(
        self, images: np.ndarray, *, timeout: float, request_ids: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        mv = self.model
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=mv.name, signature_name=mv.signature_name)
        )
        request.model_spec.version.value = mv.version
        request.inputs[mv.input_name].CopyFrom(to_tensor_proto(images))
        metadata = (
            [("x-request-id", ",".join(request_ids[:FORWARDED_IDS]))] if request_ids else None
        )
        try:
            response = self._stub.Predict(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, self._address) from None
        if response.model_spec.version.value not in (0, mv.version):
            raise BackendError(
                f"TF Serving answered with version {response.model_spec.version.value}, "
                f"asked for {mv.version}"
            )
        return {k: from_tensor_proto(v) for k, v in response.outputs.items()}


class TFServingGrpcBackend(RemoteBackend):
    """TF Serving over gRPC (``IMGSERVE_TFSERVING_GRPC``)."""

    name = "tfserving-grpc"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.address = settings.tfserving_grpc
        self._channel = grpc.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def fetch_status(self, name: str) -> list[VersionStatus]:
        request = get_model_status_pb2.GetModelStatusRequest(
            model_spec=model_pb2.ModelSpec(name=name)
        )
        try:
            response = self._models.GetModelStatus(request, timeout=CONTROL_TIMEOUT_S)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return []  # TF Serving has not loaded any version of it (yet)
            raise unreachable(self.address, f"{exc.code().name}: {exc.details()}") from None
        state_name = get_model_status_pb2.ModelVersionStatus.State.Name
        return [
            VersionStatus(int(s.version), state_name(s.state), s.status.error_message)
            for s in response.model_version_status
        ]

    def fetch_signature(self, mv: ModelVersion) -> SignatureSpec:
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=model_pb2.ModelSpec(name=mv.name), metadata_field=["signature_def"]
        )
        request.model_spec.version.value = mv.version
        try:
            response = self._predict.GetModelMetadata(request, timeout=CONTROL_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise BackendUnavailable(
                f"GetModelMetadata({mv.name}/{mv.version}): {exc.code().name}: {exc.details()}"
            ) from None
        sigmap = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(sigmap)
        sig = sigmap.signature_def.get(mv.signature_name)
        if sig is None:
            return SignatureSpec({}, {})

        def spec(info) -> TensorSpec:
            shape = None
            if not info.tensor_shape.unknown_rank:
                shape = tuple(int(d.size) for d in info.tensor_shape.dim)
            return TensorSpec(types_pb2.DataType.Name(info.dtype), shape)

        return SignatureSpec(
            {k: spec(v) for k, v in sig.inputs.items()},
            {k: spec(v) for k, v in sig.outputs.items()},
        )

    def make_servable(self, mv: ModelVersion) -> GrpcServable:
        return GrpcServable(mv, self._predict, self.address)

    def close(self) -> None:
        self._channel.close()
