"""The gateway's gRPC server: ``python -m serving.grpc_server`` (``IMGSERVE_GRPC_BIND``, :9000).

``imgserve.v1.ImageService`` (``serving/proto/imgserve.proto``) over the same
service layer as the REST API, plus gRPC health checking (``grpc.health.v1``,
SERVING once a model version is loaded) and server reflection. Errors carry the
status code from ``serving/errors.py`` and trailing metadata ``http-status``,
``problem-code`` and, for 429/503, ``retry-after``. The process exposes its
Prometheus metrics on ``IMGSERVE_GRPC_METRICS_BIND`` (same names as the REST
gateway; ``endpoint`` is the gRPC method).

``--workers N`` / ``IMGSERVE_GRPC_WORKERS`` (default: as many as the HTTP gateway's
workers): with N > 1 this process supervises N server processes on the same port
(``serving/grpc_supervisor.py``); with 1 it is the server itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection  # noqa: E402
from prometheus_client import CollectorRegistry, make_wsgi_app, start_http_server  # noqa: E402

from serving.errors import ServingError  # noqa: E402
from serving.proto import imgserve_pb2, imgserve_pb2_grpc  # noqa: E402
from serving.service import (  # noqa: E402
    ClassifyResult,
    DetectResult,
    InferenceService,
    PredictOptions,
    request_id_from,
)
from serving.settings import Settings, SettingsError, split_host_port  # noqa: E402

log = logging.getLogger(__name__)

SERVICE_NAME = imgserve_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name
REQUEST_ID_KEY = "x-request-id"
T = TypeVar("T")


class ImageServicer(imgserve_pb2_grpc.ImageServiceServicer):
    """``imgserve.v1.ImageService``: request messages -> service layer -> response messages."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service
        #: Calls finished, however they ended: the progress a worker's heartbeat looks
        #: at. Increments from several threads may race; it only has to change.
        self.finished = 0

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
        metadata = dict(context.invocation_metadata() or ())
        rid = request_id_from(metadata.get(REQUEST_ID_KEY))
        context.send_initial_metadata(((REQUEST_ID_KEY, rid),))
        try:
            with self.service.metrics.track(f"/{SERVICE_NAME}/{method}") as outcome:
                outcome["request_id"] = rid
                try:
                    response = body(outcome)
                except ServingError as exc:
                    outcome["code"] = exc.status
                    _abort(context, exc, rid)
                except Exception:  # a gateway bug: report it without a traceback to the client
                    log.exception("unhandled error in %s (request id %s)", method, rid)
                    outcome["code"] = 500
                    context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})")
                outcome["code"] = 200
                return response
        finally:
            self.finished += 1


def _abort(context: grpc.ServicerContext, exc: ServingError, rid: str) -> None:
    trailing = [("http-status", str(exc.status)), ("problem-code", exc.code), (REQUEST_ID_KEY, rid)]
    if exc.retry_after is not None:
        trailing.append(("retry-after", str(max(1, round(exc.retry_after)))))
    context.set_trailing_metadata(tuple(trailing))
    context.abort(exc.grpc_code, exc.detail)


def options_from_message(request: Any, task: str, time_remaining: float | None) -> PredictOptions:
    """:class:`PredictOptions` from a Classify/DetectRequest and the call's deadline."""
    selector = request.model
    choice = selector.WhichOneof("version_choice")
    return PredictOptions(
        model=selector.name or None,
        version=selector.version if choice == "version" else None,
        label=selector.label if choice == "label" else None,
        top_k=request.top_k if task == "classification" and request.HasField("top_k") else None,
        score_threshold=(request.score_threshold if request.HasField("score_threshold") else None),
        max_detections=(
            request.max_detections
            if task == "detection" and request.HasField("max_detections")
            else None
        ),
        timeout_s=time_remaining if time_remaining is not None and time_remaining > 0 else None,
    )


def _model_ref(ref: Any) -> imgserve_pb2.ModelRef:
    return imgserve_pb2.ModelRef(name=ref.name, version=ref.version, labels=ref.labels)


def classify_message(result: ClassifyResult) -> imgserve_pb2.ClassifyResponse:
    return imgserve_pb2.ClassifyResponse(
        request_id=result.request_id,
        model=_model_ref(result.model),
        predictions=[
            imgserve_pb2.Classification(
                classes=[
                    imgserve_pb2.ClassScore(label=c.label, index=c.index, score=c.score)
                    for c in classes
                ]
            )
            for classes in result.predictions
        ],
    )


def detect_message(result: DetectResult) -> imgserve_pb2.DetectResponse:
    return imgserve_pb2.DetectResponse(
        request_id=result.request_id,
        model=_model_ref(result.model),
        predictions=[
            imgserve_pb2.ImageDetections(
                width=image.width,
                height=image.height,
                detections=[
                    imgserve_pb2.Detection(
                        label=d.label,
                        index=d.index,
                        score=d.score,
                        box=imgserve_pb2.Box(
                            ymin=d.box[0], xmin=d.box[1], ymax=d.box[2], xmax=d.box[3]
                        ),
                    )
                    for d in image.detections
                ],
            )
            for image in result.detections
        ],
    )


def model_message(model: dict[str, Any]) -> imgserve_pb2.ModelInfo:
    return imgserve_pb2.ModelInfo(
        name=model["name"],
        task=model["task"] or "",
        default_version=model["default_version"] or 0,
        version_labels=model["version_labels"],
        class_labels=model["class_labels"],
        versions=[
            imgserve_pb2.VersionInfo(
                version=v["version"],
                state=v["state"],
                labels=v["labels"],
                error=v.get("error", ""),
                model_card_json=json.dumps(v["model_card"]) if "model_card" in v else "",
            )
            for v in model["versions"]
        ],
    )


class GrpcGateway:
    """A running gRPC server: the servicer, health, reflection, and its readiness watcher."""

    def __init__(
        self, service: InferenceService, bind: str, *, max_workers: int, reuse_port: bool = False
    ) -> None:
        """``reuse_port``: share ``bind`` with the other workers of a supervisor (SO_REUSEPORT);
        off, a second server on the same port fails to start instead."""
        self.service = service
        settings = service.settings
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
            # Beyond this many calls in flight gRPC answers RESOURCE_EXHAUSTED at once
            # instead of queueing calls no thread is free to take.
            maximum_concurrent_rpcs=max_workers,
            options=[
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                ("grpc.so_reuseport", 1 if reuse_port else 0),
            ],
        )
        self.servicer = ImageServicer(service)
        imgserve_pb2_grpc.add_ImageServiceServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self.server.add_insecure_port(bind)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {bind}")
        #: A port of this process alone (``reuse_port``: the shared one may be answered by
        #: any worker), where its supervisor heartbeat checks this server's health.
        self.own_address: str | None = None
        if reuse_port:
            own = self.server.add_insecure_port("127.0.0.1:0")
            if own == 0:
                raise OSError("cannot bind the gRPC worker's own loopback port")
            self.own_address = f"127.0.0.1:{own}"
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="grpc-health", daemon=True)

    def start(self) -> GrpcGateway:
        self._update_health()
        self.server.start()
        self._watcher.start()
        return self

    def _update_health(self) -> None:
        ready, _ = self.service.readiness()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            self._update_health()

    def stop(self, grace: float = 10.0) -> None:
        """Report NOT_SERVING, stop taking calls, let calls in flight finish within ``grace``."""
        self._stop.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def start_metrics_server(
    registry: CollectorRegistry, address: str, *, reuse_port: bool = False
) -> None:
    """Serve ``registry`` at ``http://address/metrics`` from a daemon thread.

    ``reuse_port``: bind with SO_REUSEPORT, so that every worker of a supervisor
    listens on the same metrics address and any of them answers a scrape (each
    merges every worker's samples, as a gunicorn worker does for ``/metrics``).
    """
    host, port = split_host_port(address, "grpc_metrics_bind")
    if not reuse_port:
        start_http_server(port, addr=host, registry=registry)
        return
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer

    class SharedPortServer(ThreadingWSGIServer):
        allow_reuse_port = True
        address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # no access log per scrape
            pass

    httpd = make_server(
        host, port, make_wsgi_app(registry), SharedPortServer, handler_class=QuietHandler
    )
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Run the gRPC gateway until SIGTERM/SIGINT: one server process, or a supervisor of N."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", help="host:port (default IMGSERVE_GRPC_BIND)")
    parser.add_argument(
        "--workers",
        type=int,
        help="server processes on the same port (default IMGSERVE_GRPC_WORKERS; "
        "0: as many as the HTTP gateway's workers)",
    )
    # Set by the supervisor for its workers (serving/grpc_supervisor.py).
    parser.add_argument("--worker-of", type=int, metavar="PID", help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--heartbeat-s", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides: dict[str, object] = {}
    if args.bind:
        split_host_port(args.bind, "--bind")
        overrides["grpc_bind"] = args.bind
    if args.workers is not None:
        if args.workers < 0:
            parser.error("--workers must be >= 0")
        overrides["grpc_workers"] = args.workers
    try:
        settings = Settings.from_env(**overrides)
    except SettingsError as exc:
        parser.error(str(exc))  # exit 2 with the message, not a traceback
    worker = args.worker_of is not None
    count = settings.grpc_worker_count()
    # Several processes write to one log: each line says which (as gunicorn's do).
    pid = " [%(process)d]" if worker or count > 1 else ""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s{pid} %(name)s: %(message)s"
    )
    if worker:
        from serving.grpc_supervisor import exit_with_supervisor

        exit_with_supervisor(args.worker_of)
    elif count > 1:
        # No TensorFlow, no gRPC server or channel in this process: it only supervises.
        from serving.grpc_supervisor import Supervisor

        return Supervisor(settings, count).run()
    # The TensorFlow pools size for this process's share of the cores (all of them
    # when it is the only one).
    settings = settings.grpc_process_settings()
    from serving import monitoring
    from serving.backends import create_backend

    service = InferenceService(settings, create_backend(settings)).start()
    monitoring.attach(service, settings)
    if settings.grpc_metrics_bind:
        start_metrics_server(
            service.metrics.scrape_registry(), settings.grpc_metrics_bind, reuse_port=worker
        )
    gateway = GrpcGateway(
        service, settings.grpc_bind, max_workers=settings.grpc_max_workers, reuse_port=worker
    ).start()
    log.info(
        "gRPC gateway on %s (port %d), backend %s",
        settings.grpc_bind,
        gateway.port,
        settings.backend,
    )
    done = threading.Event()

    def shutdown(signum: int, frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        done.set()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    if args.ready_fd is not None:
        from serving.grpc_supervisor import Heartbeat, report_ready

        report_ready(args.ready_fd)
        if gateway.own_address and args.heartbeat_s:
            Heartbeat(
                args.ready_fd,
                gateway.own_address,
                args.heartbeat_s,
                lambda: gateway.servicer.finished,
            ).start(done)
    done.wait()
    gateway.stop()
    service.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
