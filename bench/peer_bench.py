"""Peer benchmark (``make bench-peers``): imgserve beside other model servers, same model.

The demo classifier's SavedModel served by imgserve (the gateway under gunicorn,
default settings, embedded backend, as ``bench/gateway_bench.py`` starts it) and by
each peer under ``bench/peers/<peer>/`` (its ``peer.json`` says how to install, start
and call it; each in its own virtualenv ``.venv-peers/<peer>`` from its pinned lock).
Every server starts at once, each on its own port; each answer is checked once (its
top-1 label must equal imgserve's for the same image), then the cells run interleaved:
for each (image size, request form, concurrency) every server in turn, the first one
rotating from cell to cell, with the gateway bench's socket client (``closed_loop``)
and the raw model's limit measured between rows (``RawProbe``), so a drift of the
shared machine's speed shows beside the row it touched.

Images: the model-size JPEG the gateway bench sends, and 640x480 and 4032x3024 JPEGs
of a real photo (scikit-image's chelsea, upscaled, quality 90); the 4032x3024 one is
stored sideways with an EXIF orientation tag, as a phone stores it, with sensor-like
noise so that the file has a phone photo's size. Forms: ``raw`` (the framework's most
direct way to send one image's bytes) and ``multipart`` (a form upload, where taken).
A row's images/s counts answers of 200; any other status (imgserve sheds load with 503
when a worker's decoded-pixel budget is full) is an error, shown beside it. A slow server
at high concurrency may finish few requests in a row's window: those figures are coarse.

    python bench/peer_bench.py --model-base models --model demo_classifier --json out.json
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gateway_bench as gb  # noqa: E402

from bench.peers import profiling, report  # noqa: E402
from bench.peers.bodies import build_body  # noqa: E402
from bench.peers.venvs import ensure_venv  # noqa: E402
from contract.model_card import read_model_card  # noqa: E402
from serving.settings import Settings  # noqa: E402

PEERS_DIR = ROOT / "bench" / "peers"
VENVS = ROOT / ".venv-peers"
IMGSERVE_FORMS = {
    "raw": {"path": "/v1/classify?top_k=1", "body": "jpeg"},
    "multipart": {"path": "/v1/classify?top_k=1", "body": "multipart", "field": "image"},
}


@dataclass
class Server:
    name: str
    forms: dict[str, dict | None]
    port: int = 0
    proc: subprocess.Popen | None = None
    status: str = "ok"
    config: dict = field(default_factory=dict)
    python: Path | None = None
    #: (form, size) -> the complete HTTP request; (form, size) -> why it is not timed.
    requests: dict[tuple[str, str], bytes] = field(default_factory=dict)
    refused: dict[tuple[str, str], str] = field(default_factory=dict)


# -- images ------------------------------------------------------------------------------
def photo_jpeg(width: int, height: int, phone: bool = False) -> bytes:
    """scikit-image's chelsea resized to ``width x height``, JPEG quality 90; ``phone``:
    with sensor-like noise, stored sideways under EXIF orientation 6 (upright it is
    ``width x height``)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.chelsea()).resize((width, height), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    if phone:
        px = np.asarray(img, dtype=np.float32)
        px += np.random.default_rng(0).normal(0.0, 4.0, px.shape).astype(np.float32)
        # Orientation 6: the viewer turns the stored pixels 90 degrees clockwise.
        img = Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).transpose(
            Image.Transpose.ROTATE_90
        )
        exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def make_images(sizes: list[str], spec) -> dict[str, bytes]:
    images = {}
    for size in sizes:
        if size == "model":
            images[size] = gb.sample_image(spec, max(spec.height, spec.width))
        else:
            w, h = (int(v) for v in size.split("x"))
            images[size] = photo_jpeg(w, h, phone=w * h > 4_000_000)
    return images


# -- servers -----------------------------------------------------------------------------
def load_peers(names: list[str]) -> list[Server]:
    peers = []
    for name in names:
        config = json.loads((PEERS_DIR / name / "peer.json").read_text())
        peers.append(Server(name, config["forms"], config=config))
    return peers


def install(peers: list[Server], log_dir: Path) -> None:
    for peer in peers:
        print(f"venv {peer.name}", flush=True)
        try:
            peer.python = ensure_venv(
                VENVS / peer.name,
                PEERS_DIR / peer.name / "requirements.txt",
                log_dir / f"{peer.name}-pip.log",
            )
        except (RuntimeError, OSError) as exc:
            peer.status = f"install failed: {exc}"[:200]


def start_peer(peer: Server, model_dir: Path, log_dir: Path) -> None:
    cfg, peer_dir = peer.config, PEERS_DIR / peer.name
    peer.port = gb.free_port()
    values = {
        "python": str(peer.python),
        "port": str(peer.port),
        "model_dir": str(model_dir),
        "peer_dir": str(peer_dir),
        "workers": str(cfg.get("workers", 1)),
    }
    cmd = [part.format(**values) for part in cfg["command"]]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("IMGSERVE_", "PROMETHEUS_", "VIRTUAL_ENV"))
    }
    env.update({k: v.format(**values) for k, v in cfg.get("env", {}).items()})
    env["PYTHONPATH"] = str(PEERS_DIR)
    log = (log_dir / f"{peer.name}.log").open("w")
    peer.proc = subprocess.Popen(
        cmd,
        cwd=peer_dir / cfg.get("cwd", "."),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the group is stopped as one: servers with worker children
    )


def http_get_ok(port: int, path: str) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False


def wait_all_ready(
    servers: list[Server], paths: dict[str, str], timeouts: dict[str, float]
) -> None:
    """Until every started server answers its readiness path; one that exits or is
    not ready in time is marked so and stopped."""
    t0 = time.monotonic()
    pending = [s for s in servers if s.status == "ok"]
    while pending:
        for s in list(pending):
            if s.proc.poll() is not None:
                s.status = f"start failed: exited with {s.proc.returncode}"
            elif http_get_ok(s.port, paths[s.name]):
                print(f"  {s.name} ready after {time.monotonic() - t0:.0f} s", flush=True)
            elif time.monotonic() - t0 > timeouts[s.name]:
                s.status = f"start failed: not ready after {timeouts[s.name]:.0f} s"
                stop(s)
            else:
                continue
            pending.remove(s)
        time.sleep(0.5)


def stop(server: Server) -> None:
    """SIGTERM to the server (to its process group where it leads one: a peer and its
    worker children), SIGKILL after 30 s."""
    proc = server.proc
    if proc is None or proc.poll() is not None:
        return
    group = os.getpgid(proc.pid) == proc.pid

    def send(sig: int) -> None:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)

    try:
        send(signal.SIGTERM)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


# -- requests and answers ------------------------------------------------------------------
def request_bytes(port: int, path: str, ctype: str, body: bytes, headers: dict[str, str]) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def build_requests(server: Server, images: dict[str, bytes], forms: list[str]) -> None:
    peer_dir = PEERS_DIR / server.name
    for form in forms:
        spec = server.forms.get(form)
        for size, image in images.items():
            if spec is None:
                server.refused[(form, size)] = "form not taken"
                continue
            _, ctype, body, headers = build_body(spec["body"], image, spec, peer_dir)
            server.requests[(form, size)] = request_bytes(
                server.port, spec["path"], ctype, body, headers
            )


def ask(port: int, request: bytes) -> tuple[int, bytes]:
    """Send one complete request; (status, body)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(request)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, resp.read()


def check_answers(servers: list[Server], reference: Server) -> None:
    """Each (form, size) of each peer answers once; a status other than 200 or a top-1
    label other than imgserve's (raw form, same image) keeps that pair from the timing."""
    expected = {}
    for (_, size), req in sorted(reference.requests.items(), reverse=True):  # "raw" first
        if size in expected:
            continue
        status, body = ask(reference.port, req)
        expected[size] = report.top1_label(json.loads(body)) if status == 200 else None
    for s in servers:
        for (form, size), req in s.requests.items():
            try:
                status, body = ask(s.port, req)
                label = report.top1_label(json.loads(body)) if status == 200 else None
            except (OSError, ValueError, http.client.HTTPException) as exc:
                status, label = 0, f"{type(exc).__name__}"
            if status != 200 or label != expected[size]:
                s.refused[(form, size)] = (
                    f"answer differs: {status} {label!r} (imgserve {expected[size]!r})"
                )


# -- timing ------------------------------------------------------------------------------
def run_cells(servers: list[Server], args, probe: gb.RawProbe) -> list[report.Row]:
    """Every cell, every server in turn (the first rotating), the raw limit between rows."""
    rows = []
    raw = probe.measure()[0]
    cells = [
        (size, form, c) for size in args.sizes for form in args.forms for c in args.concurrency
    ]
    for i, (size, form, c) in enumerate(cells):
        order = servers[i % len(servers) :] + servers[: i % len(servers)]
        for s in order:
            row = report.Row(s.name, size, form, c)
            rows.append(row)
            if s.status != "ok" or (form, size) in s.refused:
                row.status = s.status if s.status != "ok" else s.refused[(form, size)]
                continue
            ok, err, lat, elapsed = gb.closed_loop(
                gb.socket_call(s.port, s.requests[(form, size)]), c, args.seconds
            )
            after = probe.measure()[0]
            row.images_per_s, row.errors, row.requests = ok / elapsed, err, ok + err
            row.p50_ms, row.p99_ms = gb.percentile(lat, 50) * 1e3, gb.percentile(lat, 99) * 1e3
            row.raw_before, row.raw_after, raw = raw, after, after
            print(
                f"  {size:>9s} {form:9s} c={c:3d} {s.name:9s} {row.images_per_s:8.1f} img/s  "
                f"p50 {row.p50_ms:8.1f} ms  p99 {row.p99_ms:8.1f} ms  errors {err}  raw {after:.0f}",
                flush=True,
            )
    return rows


def profile(
    servers: list[Server], args, image_size: str, image: bytes, version_dir: Path, log_dir: Path
) -> dict:
    """Where each server's time goes on ``image_size`` JPEGs, one request at a time."""
    out: dict = {"image": image_size}
    try:
        py_spy = ensure_venv(
            VENVS / "tools", PEERS_DIR / "tools" / "requirements.txt", log_dir / "tools-pip.log"
        )
        py_spy = py_spy.parent / "py-spy"
    except RuntimeError as exc:
        py_spy, out["py_spy_error"] = None, str(exc)
    for s in servers:
        req = s.requests.get(("raw", image_size))
        if s.status != "ok" or req is None or py_spy is None:
            continue
        call = gb.socket_call(s.port, req)
        load = lambda call=call: gb.closed_loop(call, 1, args.profile_seconds, warmup=0.0)  # noqa: E731
        out[s.name] = profiling.record(
            py_spy, s.proc.pid, args.profile_seconds + 2, log_dir / f"{s.name}.spy", load
        )
        print(f"  profile {s.name}: {out[s.name]}", flush=True)
    if all("error" in v for k, v in out.items() if isinstance(v, dict)):
        print(
            "  py-spy could not sample here; timing the stages in this process instead", flush=True
        )
        out["stage_timing"] = profiling.stage_timing(image, version_dir)
        print(f"  {out['stage_timing']}", flush=True)
    return out


def host_info(raw: float) -> dict:
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu_count": os.cpu_count(),
        "raw_images_per_s_at_start": raw,
        "commit": commit,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-base", default=os.environ.get("IMGSERVE_MODEL_BASE", "models"))
    parser.add_argument("--model", default="demo_classifier")
    parser.add_argument("--version", type=int, default=None, help="default: the newest")
    parser.add_argument(
        "--peers", default=",".join(sorted(p.parent.name for p in PEERS_DIR.glob("*/peer.json")))
    )
    parser.add_argument("--sizes", default="model,640x480,4032x3024")
    parser.add_argument("--forms", default="raw,multipart")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument(
        "--seconds",
        type=float,
        default=4.0,
        help="per row, after 1 s of warm-up (a run of six servers took 10.5 min with 4 s)",
    )
    parser.add_argument(
        "--probe-seconds", type=float, default=0.5, help="raw-limit probe between rows"
    )
    parser.add_argument("--json", default=".bench/peers.json")
    parser.add_argument("--setup-only", action="store_true", help="make the peer venvs, then stop")
    parser.add_argument(
        "--profile", action="store_true", help="also sample where each server's time goes"
    )
    parser.add_argument("--profile-seconds", type=float, default=6.0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    args.sizes, args.forms = args.sizes.split(","), args.forms.split(",")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    base = Path(args.model_base).resolve()
    versions = sorted(int(p.name) for p in (base / args.model).glob("[0-9]*") if p.name.isdigit())
    if not versions:
        print(f"no versions of {args.model} under {base}; run `make models` first", file=sys.stderr)
        return 2
    args.version = args.version or versions[-1]
    version_dir = base / args.model / str(args.version)
    log_dir = Path(tempfile.mkdtemp(prefix="peer-bench-"))
    names = [p for p in args.peers.split(",") if p]
    unknown = [n for n in names if not (PEERS_DIR / n / "peer.json").is_file()]
    if unknown:
        known = sorted(p.parent.name for p in PEERS_DIR.glob("*/peer.json"))
        print(f"unknown peers {unknown}; known: {known}", file=sys.stderr)
        return 2
    peers = load_peers(names)
    install(peers, log_dir)
    if args.setup_only:
        for p in peers:
            print(f"{p.name}: {p.status}")
        return 0 if all(p.status == "ok" for p in peers) else 1

    # The gateway gets a copy of the repository holding only this model version.
    model_base = log_dir / "models"
    shutil.copytree(version_dir, model_base / args.model / str(args.version))
    spec = read_model_card(version_dir).preprocess_spec
    images = make_images(args.sizes, spec)
    print(
        "images: "
        + ", ".join(f"{k} {len(v) / 1024:.0f} KiB" for k, v in images.items())
        + f"; logs in {log_dir}",
        flush=True,
    )
    imgserve = Server(report.REFERENCE, IMGSERVE_FORMS, port=gb.free_port())
    servers = [imgserve, *peers]
    probe = None
    try:
        imgserve.proc = gb.start_server("http", model_base, imgserve.port, log_dir / "imgserve.log")
        for p in peers:
            if p.status == "ok":
                start_peer(p, version_dir, log_dir)
        paths = {s.name: s.config.get("ready", {}).get("path", "/readyz") for s in servers}
        timeouts = {s.name: float(s.config.get("startup_seconds", 180)) for s in servers}
        wait_all_ready(servers, paths, timeouts)
        if imgserve.status != "ok":
            print(f"imgserve did not start: {imgserve.status}; see {log_dir}", file=sys.stderr)
            return 1
        for s in servers:
            if s.status == "ok":
                build_requests(s, images, args.forms)
        check_answers(servers, imgserve)
        batch = Settings.from_env().max_batch_size
        probe_args = argparse.Namespace(
            model_base=str(base), model=args.model, version=args.version
        )
        probe = gb.RawProbe(probe_args, batch, [os.cpu_count() or 1], args.probe_seconds)
        raw = probe.measure()[0]
        rows = run_cells(servers, args, probe)
        largest = max(args.sizes, key=lambda s: 0 if s == "model" else int(s.split("x")[0]))
        profiled = (
            profile(servers, args, largest, images[largest], version_dir, log_dir)
            if args.profile
            else None
        )
    finally:
        if probe is not None:
            probe.close()
        for s in servers:
            stop(s)

    print()
    print(report.table(rows))
    print()
    print("\n".join(report.targets(rows, largest)))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "host": {**host_info(raw), "wall_seconds": round(time.monotonic() - started)},
        "model": f"{args.model}/{args.version}",
        "images": {k: len(v) for k, v in images.items()},
        "servers": {s.name: {"status": s.status, "doc": s.config.get("doc", "")} for s in servers},
        "rows": [asdict(r) for r in rows],
        "ratios": [
            {"peer": k[0], "size": k[1], "form": k[2], "concurrency": k[3], "imgserve_over_peer": v}
            for k, v in report.ratios(rows).items()
        ],
        "profile": profiled,
    }
    out.write_text(json.dumps(report.jsonable(doc), indent=1, allow_nan=False))
    print(f"wrote {out} after {time.monotonic() - started:.0f} s; server logs in {log_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
