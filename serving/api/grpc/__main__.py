"""The gateway's gRPC server: ``python -m serving.api.grpc`` (``IMGSERVE_GRPC_BIND``, :9000).

``imgserve.v1.ImageService`` (``serving/proto/imgserve.proto``) over the same
service layer as the REST API, plus gRPC health checking and server reflection
(:mod:`serving.api.grpc.server`). Errors carry the status code of the error table
(``serving/api/errors.py``) and trailing metadata ``http-status``,
``problem-code`` and, for 429/503, ``retry-after``.

``--workers N`` / ``IMGSERVE_GRPC_WORKERS`` (default: as many as the HTTP gateway's
workers): with N > 1 this process supervises N server processes on the same port
(``serving/api/grpc/supervisor.py``); with 1 it is the server itself.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from contract.logs import configure_logging
from contract.tf_environment import prepare_tensorflow_environment
from serving.api.grpc.supervisor import Heartbeat, Supervisor, exit_with_supervisor, report_ready
from serving.settings import Settings, SettingsError, split_host_port

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Run the gRPC gateway until SIGTERM/SIGINT: one server process, or a supervisor of N."""
    parser = argparse.ArgumentParser(
        prog="python -m serving.api.grpc", description=__doc__.splitlines()[0]
    )
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
    # JSON lines; several processes write to one log, and each line's "process" says which.
    configure_logging(settings.log_level)
    # Before TensorFlow is imported here or in the workers, which inherit the environment.
    prepare_tensorflow_environment()
    if worker:
        exit_with_supervisor(args.worker_of)
    elif count > 1:
        # No TensorFlow, no gRPC server or channel in this process: it only supervises.
        return Supervisor(settings, count).run()
    # Imported here, not above: the server module loads TensorFlow, and a supervisor
    # holds none (its workers are fresh interpreters that load their own).
    from serving.api.grpc.server import start_gateway

    # The TensorFlow pools size for this process's share of the cores (all of them
    # when it is the only one).
    settings = settings.grpc_process_settings()
    gateway = start_gateway(settings, reuse_port=worker)
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
    gateway.service.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
