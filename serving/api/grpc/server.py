"""The gateway's gRPC server: ``python -m serving.api.grpc`` (``IMGSERVE_GRPC_BIND``, :9000).

``imgserve.v1.ImageService`` (``serving/proto/imgserve.proto``, answered by
:mod:`serving.api.grpc.servicer`) over the same service layer as the REST API,
plus gRPC health checking (``grpc.health.v1``, SERVING once a model version is
loaded) and server reflection. The process exposes its Prometheus metrics on
``IMGSERVE_GRPC_METRICS_BIND`` (same names as the REST gateway; ``endpoint`` is
the gRPC method).

``--workers N`` / ``IMGSERVE_GRPC_WORKERS`` (default: as many as the HTTP gateway's
workers): with N > 1 this process supervises N server processes on the same port
(``serving/api/grpc/supervisor.py``); with 1 it is the server itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from concurrent import futures
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection  # noqa: E402
from prometheus_client import CollectorRegistry, make_wsgi_app, start_http_server  # noqa: E402

from serving.api.grpc.servicer import SERVICE_NAME, ImageServicer  # noqa: E402
from serving.proto import imgserve_pb2_grpc  # noqa: E402
from serving.service import InferenceService  # noqa: E402
from serving.settings import Settings, SettingsError, split_host_port  # noqa: E402

log = logging.getLogger(__name__)


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
    # Set by the supervisor for its workers (serving/api/grpc/supervisor.py).
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
        from serving.api.grpc.supervisor import exit_with_supervisor

        exit_with_supervisor(args.worker_of)
    elif count > 1:
        # No TensorFlow, no gRPC server or channel in this process: it only supervises.
        from serving.api.grpc.supervisor import Supervisor

        return Supervisor(settings, count).run()
    # The TensorFlow pools size for this process's share of the cores (all of them
    # when it is the only one).
    settings = settings.grpc_process_settings()
    from serving.backends import create_backend
    from serving.observers.wiring import attach

    service = InferenceService(settings, create_backend(settings)).start()
    attach(service, settings)
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
        from serving.api.grpc.supervisor import Heartbeat, report_ready

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
