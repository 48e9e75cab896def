"""Start ``mlserver start`` on this folder with the bench's port and model version.

MLServer reads its ports, its parallel workers and each model's ``parameters.uri`` from ``MLSERVER_*``
environment variables where ``settings.json`` / ``model-settings.json`` leave them out;
this sets them (gRPC on a free port of its own, so peers never collide) and hands over
to MLServer's own CLI.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--workers", type=int, default=2, help="parallel inference workers")
    args = parser.parse_args()
    here = Path(__file__).resolve().parent
    os.environ.update(
        MLSERVER_HOST="127.0.0.1",
        MLSERVER_HTTP_PORT=str(args.port),
        MLSERVER_GRPC_PORT=str(free_port()),
        MLSERVER_PARALLEL_WORKERS=str(args.workers),
        MLSERVER_MODEL_URI=str(Path(args.model_dir).resolve()),
    )
    os.chdir(here)
    from mlserver.cli.main import main as mlserver_main

    sys.argv = ["mlserver", "start", str(here)]
    mlserver_main()


if __name__ == "__main__":
    main()
