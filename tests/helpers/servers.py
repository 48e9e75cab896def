"""Real server processes for integration tests: start, wait, stop, ports, children."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
GUNICORN = str(Path(PYTHON).parent / "gunicorn")


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> set[int]:
    """The live (not zombie) child processes of ``pid``, read from ``/proc``."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        if int(ppid) == pid and state != "Z":
            children.add(int(stat.parent.name))
    return children


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Poll ``predicate`` every 50 ms until it holds (True) or ``timeout`` passes (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in the repository root with ``env`` over a clean environment, logging to ``log``.

    The child inherits ``PYTHONPATH``, so a server imports the same checkout as the tests.
    """
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSERVE_")}
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    full_env.update(env)
    return subprocess.Popen(
        cmd, cwd=ROOT, env=full_env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def stop(proc: subprocess.Popen, timeout: float = 40) -> int:
    """SIGTERM ``proc`` and wait for its exit status (kill it, and fail, after ``timeout``)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Wait until ``url`` answers 200; fail with the log tail if ``proc`` exits or time runs out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise AssertionError(f"not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def gunicorn(model_base: Path, tmp: Path, **env: str) -> tuple[subprocess.Popen, str, Path]:
    """The gateway under gunicorn on a free loopback port, ready: (process, base URL, log).

    ``env``: extra settings, ``IMGSERVE_<KEY>`` for each ``key=value``.
    """
    port = free_port()
    log = tmp / f"gunicorn-{port}.log"
    settings = {"IMGSERVE_MODEL_BASE": str(model_base), "IMGSERVE_BIND": f"127.0.0.1:{port}"}
    settings.update({f"IMGSERVE_{k.upper()}": v for k, v in env.items()})
    proc = start(
        [GUNICORN, "-c", "serving/gunicorn.conf.py", "serving.app:create_app()"], settings, log
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/readyz", proc, log)
    return proc, url, log


def wait_grpc_ready(address: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Wait until the gRPC server at ``address`` reports SERVING on its health service;
    fail with the log tail if ``proc`` exits or time runs out."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{log.read_text()[-3000:]}")
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    raise AssertionError(f"not SERVING after {timeout}s:\n{log.read_text()[-3000:]}")


def grpc_server(model_base: Path, tmp: Path, **env: str) -> tuple[subprocess.Popen, str, Path]:
    """One gRPC server process (``python -m serving.api.grpc``) on a free loopback port,
    SERVING: (process, address, log). ``env`` as for :func:`gunicorn`."""
    port = free_port()
    log = tmp / f"grpc-{port}.log"
    settings = {
        "IMGSERVE_MODEL_BASE": str(model_base),
        "IMGSERVE_GRPC_BIND": f"127.0.0.1:{port}",
        "IMGSERVE_GRPC_METRICS_BIND": f"127.0.0.1:{free_port()}",
        "IMGSERVE_GRPC_WORKERS": "1",
    }
    settings.update({f"IMGSERVE_{k.upper()}": v for k, v in env.items()})
    proc = start([PYTHON, "-m", "serving.api.grpc"], settings, log)
    address = f"127.0.0.1:{port}"
    try:
        wait_grpc_ready(address, proc, log)
    except AssertionError:
        stop(proc)
        raise
    return proc, address, log
