"""Gateway benchmark (``make bench``): raw model throughput vs the gateway over HTTP and gRPC.

1. Raw: the SavedModel's ``serving_default`` called in-process on preprocessed
   batches of ``IMGSERVE_MAX_BATCH_SIZE`` images: the throughput limit of this
   machine. Also its latency for one image, the floor of any request's latency.
2. HTTP: the gateway under gunicorn (embedded backend, default settings) on
   loopback; closed-loop clients post one encoded image per request at several
   concurrencies.
3. gRPC: ``python -m serving.api.grpc`` on loopback with its default worker count
   (``IMGSERVE_GRPC_WORKERS``: as many processes as the HTTP gateway's workers), the
   same load; each client thread has a channel (a connection) of its own, as each HTTP
   client has its socket: the workers share the port, and the kernel spreads connections.
   Each of the two servers also answers the same load over the Open Inference
   Protocol v2 (``oip-rest``: ``POST /v2/models/<m>/infer`` with the binary tensor
   data extension, as tritonclient.http sends it; ``oip-grpc``: ``ModelInfer`` with
   BYTES in ``raw_input_contents``), at the same concurrencies and images per request.
4. The framework's ceiling: ``GET /healthz`` on the same HTTP gateway at the highest
   concurrency, no image and no model. One-image requests cannot beat it; when it is
   itself near the raw limit, the gap to raw is the cost of a request, not of an image.

For each run: images/s, p50 and p99 latency, throughput as a fraction of raw,
and at concurrency 1 the p50 overhead over the raw single-image latency. The
raw figures a run is compared with are measured right before and right after
it (resident probe processes, the servers idle meanwhile) and averaged: on a
shared machine whose speed drifts by a factor of two within minutes, a limit
measured once at the start makes later ratios meaningless (x8 rows at 120 %).
Clients run on the same machine as the server, so their CPU time counts against
the gateway (the figures are a lower bound for a separate client machine).

    python bench/gateway_bench.py --model-base models --model demo_classifier
"""

from __future__ import annotations

import argparse
import http.client
import io
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from contract.tf_environment import prepare_tensorflow_environment  # noqa: E402

prepare_tensorflow_environment()  # before TensorFlow's import: no doomed cuInit on a CPU host

import numpy as np  # noqa: E402

from contract.model_card import ModelCard, read_model_card  # noqa: E402
from contract.preprocessing import PreprocessSpec, preprocess_bytes  # noqa: E402
from serving.settings import Settings  # noqa: E402


@dataclass
class Result:
    name: str
    concurrency: int
    images_per_request: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    errors: int
    requests: int
    #: Raw limit (images/s) and single-image latency (s), mean of the probes around this run.
    raw_images_per_s: float = float("nan")
    raw_single_s: float = float("nan")

    @property
    def ratio(self) -> float:
        return self.images_per_s / self.raw_images_per_s

    @property
    def overhead_ms(self) -> float:
        """p50 over the raw single-image latency measured around this run."""
        return self.p50_ms - self.raw_single_s * 1e3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_image(spec: PreprocessSpec, size: int) -> bytes:
    """A real photograph (scikit-image's chelsea), as a JPEG of ``size`` pixels on its long side."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.chelsea())
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


# -- raw ---------------------------------------------------------------------------------
def raw_model(vdir: Path, spec: PreprocessSpec, image: bytes, batch: int):
    """(``serving_default``, a batch of ``batch`` copies of ``image``, one copy), warmed up.

    The signature is called as the embedded backend calls it (``direct_signature``):
    the fastest in-process call, so the gateway is compared with the best there is.
    """
    import tensorflow as tf

    from serving.backends.embedded import direct_signature

    fn = direct_signature(tf.saved_model.load(str(vdir)), "serving_default", "images")
    x1, _ = preprocess_bytes(image, spec)
    xb = tf.constant(np.repeat(x1[None], batch, axis=0))
    single = tf.constant(x1[None])
    for _ in range(3):
        fn(xb)
        fn(single)
    return fn, xb, single


def raw_measure(fn, xb, single, seconds: float, latency_seconds: float) -> tuple[float, float]:
    """(images/s on ``xb`` over ``seconds``, p50 seconds of one ``single`` call)."""
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        fn(xb)
        n += 1
    throughput = n * int(xb.shape[0]) / (time.perf_counter() - t0)
    lat = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < latency_seconds:
        s = time.perf_counter()
        fn(single)
        lat.append(time.perf_counter() - s)
    return throughput, statistics.median(lat)


def bench_raw(
    version_dir: Path, spec: PreprocessSpec, image: bytes, batch: int, seconds: float, intra_op: int
) -> tuple[float, float, float]:
    """(images/s at ``batch``, p50 seconds of one single-image call, drift s/request)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    fn, xb, single = raw_model(version_dir, spec, image, batch)
    throughput, latency = raw_measure(fn, xb, single, seconds, min(seconds, 3.0))
    return throughput, latency, drift_cost(fn, single, read_model_card(version_dir))


def drift_cost(fn, single, card: ModelCard, calls: int = 3000) -> float:
    """Seconds per one-image request spent on drift: the observers in the request thread
    (monitor + prediction mix) and the monitor's folding and publishing of the windows.

    The gateway's own observers on the model's real outputs, with a real state
    directory, timed in this process; folding runs every 200 requests here (the
    gateway folds every 50 ms), so every queued request is folded, none dropped.
    """
    import tempfile
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from serving.observers import drift as serving_drift

    outputs = {k: v.numpy() for k, v in fn(single).items()}
    # The gateway's ModelVersion holds the card's JSON dict.
    model = SimpleNamespace(
        name=card.name, version=card.version, card=card.to_json(), class_labels=list(card.labels)
    )
    event = SimpleNamespace(model=model, outputs=outputs, inputs=single.numpy())
    with tempfile.TemporaryDirectory() as tmp:
        monitor, mix = serving_drift.register(
            CollectorRegistry(), state_dir=tmp, window=256, half_life_s=300.0
        )
        monitor.fold_interval_s = 3600.0  # this loop folds, not the background thread
        for _ in range(100):
            monitor.on_prediction(event)
            mix.on_prediction(event)
        monitor.publish()
        t0 = time.perf_counter()
        for i in range(calls):
            monitor.on_prediction(event)
            mix.on_prediction(event)
            if i % 200 == 199:
                monitor.fold()
        monitor.publish()
        elapsed = time.perf_counter() - t0
        monitor.close()
        return elapsed / calls


class RawProbe:
    """Resident raw-model processes measuring on demand (between gateway runs).

    One child per intra-op pool size of :func:`raw_limit`; :meth:`measure` asks each
    in turn, while the servers under test are idle, and keeps the same figures as the
    start of the run: the best throughput and the best single-image latency.
    """

    def __init__(
        self, args: argparse.Namespace, batch: int, intras: list[int], seconds: float
    ) -> None:
        self.procs = []
        for intra in intras:
            cmd = [sys.executable, __file__, "--model-base", args.model_base, "--model", args.model]
            cmd += ["--seconds", str(seconds), "--raw-intra", str(intra), "--raw-batch", str(batch)]
            cmd += ["--raw-probe"] + (["--version", str(args.version)] if args.version else [])
            self.procs.append(
                subprocess.Popen(
                    cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
            )

    def measure(self) -> tuple[float, float]:
        """(images/s at the max batch size, single-image p50 seconds), measured now."""
        figures = []
        for proc in self.procs:
            assert proc.stdin and proc.stdout
            proc.stdin.write("measure\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"raw probe exited with {proc.wait(10)}")
            figures.append(json.loads(line))
        return max(f[0] for f in figures), min(f[1] for f in figures)

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin:
                proc.stdin.close()  # end of input: the child's loop ends
            end_process(proc, 30)


def probe_loop(vdir: Path, spec: PreprocessSpec, image: bytes, batch: int, seconds: float) -> None:
    """The :class:`RawProbe` child: one measurement per line on stdin, one JSON line out."""
    fn, xb, single = raw_model(vdir, spec, image, batch)
    for _ in sys.stdin:
        print(json.dumps(raw_measure(fn, xb, single, seconds, seconds / 2)), flush=True)


def raw_limit(args: argparse.Namespace, batch: int) -> dict[int, tuple[float, float]]:
    """Raw throughput per TensorFlow intra-op pool size (1 and all cores), each in a fresh process."""
    results = {}
    for intra in sorted({1, os.cpu_count() or 1}):
        cmd = [
            sys.executable,
            __file__,
            "--model-base",
            args.model_base,
            "--model",
            args.model,
            "--seconds",
            str(args.seconds),
            "--raw-intra",
            str(intra),
            "--raw-batch",
            str(batch),
        ]
        if args.version:
            cmd += ["--version", str(args.version)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
        results[intra] = tuple(json.loads(out.strip().splitlines()[-1]))
    return results


# -- load generation ---------------------------------------------------------------------
def closed_loop(
    call, concurrency: int, seconds: float, warmup: float = 1.0
) -> tuple[int, int, list[float], float]:
    """``concurrency`` threads calling ``call()`` back to back; (ok, errors, latencies, elapsed)."""
    lat: list[float] = []
    counts = {"ok": 0, "err": 0}
    lock = threading.Lock()
    start = time.monotonic() + warmup
    end = start + seconds

    def worker() -> None:
        state = {}
        while True:
            t0 = time.monotonic()
            if t0 >= end:
                return
            ok = call(state)
            t1 = time.monotonic()
            if t0 >= start:
                with lock:
                    counts["ok" if ok else "err"] += 1
                    if ok:
                        lat.append(t1 - t0)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + warmup + 120)
    return counts["ok"], counts["err"], lat, seconds


def http_request_bytes(port: int, image: bytes, n: int = 1) -> bytes:
    """A complete ``POST /v1/classify`` request: one raw image body, or ``n`` multipart fields."""
    if n == 1:
        body, ctype = image, "image/jpeg"
    else:
        boundary = "benchboundary"
        part = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + image
            + b"\r\n"
        )
        body = part * n + f"--{boundary}--\r\n".encode()
        ctype = f"multipart/form-data; boundary={boundary}"
    head = (
        f"POST /v1/classify?top_k=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def read_response(sock: socket.socket, buf: bytearray) -> tuple[int, bool]:
    """Read one HTTP/1.1 response with a Content-Length from ``sock``; (status, whether
    the server closes the connection after it).

    ``buf`` carries bytes read past the response (none with a closed-loop client).
    """
    while (end := buf.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    head = bytes(buf[:end]).lower()
    status = int(head[9:12])
    length, close = 0, head.startswith(b"http/1.0")
    for line in head.split(b"\r\n")[1:]:
        if line.startswith(b"content-length:"):
            length = int(line[15:])
        elif line.startswith(b"connection:"):
            close = b"close" in line
    total = end + 4 + length
    while len(buf) < total:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    del buf[:total]
    return status, close


def http_call(port: int, image: bytes, n: int = 1):
    """One image as a raw body, or ``n`` as multipart ``image`` fields, on a kept-alive socket.

    The client is a plain socket with the request bytes built once: the load
    generator shares the server's cores, so it must cost as little CPU as it can
    (``http.client`` spends several times more per request than this).
    """
    return socket_call(port, http_request_bytes(port, image, n))


def socket_call(port: int, payload: bytes):
    """A closed-loop client's call: send ``payload`` on the thread's kept-alive socket,
    read one response; True for a 200.

    A server that answers ``Connection: close`` (gunicorn's sync workers keep no
    connection alive, by design) or a failure gets a new connection for the next call,
    as an HTTP client would open one.
    """

    def call(state: dict) -> bool:
        sock = state.get("sock")
        close = True
        try:
            if sock is None:
                sock = state["sock"] = socket.create_connection(("127.0.0.1", port), timeout=120)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                state["buf"] = bytearray()
            sock.sendall(payload)
            status, close = read_response(sock, state["buf"])
            return status == 200
        except (OSError, ValueError):
            return False
        finally:
            if close and sock is not None:
                sock.close()
                state.pop("sock", None)

    return call


def grpc_call(port: int, image: bytes, n: int = 1):
    """One Classify call of ``n`` images on the client thread's own channel.

    A channel per thread, with a local subchannel pool so that it really is a TCP
    connection of its own (channels with the same target and options share one
    otherwise): SO_REUSEPORT hands connections, not calls, to the gRPC workers.
    """
    from serving.proto import imgserve_pb2, imgserve_pb2_grpc

    request = imgserve_pb2.ClassifyRequest(images=[image] * n, top_k=1)
    return _grpc_unary(port, imgserve_pb2_grpc.ImageServiceStub, "Classify", request)


def _grpc_unary(port: int, stub_class, method: str, request):
    """A load-client call of ``stub_class.method(request)``, on a channel of its own per
    client thread (``state``), with a local subchannel pool: its own TCP connection."""
    import grpc

    options = [("grpc.use_local_subchannel_pool", 1)]

    def call(state: dict) -> bool:
        rpc = state.get("rpc")
        if rpc is None:
            channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
            rpc = state["rpc"] = getattr(stub_class(channel), method)
        try:
            rpc(request, timeout=60)
            return True
        except grpc.RpcError:
            return False

    return call


def oip_rest_call(port: int, image: bytes, n: int = 1, model: str = ""):
    """``POST /v2/models/<model>/infer`` of ``n`` images as tritonclient.http sends them:
    a JSON header, then the BYTES tensor in binary (the binary tensor data extension),
    binary outputs back."""
    raw = b"".join(len(image).to_bytes(4, "little") + image for _ in range(n))
    binary = {"binary_data": True}
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "BYTES",
                    "shape": [n],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [
                {"name": "labels", "parameters": binary},
                {"name": "scores", "parameters": binary},
            ],
            "parameters": {"top_k": 1},
        }
    ).encode()
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: "
        f"{len(header)}\r\nContent-Length: {len(header) + len(raw)}\r\n\r\n"
    )
    return socket_call(port, head.encode() + header + raw)


def oip_grpc_call(port: int, image: bytes, n: int = 1, model: str = ""):
    """One ``inference.GRPCInferenceService/ModelInfer`` of ``n`` images, BYTES in
    ``raw_input_contents`` as tritonclient.grpc sends them; a channel per thread."""

    from serving.proto import grpc_predict_v2_pb2 as pb
    from serving.proto import grpc_predict_v2_pb2_grpc as pb_grpc

    raw = b"".join(len(image).to_bytes(4, "little") + image for _ in range(n))
    request = pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[n])],
        parameters={"top_k": pb.InferParameter(int64_param=1)},
        raw_input_contents=[raw],
    )
    return _grpc_unary(port, pb_grpc.GRPCInferenceServiceStub, "ModelInfer", request)


# -- servers -------------------------------------------------------------------------------
def batch_totals(metrics_port: int) -> tuple[float, float]:
    """(sum, count) of ``imgserve_batch_size`` from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "imgserve_batch_size":
            for s in family.samples:
                if s.name == "imgserve_batch_size_sum":
                    total += s.value
                elif s.name == "imgserve_batch_size_count":
                    count += s.value
    return total, count


def start_server(
    kind: str, model_base: Path, port: int, log: Path, metrics_port: int = 0, workers: int = 0
) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["IMGSERVE_MODEL_BASE"] = str(model_base)
    if workers:
        env["IMGSERVE_WORKERS"] = str(workers)
    if kind == "http":
        env["IMGSERVE_BIND"] = f"127.0.0.1:{port}"
        gunicorn = str(Path(sys.executable).parent / "gunicorn")
        cmd = [gunicorn, "-c", "serving/gunicorn.conf.py", "serving.app:create_app()"]
    else:
        env["IMGSERVE_GRPC_BIND"] = f"127.0.0.1:{port}"
        env["IMGSERVE_GRPC_METRICS_BIND"] = f"127.0.0.1:{metrics_port}"
        cmd = [sys.executable, "-m", "serving.api.grpc"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(
    kind: str, port: int, proc: subprocess.Popen, log: Path, grpc_workers: int, timeout: float = 180
) -> None:
    """Until the server answers its health check; for several gRPC workers, until every
    one has reported ready (the supervisor's log says so; the health check is answered
    by whichever worker gets the connection)."""
    end = time.monotonic() + timeout
    all_serving = f"{grpc_workers} of {grpc_workers} workers serving"
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server exited with {proc.returncode}")
        try:
            if kind == "http":
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    return
            else:
                import grpc
                from grpc_health.v1 import health_pb2, health_pb2_grpc

                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    status = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(), timeout=2
                    )
                    if status.status == health_pb2.HealthCheckResponse.SERVING and (
                        grpc_workers == 1 or all_serving in log.read_text()
                    ):
                        return
        except Exception:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{kind} server not ready after {timeout}s")


def end_process(proc: subprocess.Popen, timeout: float) -> None:
    """Wait ``timeout`` seconds for ``proc`` to exit, then kill it."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        end_process(proc, 60)


def bench_server(
    kind: str,
    model_base: Path,
    image: bytes,
    levels: list[int],
    seconds: float,
    log_dir: Path,
    images_per_request: list[int],
    probe: RawProbe,
    workers: int = 0,
    grpc_workers: int = 1,
    model: str = "",
) -> list[Result]:
    """Closed-loop runs on one server: its own API, and with ``model`` (the default
    configuration only) the Open Inference Protocol on the same server."""
    port = free_port()
    metrics_port = port if kind == "http" else free_port()
    label = f"{kind}/{workers}w" if workers else kind
    log = log_dir / f"{label.replace('/', '-')}.log"
    proc = start_server(kind, model_base, port, log, metrics_port, workers)
    results = []
    try:
        wait_ready(kind, port, proc, log, grpc_workers)
        clients = [(label, http_call if kind == "http" else grpc_call)]
        if model and not workers:
            oip_call = oip_rest_call if kind == "http" else oip_grpc_call
            clients.append(
                (f"oip-{'rest' if kind == 'http' else 'grpc'}", partial(oip_call, model=model))
            )
        for (name, factory), n in itertools.product(clients, images_per_request):
            # The same images in flight for every request size (and within the queue bound).
            for c in sorted({max(1, level // n) for level in levels}):
                before = probe.measure()
                s0, c0 = batch_totals(metrics_port)
                ok, err, lat, elapsed = closed_loop(factory(port, image, n), c, seconds)
                s1, c1 = batch_totals(metrics_port)
                after = probe.measure()
                r = Result(
                    name,
                    c,
                    n,
                    ok * n / elapsed,
                    percentile(lat, 50) * 1e3,
                    percentile(lat, 99) * 1e3,
                    (s1 - s0) / max(1.0, c1 - c0),
                    err,
                    ok + err,
                    (before[0] + after[0]) / 2,
                    (before[1] + after[1]) / 2,
                )
                results.append(r)
                print(
                    f"  {name:9s} c={c:3d} x{n}: {r.images_per_s:8.1f} img/s  p50 {r.p50_ms:7.2f} ms"
                    f"  p99 {r.p99_ms:7.2f} ms  batch {r.mean_batch:5.1f}  errors {err}"
                    f"  (raw around it {before[0]:.0f}/{after[0]:.0f} img/s)",
                    flush=True,
                )
        if kind == "http" and not workers:
            results.append(framework_ceiling(port, max(levels), seconds, probe))
    finally:
        stop_server(proc)
    return results


def framework_ceiling(port: int, concurrency: int, seconds: float, probe: RawProbe) -> Result:
    """``GET /healthz`` at ``concurrency``: what gunicorn and Flask alone answer on this host.

    No image, no model: the requests/s of the same workers and clients with nothing
    behind them. One-image requests can go no faster than this, whatever the model.
    """
    call = socket_call(port, f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    before = probe.measure()
    ok, err, lat, elapsed = closed_loop(call, concurrency, seconds)
    after = probe.measure()
    r = Result(
        "healthz",
        concurrency,
        0,
        ok / elapsed,
        percentile(lat, 50) * 1e3,
        percentile(lat, 99) * 1e3,
        0.0,
        err,
        ok + err,
        (before[0] + after[0]) / 2,
        (before[1] + after[1]) / 2,
    )
    print(
        f"  healthz   c={concurrency:3d}   : {r.images_per_s:8.1f} req/s  p50 {r.p50_ms:7.2f} ms"
        f"  (no image, no model: the framework's ceiling)",
        flush=True,
    )
    return r


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-base", default=os.environ.get("IMGSERVE_MODEL_BASE", "models"))
    parser.add_argument("--model", default="demo_classifier")
    parser.add_argument("--version", type=int, default=None, help="default: the newest")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument(
        "--image-size",
        type=int,
        default=0,
        help="long side of the JPEG clients send (default: the model's input size)",
    )
    parser.add_argument(
        "--images-per-request",
        default="1,8",
        help="comma-separated; each value is a run at every concurrency",
    )
    parser.add_argument("--skip-grpc", action="store_true")
    parser.add_argument(
        "--workers",
        default="",
        help="comma-separated gunicorn worker counts to compare over HTTP as well "
        "(the default configuration always runs)",
    )
    parser.add_argument("--out", default=".bench/gateway.json")
    parser.add_argument("--raw-intra", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--raw-batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--raw-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    model_base = Path(args.model_base).resolve()
    versions = (
        sorted(int(p.name) for p in (model_base / args.model).iterdir() if p.name.isdigit())
        if (model_base / args.model).is_dir()
        else []
    )
    if not versions:
        print(
            f"no versions of {args.model} under {model_base}; run `make models` first",
            file=sys.stderr,
        )
        return 2
    version = args.version or versions[-1]
    spec = read_model_card(model_base / args.model / str(version)).preprocess_spec
    image = sample_image(spec, args.image_size or max(spec.height, spec.width))
    settings = Settings.from_env()
    vdir = model_base / args.model / str(version)
    if args.raw_probe:  # the child process of RawProbe
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.raw_intra)
        probe_loop(vdir, spec, image, args.raw_batch, args.seconds)
        return 0
    if args.raw_intra:  # the child process of raw_limit()
        print(
            json.dumps(bench_raw(vdir, spec, image, args.raw_batch, args.seconds, args.raw_intra))
        )
        return 0
    levels = [int(c) for c in args.concurrency.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    print(
        f"model {args.model}/{version}: input {spec.height}x{spec.width}, client image "
        f"{len(image)} bytes JPEG; {os.cpu_count()} CPUs; max batch {settings.max_batch_size}",
        flush=True,
    )
    raws = raw_limit(args, settings.max_batch_size)
    for intra, (tput, single, _) in raws.items():
        print(
            f"  raw   batch {settings.max_batch_size}, {intra} intra-op thread(s): {tput:8.1f} "
            f"img/s; one image {single * 1e3:.2f} ms",
            flush=True,
        )
    # The machine's limit: the best pool size for throughput, and for single-image latency.
    raw = max(r[0] for r in raws.values())
    raw_single = min(r[1] for r in raws.values())
    drift_s = min(r[2] for r in raws.values())
    print(
        f"  gateway: {settings.worker_count()} worker(s), {settings.intra_op_threads()} intra-op "
        f"thread(s), {settings.threads} threads per worker",
        flush=True,
    )
    grpc_settings = settings.grpc_process_settings()
    if not args.skip_grpc:
        print(
            f"  gRPC gateway: {grpc_settings.workers} worker(s), "
            f"{grpc_settings.intra_op_threads()} intra-op thread(s), "
            f"{settings.grpc_max_workers} threads per worker",
            flush=True,
        )
    per_request = [int(n) for n in args.images_per_request.split(",")]
    probe = RawProbe(args, settings.max_batch_size, sorted(raws), max(2.0, args.seconds / 2))
    try:
        runs = [("http", 0)] + [("http", int(w)) for w in args.workers.split(",") if w.strip()]
        runs += [] if args.skip_grpc else [("grpc", 0)]
        results = []
        for kind, w in runs:
            results += bench_server(
                kind,
                model_base,
                image,
                levels,
                args.seconds,
                out.parent,
                per_request,
                probe,
                w,
                grpc_settings.workers,
                args.model,
            )
    finally:
        probe.close()

    print()
    print(
        f"{'path':9s} {'conc':>4s} {'img/req':>7s} {'img/s':>9s} {'vs raw':>7s} {'p50 ms':>8s} "
        f"{'p99 ms':>8s} {'batch':>6s} {'p50 overhead':>13s} {'errors':>6s} {'raw around':>10s}"
    )
    print(
        f"{'raw':9s} {'':>4s} {settings.max_batch_size:7d} {raw:9.1f} {'100%':>7s} "
        f"{raw_single * 1e3:8.2f} {'':>8s} {settings.max_batch_size:6d} {'':>13s} {0:6d}"
        "   (at the start)"
    )
    for r in results:
        if not r.images_per_request:  # the framework's ceiling, in requests/s
            print(
                f"{r.name:9s} {r.concurrency:4d} {'-':>7s} {r.images_per_s:9.1f} {'req/s':>7s} "
                f"{r.p50_ms:8.2f} {r.p99_ms:8.2f} {'':>6s} {'':>13s} {r.errors:6d}"
            )
            continue
        overhead = (
            f"{r.overhead_ms:10.2f} ms" if r.concurrency == 1 and r.images_per_request == 1 else ""
        )
        print(
            f"{r.name:9s} {r.concurrency:4d} {r.images_per_request:7d} {r.images_per_s:9.1f} "
            f"{r.ratio:7.0%} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {r.mean_batch:6.1f} {overhead:>13s} "
            f"{r.errors:6d} {r.raw_images_per_s:10.1f}"
        )
    print()
    for k in dict.fromkeys(r.name for r in results):
        for n in per_request:
            runs = [r for r in results if r.name == k and r.images_per_request == n]
            if not runs:
                continue
            best = max(runs, key=lambda r: r.ratio)
            line = (
                f"{k} x{n}: best {best.images_per_s:.0f} img/s = {best.ratio:.0%} of the raw "
                f"{best.raw_images_per_s:.0f} img/s around it (target >= 80%)"
            )
            if n == 1:
                c1 = min(runs, key=lambda r: r.concurrency)
                line += (
                    f"; p50 overhead at concurrency {c1.concurrency}: "
                    f"{c1.overhead_ms:.2f} ms over {c1.raw_single_s * 1e3:.2f} ms (target < 5 ms)"
                )
            print(line)
    ceiling = [r for r in results if not r.images_per_request]
    http1 = [r for r in results if r.name == "http" and r.images_per_request == 1]
    if ceiling and http1:
        top = max(http1, key=lambda r: r.images_per_s)
        print(
            f"framework ceiling: GET /healthz {ceiling[0].images_per_s:.0f} req/s at concurrency "
            f"{ceiling[0].concurrency} = {ceiling[0].images_per_s / ceiling[0].raw_images_per_s:.0%}"
            f" of the raw {ceiling[0].raw_images_per_s:.0f} img/s; one-image classify reached "
            f"{top.images_per_s / ceiling[0].images_per_s:.0%} of it"
        )
    if http1:
        c1 = min(http1, key=lambda r: r.concurrency)
        best = max(http1, key=lambda r: r.images_per_s)
        print(
            f"drift observers: {drift_s * 1e6:.1f} us per one-image request = "
            f"{drift_s * 1e3 / c1.p50_ms:.2%} of the p50 at concurrency {c1.concurrency}, "
            f"{drift_s * best.images_per_s:.2%} of serving time at {best.images_per_s:.0f} img/s "
            "(target < 2%)"
        )
    out.write_text(
        json.dumps(
            {
                "drift_observer_s_per_request": drift_s,
                "model": f"{args.model}/{version}",
                "raw_images_per_s": raw,
                "raw_single_image_s": raw_single,
                "raw_by_intra_op_threads": {str(k): v for k, v in raws.items()},
                "max_batch_size": settings.max_batch_size,
                "results": [
                    {**asdict(r), "ratio": r.ratio, "overhead_ms": r.overhead_ms} for r in results
                ],
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
