"""``imgserve serve`` and ``imgserve grpc``: start the gateway's REST or gRPC server.

Each flag sets the ``IMGSERVE_*`` variable of its setting (``serving/settings.py``),
the settings are validated here so a bad value fails with a message instead of a
worker's traceback, and then this process *becomes* the server (``exec``): gunicorn
or the gRPC server gets the signals a process manager or a terminal sends, and its
exit status is the command's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import serving
from serving.settings import BACKENDS, ENV_PREFIX, Settings, SettingsError

#: The WSGI app gunicorn loads (the app factory, called once per worker).
APP = "serving.app:create_app()"
#: gunicorn's settings for the gateway, read from the installed package.
GUNICORN_CONF = Path(serving.__file__).parent / "gunicorn.conf.py"

EXIT_BAD_SETTING = 2


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags both servers take: the model repository and the backend."""
    parser.add_argument(
        "--model-base",
        dest="model_base",
        metavar="DIR",
        help="model repository (IMGSERVE_MODEL_BASE, default ./models)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help="where forward passes run (IMGSERVE_BACKEND, default embedded)",
    )


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``imgserve serve``; each one sets the gateway setting of its name."""
    parser.add_argument(
        "--bind",
        metavar="HOST:PORT",
        help="host:port to listen on (IMGSERVE_BIND, default 127.0.0.1:8080)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="gunicorn worker processes (IMGSERVE_WORKERS; default: one per core for the "
        "embedded backend, two per core for TF Serving)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="request threads per worker (IMGSERVE_THREADS, default 128)",
    )
    add_common_arguments(parser)
    parser.set_defaults(func=run_serve)


def add_grpc_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``imgserve grpc``; each one sets the gateway setting of its name."""
    parser.add_argument(
        "--bind",
        dest="grpc_bind",
        metavar="HOST:PORT",
        help="host:port to listen on (IMGSERVE_GRPC_BIND, default 127.0.0.1:9000)",
    )
    parser.add_argument(
        "--workers",
        dest="grpc_workers",
        type=int,
        metavar="N",
        help="server processes sharing the port (IMGSERVE_GRPC_WORKERS; default: as many "
        "as the REST gateway's workers; 1: no supervisor)",
    )
    parser.add_argument(
        "--metrics-bind",
        dest="grpc_metrics_bind",
        metavar="HOST:PORT",
        help="host:port of the process's /metrics, '' for none "
        "(IMGSERVE_GRPC_METRICS_BIND, default 127.0.0.1:9001)",
    )
    add_common_arguments(parser)
    parser.set_defaults(func=run_grpc)


#: The settings fields the server flags may set (argparse ``dest`` = field name).
SETTING_FLAGS = (
    "model_base",
    "backend",
    "bind",
    "workers",
    "threads",
    "grpc_bind",
    "grpc_workers",
    "grpc_metrics_bind",
)


def settings_environment(args: argparse.Namespace) -> dict[str, str]:
    """The ``IMGSERVE_*`` variables the given flags ask for (flags left out: none)."""
    return {
        ENV_PREFIX + name.upper(): str(getattr(args, name))
        for name in SETTING_FLAGS
        if getattr(args, name, None) is not None
    }


def _become(argv: list[str], args: argparse.Namespace, command: str) -> int:
    """Set the flags' variables, check the settings, and replace this process with ``argv``."""
    os.environ.update(settings_environment(args))
    try:
        Settings.from_env()
    except SettingsError as exc:
        print(f"imgserve {command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTING
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
    return 0  # not reached: exec does not return


def run_serve(args: argparse.Namespace) -> int:
    """Replace this process with gunicorn serving the REST gateway."""
    argv = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), APP]
    return _become(argv, args, "serve")


def run_grpc(args: argparse.Namespace) -> int:
    """Replace this process with the gRPC server (a supervisor of several, or one)."""
    return _become([sys.executable, "-m", "serving.api.grpc"], args, "grpc")
