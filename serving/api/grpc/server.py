"""One gRPC server process of the gateway (started by ``python -m serving.api.grpc``).

``imgserve.v1.ImageService`` (``serving/proto/imgserve.proto``, answered by
:mod:`serving.api.grpc.servicer`) and the Open Inference Protocol's
``inference.GRPCInferenceService`` (``serving/proto/grpc_predict_v2.proto``,
:mod:`serving.api.grpc.oip`) over the same service layer as the REST API,
plus gRPC health checking (``grpc.health.v1``, SERVING once a model version is
loaded) and server reflection. The process exposes its Prometheus metrics on
``IMGSERVE_GRPC_METRICS_BIND`` (same names as the REST gateway; ``endpoint`` is
the gRPC method).

Importing this module loads TensorFlow (service layer, backends, observers): the
supervisor of several server processes never imports it.
"""

from __future__ import annotations

import socket
import threading
from concurrent import futures
from typing import Any

from contract.tf_environment import import_tensorflow, prepare_tensorflow_environment

prepare_tensorflow_environment()
import_tensorflow()  # first, so that its C++ start-up lines become log records

import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection  # noqa: E402
from prometheus_client import CollectorRegistry, make_wsgi_app, start_http_server  # noqa: E402

from serving.api.grpc import oip  # noqa: E402
from serving.api.grpc.servicer import SERVICE_NAME, ImageServicer  # noqa: E402
from serving.backends import create_backend  # noqa: E402
from serving.observers.wiring import attach  # noqa: E402
from serving.proto import grpc_predict_v2_pb2_grpc, imgserve_pb2_grpc  # noqa: E402
from serving.service import InferenceService  # noqa: E402
from serving.settings import Settings, split_host_port  # noqa: E402


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
        # The Open Inference Protocol beside it, over the same service and call runner.
        self.inference_servicer = oip.InferenceServicer(service, self.servicer.runner)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            self.inference_servicer, self.server
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, oip.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.server,
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
        for name in ("", SERVICE_NAME, oip.SERVICE_NAME):
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


def start_gateway(settings: Settings, *, reuse_port: bool = False) -> GrpcGateway:
    """The service (backend, observers, metrics endpoint) and its gRPC server, started.

    ``reuse_port``: a supervisor's worker, sharing the gRPC and metrics ports with
    its siblings. Stop it with :meth:`GrpcGateway.stop`, then close ``gateway.service``.
    """
    service = InferenceService(settings, create_backend(settings)).start()
    attach(service, settings)
    if settings.grpc_metrics_bind:
        start_metrics_server(
            service.metrics.scrape_registry(), settings.grpc_metrics_bind, reuse_port=reuse_port
        )
    return GrpcGateway(
        service, settings.grpc_bind, max_workers=settings.grpc_max_workers, reuse_port=reuse_port
    ).start()
