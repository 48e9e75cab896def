"""``python -m serving.api.grpc --workers 2``: a supervisor and two real server processes.

One 2-worker server for the module (model loading per worker is the cost); its tests
run in file order and the last of them stops it. Which worker answered a call is read
from the Prometheus multiprocess files, one set per worker process
(``counter_<pid>.db``), and the workers' pids from ``/proc``: the gRPC API carries no pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import requests
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from serving.api.grpc.servicer import SERVICE_NAME
from serving.api.grpc.supervisor import ExitWindow, answered, heartbeat_interval
from serving.proto import imgserve_pb2, imgserve_pb2_grpc
from tests.helpers.log_lines import as_text
from tests.helpers.metrics_text import parse, promtool_check, value
from tests.helpers.servers import PYTHON, children_of, free_port, start, stop, wait_for

pytestmark = pytest.mark.slow
CLASSIFY = f"/{SERVICE_NAME}/Classify"
#: The module's supervisor kills a worker silent this long (the default is 30 s).
WORKER_TIMEOUT_S = 8


@dataclass
class Workers:
    """The running supervisor, its addresses, its log, and every worker pid seen."""

    proc: subprocess.Popen
    port: int
    metrics_port: int
    log: Path
    seen: set[int] = field(default_factory=set)

    def text(self) -> str:
        return as_text(self.log)

    def ready_count(self) -> int:
        """Workers that reported ready so far (the supervisor logs each one)."""
        return self.text().count(" ready; ")

    def metrics_dir(self) -> Path:
        return Path(re.search(r"metrics dir (\S+)", self.text()).group(1))

    def children(self) -> set[int]:
        kids = children_of(self.proc.pid)
        self.seen |= kids
        return kids

    def scrape(self) -> str:
        # No session: a new connection per scrape, so any worker may answer it.
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text


def supervisor(model_base: Path, log: Path, port: int, metrics_port: int, **env: str):
    settings = {
        "IMGSERVE_MODEL_BASE": str(model_base),
        "IMGSERVE_GRPC_BIND": f"127.0.0.1:{port}",
        "IMGSERVE_GRPC_METRICS_BIND": f"127.0.0.1:{metrics_port}",
        **env,
    }
    return start([PYTHON, "-m", "serving.api.grpc", "--workers", "2"], settings, log)


def classify_on_new_connection(port: int, image: bytes) -> imgserve_pb2.ClassifyResponse:
    """One call on a channel of its own, hence on its own TCP connection (a local
    subchannel pool): the kernel hands each new connection to one worker on the port."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = imgserve_pb2_grpc.ImageServiceStub(channel)
        return stub.Classify(imgserve_pb2.ClassifyRequest(images=[image], top_k=1), timeout=10)


def classify_counts_by_pid(metrics_dir: Path) -> dict[int, float]:
    """Successful Classify calls per worker process, each from its own counter file."""
    counts = {}
    for path in metrics_dir.glob("counter_*.db"):
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(path, tmp)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=tmp)
            families = parse(generate_latest(registry).decode())
        pid = int(path.stem.split("_")[1])
        counts[pid] = value(families, "imgserve_requests_total", endpoint=CLASSIFY, code="200")
    return counts


def alive(pid: int) -> bool:
    """Running (a zombie or a vanished pid is not)."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def kill_leftovers(pids: set[int]) -> None:
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def workers(serving_repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("grpc_workers") / "supervisor.log"
    port, metrics_port = free_port(), free_port()
    proc = supervisor(
        serving_repo, log, port, metrics_port, IMGSERVE_GRPC_WORKER_TIMEOUT_S=str(WORKER_TIMEOUT_S)
    )
    server = Workers(proc, port, metrics_port, log)
    try:
        ready = wait_for(lambda: server.ready_count() >= 2 or proc.poll() is not None, 180)
        assert ready and proc.poll() is None, server.text()[-3000:]
        server.children()
        yield server
    finally:
        if proc.poll() is None:
            stop(proc)
        kill_leftovers(server.seen)


def exit_code(proc: subprocess.Popen, timeout: float) -> int:
    """The supervisor's exit status, waiting up to ``timeout``; stopped if it runs on."""
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            stop(proc)


def test_the_supervisor_only_supervises(workers):
    """Two workers; the supervisor has neither TensorFlow nor a socket (no gRPC server)."""
    kids = workers.children()
    assert len(kids) == 2
    supervisor_maps = Path(f"/proc/{workers.proc.pid}/maps").read_text()
    assert "tensorflow" not in supervisor_maps
    for pid in kids:  # the workers do load it (embedded backend)
        assert "tensorflow" in Path(f"/proc/{pid}/maps").read_text()
    fds = Path(f"/proc/{workers.proc.pid}/fd")
    assert not [fd for fd in fds.iterdir() if os.readlink(fd).startswith("socket:")]


def test_concurrent_calls_are_served_by_both_workers_and_counted_once(workers, images):
    calls_per_thread, threads = 8, 8
    outcomes: list[str] = []

    def client() -> None:
        for _ in range(calls_per_thread):
            try:
                response = classify_on_new_connection(workers.port, images["png"])
                outcomes.append(response.model.name)
            except grpc.RpcError as err:
                outcomes.append(err.code().name)

    pool = [threading.Thread(target=client) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    sent = calls_per_thread * threads
    assert outcomes == ["tiny_classifier"] * sent
    by_pid = classify_counts_by_pid(workers.metrics_dir())
    # 64 connections, each given to one of two workers: both took some (all to one
    # worker has probability 2**-63).
    assert set(by_pid) == workers.children()
    assert all(n > 0 for n in by_pid.values()) and sum(by_pid.values()) == sent, by_pid
    for _ in range(4):  # each scrape is answered by one worker and must count them all
        text = workers.scrape()
        m = parse(text)
        assert value(m, "imgserve_requests_total", endpoint=CLASSIFY, code="200") == sent
        assert value(m, "imgserve_inflight_requests") == 0
        assert value(m, "imgserve_ready_processes") == value(m, "imgserve_configured_processes")
        assert value(m, "imgserve_configured_processes") == 2
        # Scrape-time series come from the answering worker's service layer.
        assert value(m, "imgserve_model_version_info", model="tiny_classifier", label="stable") == 1
    promtool_check(text)


def test_a_hung_worker_is_killed_and_replaced(workers, images):
    """A worker that stops answering (SIGSTOP: alive, listening, silent) is killed after the
    worker timeout and replaced; the calls it had served still count."""
    before = classify_counts_by_pid(workers.metrics_dir())
    victim, survivor = sorted(workers.children())
    ready_before = workers.ready_count()
    os.kill(victim, signal.SIGSTOP)
    gauge = workers.metrics_dir() / f"gauge_livesum_{victim}.db"
    # Killed, reaped and marked dead (its live gauges, in-flight and queue depth, are gone).
    assert wait_for(lambda: victim not in workers.children() and not gauge.exists(), 60)
    # Not before it was silent for the timeout (counted from its last heartbeat, which
    # came up to one interval before the stop).
    silent = re.search(
        rf"gRPC worker {victim} answered no health check for ([0-9.]+) s", workers.text()
    )
    assert silent and float(silent.group(1)) >= WORKER_TIMEOUT_S, workers.text()[-3000:]
    # The survivor answers meanwhile.
    for _ in range(4):
        assert classify_on_new_connection(workers.port, images["png"]).predictions
    assert wait_for(lambda: workers.ready_count() > ready_before, 120), workers.text()[-3000:]
    (replacement,) = workers.children() - {survivor}
    assert replacement != victim
    sent = 4
    end = time.monotonic() + 30
    while classify_counts_by_pid(workers.metrics_dir()).get(replacement, 0) == 0:
        assert time.monotonic() < end, "the replacement answered no call"
        assert classify_on_new_connection(workers.port, images["png"]).predictions
        sent += 1
    m = parse(workers.scrape())
    # The dead worker's calls still count: only its live gauges were dropped.
    total = sum(before.values()) + sent
    assert value(m, "imgserve_requests_total", endpoint=CLASSIFY, code="200") == total
    assert f"gRPC worker {victim} exited with signal SIGKILL (hung)" in workers.text()
    # The serving workers kept beating all along: neither was taken for hung.
    assert workers.text().count("answered no health check") == 1


def test_sigterm_stops_the_workers_and_a_second_signal_kills_the_rest(workers):
    stuck, other = sorted(workers.children())
    metrics_dir = workers.metrics_dir()
    os.kill(stuck, signal.SIGSTOP)  # a worker that cannot act on SIGTERM
    t0 = time.monotonic()
    workers.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: not alive(other), 20)  # graceful, and idle: nothing in flight
    # The supervisor waits for the stuck one (up to its stop timeout) ...
    assert workers.proc.poll() is None and alive(stuck)
    workers.proc.send_signal(signal.SIGTERM)  # ... unless told twice: then it kills
    assert workers.proc.wait(20) == 0, workers.text()[-3000:]
    assert time.monotonic() - t0 < 30
    assert not alive(stuck) and not alive(other)
    text = workers.text()
    assert f"[{other}] __main__: signal 15: shutting down" in text
    assert f"gRPC worker {stuck} still running: killing it" in text
    assert not metrics_dir.exists()  # the private multiprocess directory is removed
    assert "stopped" in text.splitlines()[-1]


# -- start-up failures (no models to load: cheap) ---------------------------------------------


def modelless_supervisor(tmp_path: Path, **env: str) -> tuple[subprocess.Popen, Path]:
    """A supervisor of 2 workers with no models to load (a TF Serving backend nobody runs):
    its workers start fast. Returns it and its log."""
    models = tmp_path / "models"
    models.mkdir()
    log = tmp_path / "supervisor.log"
    proc = supervisor(
        models,
        log,
        free_port(),
        free_port(),
        IMGSERVE_BACKEND="tfserving-rest",
        IMGSERVE_TFSERVING_REST=f"http://127.0.0.1:{free_port()}",
        **env,
    )
    return proc, log


def test_a_crash_loop_at_start_up_ends_the_supervisor(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "counter_999999.db").write_bytes(b"stale")
    proc, log = modelless_supervisor(
        tmp_path,
        # The workers fail after loading, when they create their state directory.
        IMGSERVE_STATE_DIR=str(blocker / "state"),
        PROMETHEUS_MULTIPROC_DIR=str(metrics),
    )
    code = exit_code(proc, 120)
    text = log.read_text()
    started = {int(pid) for pid in re.findall(r"gRPC worker (\d+) started", text)}
    kill_leftovers(started)
    assert code == 1, text[-3000:]
    assert "3 start-up failures in a row, giving up" in text
    assert text.count("during start-up") == 3
    assert not [pid for pid in started if alive(pid)]
    assert metrics.is_dir() and not (metrics / "counter_999999.db").exists()  # given: kept, emptied


def test_sigterm_kills_what_still_runs_after_the_stop_timeout(tmp_path):
    """The stop timer (IMGSERVE_GRPC_STOP_TIMEOUT_S) without a second signal: a worker that
    cannot act on SIGTERM is killed when it runs out, and the supervisor exits 0."""
    proc, log = modelless_supervisor(tmp_path, IMGSERVE_GRPC_STOP_TIMEOUT_S="3")
    kids: set[int] = set()
    try:
        ready = wait_for(lambda: log.read_text().count(" ready; ") >= 2 or proc.poll(), 120)
        assert ready and proc.poll() is None, log.read_text()[-3000:]
        kids = children_of(proc.pid)
        stuck = min(kids)
        os.kill(stuck, signal.SIGSTOP)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = exit_code(proc, 30)
        waited = time.monotonic() - t0
    finally:
        kill_leftovers(kids)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert 3 <= waited < 20, waited
    assert f"gRPC worker {stuck} still running: killing it" in text
    assert not [pid for pid in kids if alive(pid)]


def test_a_port_in_use_is_refused_before_any_worker_starts(tmp_path):
    with socket.socket() as taken:
        # As a leftover worker listens: with SO_REUSEPORT, which new workers would share.
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        log = tmp_path / "supervisor.log"
        proc = supervisor(tmp_path, log, taken.getsockname()[1], free_port())
        code = exit_code(proc, 60)
    text = log.read_text()
    assert code == 1 and "cannot listen on" in text, text[-3000:]
    assert "gRPC worker" not in text


def test_a_bad_worker_count_is_a_usage_error(tmp_path):
    """Exit 2 with the setting named, from the flag and from the environment; no traceback."""
    env = {**os.environ, "IMGSERVE_MODEL_BASE": str(tmp_path)}
    for argv, extra in (
        (["--workers", "-1"], {}),
        ([], {"IMGSERVE_GRPC_WORKERS": "-2"}),
    ):
        done = subprocess.run(
            [PYTHON, "-m", "serving.api.grpc", *argv],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert "must be >= 0" in done.stderr and "Traceback" not in done.stderr


# -- the supervisor's decisions, without processes -------------------------------------------


def test_serving_workers_that_keep_exiting_end_the_supervisor():
    window = ExitWindow(limit=3, window_s=60.0)
    assert not any(window.add(t) for t in (0.0, 10.0, 20.0))  # 3 exits in a minute: replaced
    assert window.add(30.0)  # the 4th within 60 s: give up
    spaced = ExitWindow(limit=3, window_s=60.0)
    # One exit every 25 s never has more than 3 in a window: a worker dying now and then
    # is replaced for ever.
    assert not any(spaced.add(25.0 * i) for i in range(20))


def test_what_counts_as_a_heartbeat():
    assert answered(None, progressed=False)  # any reply, SERVING or not
    assert answered(grpc.StatusCode.RESOURCE_EXHAUSTED, progressed=True)  # busy, calls finishing
    assert not answered(grpc.StatusCode.RESOURCE_EXHAUSTED, progressed=False)  # every thread stuck
    assert not answered(grpc.StatusCode.DEADLINE_EXCEEDED, progressed=True)
    assert not answered(grpc.StatusCode.UNAVAILABLE, progressed=True)
    assert heartbeat_interval(30.0) == 5.0 and heartbeat_interval(8.0) == 2.0
