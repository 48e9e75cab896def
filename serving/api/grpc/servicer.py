"""``imgserve.v1.ImageService``: request messages -> service layer -> response messages.

Errors leave with the status code of :mod:`serving.api.errors` and trailing
metadata ``http-status``, ``problem-code``, ``x-request-id`` and, for 429/503,
``retry-after`` (seconds) with ``grpc-retry-pushback-ms`` (the same delay in
milliseconds: the trailer gRPC's own retry policies read); a gateway bug is INTERNAL with the request id and no traceback.
Every line logged while a call is answered carries its ``request_id``, and each call ends
with one line in the access log (``serving.access``: method, code, duration_ms, peer).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from contract.logs import log_fields
from serving.api import errors
from serving.api.grpc.codec import (
    classify_message,
    detect_message,
    feedback_from_message,
    feedback_message,
    model_message,
    options_from_message,
)
from serving.proto import imgserve_pb2, imgserve_pb2_grpc
from serving.service import ACCESS_LOG, InferenceService, PredictOptions, request_id_from
from serving.service.feedback import give_feedback

log = logging.getLogger(__name__)

SERVICE_NAME = imgserve_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name
REQUEST_ID_KEY = "x-request-id"
#: The trailer gRPC's retry policy reads to delay (or, if negative, stop) retries.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
T = TypeVar("T")


class ImageServicer(imgserve_pb2_grpc.ImageServiceServicer):
    """``imgserve.v1.ImageService``: request messages -> service layer -> response messages."""

    def __init__(self, service: InferenceService, runner: CallRunner | None = None) -> None:
        self.service = service
        self.runner = runner or CallRunner(service)

    @property
    def finished(self) -> int:
        """Calls finished by every service sharing this servicer's runner."""
        return self.runner.finished

    def Classify(self, request: imgserve_pb2.ClassifyRequest, context: grpc.ServicerContext):
        def run(rid: str, options: PredictOptions) -> imgserve_pb2.ClassifyResponse:
            return classify_message(self.service.classify(list(request.images), options, rid))

        return self._predict("Classify", "classification", request, context, run)

    def Detect(self, request: imgserve_pb2.DetectRequest, context: grpc.ServicerContext):
        def run(rid: str, options: PredictOptions) -> imgserve_pb2.DetectResponse:
            return detect_message(self.service.detect(list(request.images), options, rid))

        return self._predict("Detect", "detection", request, context, run)

    def ListModels(self, request: imgserve_pb2.ListModelsRequest, context: grpc.ServicerContext):
        def run(outcome: dict[str, Any]) -> imgserve_pb2.ListModelsResponse:
            models = self.service.list_models()
            return imgserve_pb2.ListModelsResponse(models=[model_message(m) for m in models])

        return self._call("ListModels", context, run)

    def GetModel(self, request: imgserve_pb2.GetModelRequest, context: grpc.ServicerContext):
        def run(outcome: dict[str, Any]) -> imgserve_pb2.ModelInfo:
            outcome["model"] = self.service.known_model(request.name)
            return model_message(self.service.describe_model(request.name))

        return self._call("GetModel", context, run)

    def Feedback(self, request: imgserve_pb2.FeedbackRequest, context: grpc.ServicerContext):
        def run(outcome: dict[str, Any]) -> imgserve_pb2.FeedbackResponse:
            result = give_feedback(
                self.service, request.request_id, **feedback_from_message(request)
            )
            outcome["model"] = self.service.known_model(result.model)
            return feedback_message(result)

        return self._call("Feedback", context, run)

    # -- plumbing ------------------------------------------------------------------
    def _predict(
        self,
        method: str,
        task: str,
        request: Any,
        context: grpc.ServicerContext,
        run: Callable[[str, PredictOptions], T],
    ) -> T:
        def call(outcome: dict[str, Any]) -> T:
            options = options_from_message(request, task, context.time_remaining())
            outcome["model"] = self.service.known_model(self.service.model_for(task, options))
            return run(outcome["request_id"], options)

        return self._call(method, context, call)

    def _call(
        self, method: str, context: grpc.ServicerContext, body: Callable[[dict[str, Any]], T]
    ) -> T:
        return self.runner(f"/{SERVICE_NAME}/{method}", context, body)


class CallRunner:
    """Runs each call of the gateway's gRPC services: request id, metrics, error status.

    One runner is shared by every service of a server, so ``finished`` counts all
    their calls.
    """

    def __init__(self, service: InferenceService) -> None:
        self.service = service
        #: Calls finished, however they ended: the progress a worker's heartbeat looks
        #: at. Increments from several threads may race; it only has to change.
        self.finished = 0

    def __call__(
        self, method: str, context: grpc.ServicerContext, body: Callable[[dict[str, Any]], T]
    ) -> T:
        """Run ``body`` as the call ``method`` (its full path, the metrics' endpoint)."""
        metadata = dict(context.invocation_metadata() or ())
        rid = request_id_from(metadata.get(REQUEST_ID_KEY))
        context.send_initial_metadata(((REQUEST_ID_KEY, rid),))
        start = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN  # until the call says otherwise
        try:
            with (
                log_fields(request_id=rid),
                self.service.metrics.track(method) as outcome,
            ):
                outcome["request_id"] = rid
                try:
                    response = body(outcome)
                except Exception as exc:
                    if errors.resolve(exc) is None:
                        # A gateway bug: report it without a traceback to the client.
                        log.exception("unhandled error in %s (request id %s)", method, rid)
                        outcome["code"], code = 500, grpc.StatusCode.INTERNAL
                        context.abort(
                            grpc.StatusCode.INTERNAL, f"internal error (request id {rid})"
                        )
                    outcome["code"], code = errors.http_status(exc), errors.grpc_code(exc)
                    # Why the call failed, as the REST API logs it (serving/api/rest/problems.py).
                    log.log(
                        logging.INFO if outcome["code"] < 500 else logging.WARNING,
                        "%s: %s %s: %s",
                        method,
                        code.name,
                        errors.problem_code(exc),
                        errors.hidden_detail(exc) or errors.detail(exc),
                    )
                    _abort(context, exc, rid)
                outcome["code"], code = 200, grpc.StatusCode.OK
                return response
        finally:
            self.finished += 1
            if self.service.settings.access_log:
                _log_access(method, code, start, rid, context)


def _log_access(
    method: str, code: grpc.StatusCode, start: float, rid: str, context: grpc.ServicerContext
) -> None:
    """The call's access line (``method`` is its full path), in the REST access log's format."""
    ACCESS_LOG.info(
        "%s %s",
        method,
        code.name,
        extra={
            "method": method,
            "code": code.name,
            "duration_ms": round((time.perf_counter() - start) * 1000.0, 3),
            "peer": context.peer(),
            "request_id": rid,
        },
    )


def _abort(context: grpc.ServicerContext, exc: Exception, rid: str) -> None:
    """End the call with the error table's code for ``exc``, its detail and trailers."""
    trailing = [
        ("http-status", str(errors.http_status(exc))),
        ("problem-code", errors.problem_code(exc)),
        (REQUEST_ID_KEY, rid),
    ]
    retry_after = errors.retry_after(exc)
    if retry_after is not None:
        trailing.append(("retry-after", retry_after))
        # gRPC retry policies ignore retry-after; they honour this trailer instead.
        trailing.append((RETRY_PUSHBACK_KEY, str(int(retry_after) * 1000)))
    context.set_trailing_metadata(tuple(trailing))
    context.abort(errors.grpc_code(exc), errors.detail(exc))
