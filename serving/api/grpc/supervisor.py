"""Several gRPC server processes on one port, the way gunicorn runs the HTTP gateway's workers.

``python -m serving.api.grpc --workers N`` (or ``IMGSERVE_GRPC_WORKERS=N``) with N > 1
makes the process started a supervisor of N workers:

- The supervisor imports no TensorFlow and creates no gRPC server or channel (neither
  survives a fork). Its workers are fresh interpreters, ``python -m serving.api.grpc
  --worker-of PID``, each with its own service layer, backend, and TensorFlow pools sized
  as one of N processes (:meth:`Settings.grpc_process_settings`).
- Every worker listens on ``IMGSERVE_GRPC_BIND`` with SO_REUSEPORT; the kernel spreads
  *connections* over them, so one client channel (one HTTP/2 connection) talks to one
  worker. Before starting any, the supervisor checks that nothing listens there already:
  SO_REUSEPORT would otherwise quietly share the port with a leftover server.
- Metrics: Prometheus multiprocess mode, as under gunicorn (``serving/metrics_dir.py``):
  the supervisor gives its workers ``PROMETHEUS_MULTIPROC_DIR`` (a private one, removed
  at exit, when none is set) and marks each worker that exits as dead. Each worker
  serves the merged scrape on ``IMGSERVE_GRPC_METRICS_BIND`` (shared the same way), as
  any gunicorn worker answers ``/metrics``: the scrape-time series (model versions in
  service, drift, temperatures, calibration jobs) need a service layer, which the
  supervisor does not have.
- SIGTERM or SIGINT: every worker gets SIGTERM and stops gracefully (its own grace
  period for calls in flight); whatever still runs after ``grpc_stop_timeout_s`` (30 s)
  is killed.
  The supervisor then exits 0. A second signal kills the workers at once.
- A worker that exits on its own is replaced after a short back-off. A worker that
  exits before it reported ready is a start-up failure; ``STARTUP_FAILURE_LIMIT`` of them
  in a row (no worker became ready in between) stop the supervisor with exit status 1:
  a bad configuration does not fix itself, and a crash loop must not look like a server.
  Serving workers that keep dying are the same: more than ``RESTART_LIMIT`` exits within
  ``RESTART_WINDOW_S`` end it with exit status 1 too, and Kubernetes' restart back-off
  (CrashLoopBackOff) takes over, where an operator sees it.
- Hung workers: a serving worker checks its own server's health over a loopback port of
  its own every ``heartbeat_interval(timeout)`` and writes a byte on its pipe when the
  server answered (:class:`Heartbeat`). A worker silent for ``grpc_worker_timeout_s`` is
  killed (SIGKILL) and replaced, as gunicorn's ``timeout`` does. Silent means stopped,
  deadlocked, its GIL never released, or every thread taken by calls that never finish:
  a worker too busy to take the check (RESOURCE_EXHAUSTED) still counts as answering
  while its calls finish.
- Linux: a worker gets SIGTERM when its supervisor dies, even by SIGKILL
  (``PR_SET_PDEATHSIG``), so no worker is left holding the port.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serving.metrics_dir import MetricsDirectory
from serving.settings import Settings, split_host_port

log = logging.getLogger(__name__)

#: Start-up failures in a row (no worker ready in between) that end the supervisor.
STARTUP_FAILURE_LIMIT = 3
#: Back-off before replacing a worker: doubles with each start-up failure in a row.
RESTART_BACKOFF_S = 0.5
MAX_RESTART_BACKOFF_S = 10.0
#: After SIGKILL: how long to wait for the kernel to end a worker (D state aside, at once).
KILL_WAIT_S = 10.0
#: How often the supervisor looks at its workers (readiness, exits, due restarts).
POLL_INTERVAL_S = 0.1
#: Serving workers' exits within ``RESTART_WINDOW_S`` beyond which the supervisor gives up.
RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0
#: What a worker writes on its pipe once it serves, then after each answered health check.
READY = b"R"
BEAT = b"H"


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between a worker's health checks: several per timeout, at most 5 s apart."""
    return min(5.0, timeout_s / 4)


@dataclass
class _Worker:
    proc: subprocess.Popen
    #: Read end of the worker's pipe (ready, then heartbeats); None once it closed it.
    pipe_fd: int | None
    ready: bool = False
    #: monotonic time of its last sign of life (start, ready, heartbeat).
    last_beat: float = field(default_factory=time.monotonic)
    #: Killed as hung (and not yet reaped).
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid


class Supervisor:
    """Runs ``workers`` gRPC server processes on one address until SIGTERM/SIGINT."""

    def __init__(
        self,
        settings: Settings,
        workers: int,
        *,
        startup_failure_limit: int = STARTUP_FAILURE_LIMIT,
        restart_limit: int = RESTART_LIMIT,
        restart_window_s: float = RESTART_WINDOW_S,
    ) -> None:
        if workers < 2:
            raise ValueError("a supervisor runs at least 2 workers")
        self.settings = settings
        self.count = workers
        self.stop_timeout_s = settings.grpc_stop_timeout_s
        self.startup_failure_limit = startup_failure_limit
        self.worker_timeout_s = settings.grpc_worker_timeout_s
        self.serving_exits = ExitWindow(restart_limit, restart_window_s)
        self.workers: list[_Worker] = []
        self._restarts: list[float] = []  # monotonic times at which to start a replacement
        self._startup_failures = 0
        self._stop_signal: int | None = None
        self._kill_now = False
        self._metrics: MetricsDirectory | None = None

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> int:
        """Start the workers, keep them running, stop them on a signal; the exit status."""
        try:
            check_addresses_free(self.settings)
        except OSError as exc:
            log.error("%s", exc)
            return 1
        self._metrics = metrics = MetricsDirectory.from_environ()
        metrics.clear()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info(
            "gRPC supervisor: %d workers on %s, metrics on %s, backend %s, worker timeout "
            "%.0f s, metrics dir %s",
            self.count,
            self.settings.grpc_bind,
            self.settings.grpc_metrics_bind or "(none)",
            self.settings.backend,
            self.worker_timeout_s,
            metrics.path,
        )
        status = 0
        try:
            for _ in range(self.count):
                self._spawn()
            while self._stop_signal is None:
                self._read_pipes(POLL_INTERVAL_S)
                self._kill_hung()
                if not self._reap():
                    status = 1
                    break
                now = time.monotonic()
                while self._restarts and self._restarts[0] <= now:
                    self._restarts.pop(0)
                    self._spawn()
            if self._stop_signal is not None:
                log.info("gRPC supervisor: %s received", signal.Signals(self._stop_signal).name)
        finally:
            self._stop_all()
            metrics.remove()
        log.info("gRPC supervisor: stopped")
        return status

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only flags: the loop acts on them (logging here could deadlock on its lock).
        if self._stop_signal is None:
            self._stop_signal = signum
        else:
            self._kill_now = True

    # -- workers -----------------------------------------------------------------------
    def _spawn(self) -> None:
        read_fd, write_fd = os.pipe()
        cmd = [
            sys.executable,
            "-m",
            "serving.api.grpc",
            "--worker-of",
            str(os.getpid()),
            "--ready-fd",
            str(write_fd),
            "--workers",
            str(self.count),
            "--bind",
            self.settings.grpc_bind,
            "--heartbeat-s",
            str(heartbeat_interval(self.worker_timeout_s)),
        ]
        try:
            # Its own process group: a terminal's Ctrl-C reaches the supervisor only,
            # which stops the workers in order.
            proc = subprocess.Popen(cmd, pass_fds=(write_fd,), process_group=0)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.workers.append(_Worker(proc, read_fd))
        log.info("gRPC worker %d started", proc.pid)

    def _read_pipes(self, timeout: float) -> None:
        """Wait up to ``timeout`` for workers' messages: ready, heartbeats, or a closed pipe."""
        waiting = {w.pipe_fd: w for w in self.workers if w.pipe_fd is not None}
        if not waiting:
            time.sleep(timeout)
            return
        readable, _, _ = select.select(list(waiting), [], [], timeout)
        for fd in readable:
            worker = waiting[fd]
            try:
                message = os.read(fd, 4096)
            except OSError:
                message = b""
            if not message:  # closed: the worker is exiting (which _reap sees)
                self._close_pipe(worker)
                continue
            worker.last_beat = time.monotonic()
            if READY in message and not worker.ready:
                worker.ready = True
                self._startup_failures = 0
                log.info(
                    "gRPC worker %d ready; %d of %d workers serving",
                    worker.pid,
                    sum(w.ready for w in self.workers),
                    self.count,
                )

    def _kill_hung(self) -> None:
        """SIGKILL serving workers whose heartbeat stopped; _reap replaces them."""
        now = time.monotonic()
        for worker in self.workers:
            silent = now - worker.last_beat
            if not worker.ready or worker.killed or silent <= self.worker_timeout_s:
                continue
            log.error(
                "gRPC worker %d answered no health check for %.1f s (timeout %.0f s): killing it",
                worker.pid,
                silent,
                self.worker_timeout_s,
            )
            worker.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)

    def _exited(self) -> list[_Worker]:
        """Wait for every child that has exited: workers (returned), and any process
        reparented to the supervisor, as PID 1 of a container is (a calibration job
        whose worker died), which would otherwise stay a zombie."""
        by_pid = {w.pid: w for w in self.workers}
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in by_pid:
                by_pid[pid].proc.returncode = os.waitstatus_to_exitcode(status)
        return [w for w in self.workers if w.proc.returncode is not None]

    def _reap(self) -> bool:
        """Handle exited workers; False when start-up failed too often in a row, or serving
        workers exited too often within the window."""
        for worker in self._exited():
            self._forget(worker)
            code = worker.proc.returncode
            if not worker.ready:
                self._startup_failures += 1
                if self._startup_failures >= self.startup_failure_limit:
                    log.error(
                        "gRPC worker %d exited with %s during start-up: %d start-up failures "
                        "in a row, giving up (see the worker's log above)",
                        worker.pid,
                        describe_exit(code),
                        self._startup_failures,
                    )
                    return False
            elif self.serving_exits.add(time.monotonic()):
                log.error(
                    "gRPC worker %d exited with %s: %d serving workers exited within %.0f s, "
                    "giving up",
                    worker.pid,
                    describe_exit(code),
                    len(self.serving_exits.times),
                    self.serving_exits.window_s,
                )
                return False
            delay = min(MAX_RESTART_BACKOFF_S, RESTART_BACKOFF_S * 2**self._startup_failures)
            log.warning(
                "gRPC worker %d exited with %s%s; starting a replacement in %.1f s",
                worker.pid,
                describe_exit(code),
                " (hung)" if worker.killed else "" if worker.ready else " during start-up",
                delay,
            )
            self._restarts.append(time.monotonic() + delay)
            self._restarts.sort()
        return True

    def _forget(self, worker: _Worker) -> None:
        """Bookkeeping for a worker that has exited (and been waited for)."""
        self.workers.remove(worker)
        self._close_pipe(worker)
        if self._metrics is not None:
            self._metrics.mark_process_dead(worker.pid)

    @staticmethod
    def _close_pipe(worker: _Worker) -> None:
        if worker.pipe_fd is not None:
            with contextlib.suppress(OSError):
                os.close(worker.pipe_fd)
            worker.pipe_fd = None

    def _stop_all(self) -> None:
        """SIGTERM every worker, wait up to ``stop_timeout_s``, then SIGKILL the rest."""
        self._restarts.clear()
        if not self.workers:
            return
        log.info("gRPC supervisor: stopping %d worker(s)", len(self.workers))
        self._signal_all(signal.SIGTERM)
        self._wait_all(self.stop_timeout_s, interruptible=True)
        if self.workers:
            for worker in self.workers:
                log.warning("gRPC worker %d still running: killing it", worker.pid)
            self._signal_all(signal.SIGKILL)
            self._wait_all(KILL_WAIT_S)
        for worker in self.workers:
            log.error("gRPC worker %d survived SIGKILL for %.0f s", worker.pid, KILL_WAIT_S)

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.proc.returncode is None:  # not waited for yet: the pid is still its own
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signum)

    def _wait_all(self, timeout: float, *, interruptible: bool = False) -> None:
        """Forget workers as they exit, for up to ``timeout``; ``interruptible``: less
        when a second signal asks for the workers to be killed now."""
        deadline = time.monotonic() + timeout
        while True:
            for worker in self._exited():
                self._forget(worker)
            if not self.workers or time.monotonic() >= deadline:
                return
            if interruptible and self._kill_now:
                return
            time.sleep(POLL_INTERVAL_S)


class ExitWindow:
    """Exit times of serving workers in the last ``window_s``; ``add`` says when too many."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self.times: list[float] = []

    def add(self, now: float) -> bool:
        """Record an exit at ``now``; True when more than ``limit`` fall within the window."""
        self.times = [t for t in self.times if now - t < self.window_s] + [now]
        return len(self.times) > self.limit


def check_addresses_free(settings: Settings) -> None:
    """Raise OSError unless the gRPC and metrics addresses are fixed ports nobody listens on.

    The bind here does not set SO_REUSEPORT, so it fails even where the other listener
    did set it (a second supervisor, or a worker another one left behind), which the
    workers' own binds would quietly share the port with.
    """
    for name, address in (
        ("IMGSERVE_GRPC_BIND", settings.grpc_bind),
        ("IMGSERVE_GRPC_METRICS_BIND", settings.grpc_metrics_bind),
    ):
        if not address:
            continue
        host, port = split_host_port(address, name)
        if port == 0:
            raise OSError(f"{name}={address}: several gRPC workers share one port; give a port")
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(sockaddr)
        except OSError as exc:
            raise OSError(f"cannot listen on {address} ({name}): {exc}") from exc


def describe_exit(code: int) -> str:
    """``exit status 1`` or ``signal SIGKILL`` for a ``Popen.returncode``."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit status {code}"


def exit_with_supervisor(supervisor_pid: int) -> None:
    """In a worker: be sent SIGTERM when the supervisor dies (Linux), or exit if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor_pid:
        raise SystemExit(f"gRPC worker {os.getpid()}: supervisor {supervisor_pid} is gone")


def report_ready(fd: int) -> None:
    """In a worker: tell the supervisor (on the pipe it passed) that this worker serves.

    The pipe stays open for the :class:`Heartbeat`; the worker's exit closes it.
    """
    os.write(fd, READY)
    os.set_blocking(fd, False)  # a heartbeat never waits on a supervisor that stopped reading


def answered(code: Any | None, progressed: bool) -> bool:
    """Whether a health check's outcome shows a live server: a reply (``code`` None, whatever
    the health status), or too busy to take it (RESOURCE_EXHAUSTED) while calls still finish."""
    if code is None:
        return True
    return getattr(code, "name", "") == "RESOURCE_EXHAUSTED" and progressed


class Heartbeat:
    """In a worker: check this server's health every ``interval_s`` on its own port and
    write :data:`BEAT` on the supervisor's pipe each time it answered (:func:`answered`).

    ``finished`` counts the calls the server has finished (any outcome).
    """

    def __init__(
        self, fd: int, address: str, interval_s: float, finished: Callable[[], int]
    ) -> None:
        self.fd = fd
        self.address = address
        self.interval_s = interval_s
        self.finished = finished

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="heartbeat", daemon=True)
        thread.start()
        return thread

    def run(self, stop: threading.Event) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            seen = self.finished()
            while not stop.wait(self.interval_s):
                code = None
                try:
                    check(health_pb2.HealthCheckRequest(), timeout=self.interval_s)
                except grpc.RpcError as err:
                    code = err.code()
                now = self.finished()
                alive = answered(code, now != seen)
                seen = now
                if not alive:
                    log.warning("health check on %s: %s; no heartbeat", self.address, code)
                    continue
                try:
                    os.write(self.fd, BEAT)
                except BlockingIOError:  # the supervisor is behind on reading: it has beats
                    pass
                except OSError:  # the supervisor is gone; PR_SET_PDEATHSIG ends this process
                    return
