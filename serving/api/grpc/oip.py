"""``inference.GRPCInferenceService``: the Open Inference Protocol v2 over gRPC.

Messages -> :mod:`serving.api.oip` -> messages, run by the same
:class:`~serving.api.grpc.servicer.CallRunner` as ``imgserve.v1.ImageService``
(request id, metrics, the error table's status codes and trailers). Tensors come
as typed ``contents`` or in ``raw_input_contents`` (BYTES elements with 4-byte
little-endian length prefixes, as tritonclient sends them); outputs always leave
in ``raw_output_contents``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from serving.api import oip
from serving.api.grpc.servicer import CallRunner
from serving.errors import BadRequest
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.service import InferenceService

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
#: The typed-contents field of each datatype.
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over the gateway's service layer."""

    def __init__(self, service: InferenceService, runner: CallRunner) -> None:
        self.service = service
        self.runner = runner

    def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.ServicerContext):
        return self._call("ServerLive", context, lambda _: pb.ServerLiveResponse(live=True))

    def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.ServicerContext):
        def run(_: dict[str, Any]) -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self.service.readiness()[0])

        return self._call("ServerReady", context, run)

    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext):
        def run(outcome: dict[str, Any]) -> pb.ModelReadyResponse:
            outcome["model"] = self.service.known_model(request.name)
            ready = oip.model_ready(self.service, request.name, request.version)
            return pb.ModelReadyResponse(ready=ready)

        return self._call("ModelReady", context, run)

    def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext):
        return self._call(
            "ServerMetadata", context, lambda _: pb.ServerMetadataResponse(**oip.server_metadata())
        )

    def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext):
        def run(outcome: dict[str, Any]) -> pb.ModelMetadataResponse:
            outcome["model"] = self.service.known_model(request.name)
            meta = oip.model_metadata(self.service, request.name, request.version)
            tensors = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[tensors(**t) for t in meta["inputs"]],
                outputs=[tensors(**t) for t in meta["outputs"]],
            )

        return self._call("ModelMetadata", context, run)

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext):
        def run(outcome: dict[str, Any]) -> pb.ModelInferResponse:
            outcome["model"] = self.service.known_model(request.model_name)
            remaining = context.time_remaining()
            timeout = remaining if remaining is not None and remaining > 0 else None
            req = infer_request(request, timeout)
            result = oip.infer(self.service, req, outcome["request_id"])
            return infer_response(result)

        return self._call("ModelInfer", context, run)

    def _call(self, method: str, context: grpc.ServicerContext, body: Any) -> Any:
        return self.runner(f"/{SERVICE_NAME}/{method}", context, body)


def parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """Plain Python values of a message's parameters."""
    values = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(param, choice)
    return values


def infer_request(
    request: pb.ModelInferRequest, timeout_s: float | None = None
) -> oip.InferRequest:
    """The transport-free request of a ModelInferRequest (raw or typed tensor contents)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
            "give one per input, in the order of inputs"
        )
    inputs = []
    for i, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        if raw:
            inputs.append(oip.input_from_raw(tensor.name, tensor.datatype, shape, raw[i]))
            continue
        field = _CONTENTS.get(tensor.datatype)
        if field is None:
            raise BadRequest(
                f"input {tensor.name!r}: datatype {tensor.datatype or '(none)'!r} "
                "has no typed contents; send it in raw_input_contents"
            )
        values = list(getattr(tensor.contents, field))
        inputs.append(oip.input_from_values(tensor.name, tensor.datatype, shape, values))
    return oip.InferRequest(
        model=request.model_name,
        version=request.model_version,
        id=request.id,
        inputs=inputs,
        outputs=[o.name for o in request.outputs],
        parameters=parameters(request.parameters),
        timeout_s=timeout_s,
    )


def infer_response(result: oip.InferResponse) -> pb.ModelInferResponse:
    """The ModelInferResponse of a result, every output in ``raw_output_contents``."""
    return pb.ModelInferResponse(
        model_name=result.model_name,
        model_version=result.model_version,
        id=result.id,
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(
                name=t.name, datatype=t.datatype, shape=list(t.shape)
            )
            for t in result.outputs
        ],
        raw_output_contents=[oip.raw_contents(t) for t in result.outputs],
    )
