"""The proxy in front of gunicorn: proxy/gateway.conf.template, run by the real nginx.

The template is rendered as the official nginx image renders it (envsubst of the
``IMGSERVE_PROXY_*`` variables, ``NGINX_ENVSUBST_FILTER``) and included in an
``http {}`` block as the image's nginx.conf includes ``conf.d/``. gunicorn serves the
tiny models behind it on loopback. Slow clients (headers at one byte a second) must
not starve normal ones, one client's connections are capped, and the body limit is
the gateway's own.
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from PIL import Image

from serving.settings import Settings
from tests.deploy.tools import REPO_ROOT, find_tool
from tests.helpers import tiny_models
from tests.helpers.servers import free_port, gunicorn, start, stop, wait_ready

pytestmark = pytest.mark.slow

TEMPLATE = REPO_ROOT / "proxy" / "gateway.conf.template"
#: The official image's NGINX_ENVSUBST_FILTER, set on the sidecar in k8s/base/gateway.yaml.
ENVSUBST_FILTER = "IMGSERVE_PROXY_"
SLOW_CLIENTS = 300
PER_CLIENT_CONNECTIONS = 64


def render(template: str, env: dict[str, str]) -> str:
    """The template as the image's ``20-envsubst-on-templates.sh`` writes it: envsubst of
    the defined variables whose names match the filter, every other ``$name`` untouched."""
    names = " ".join(f"${{{name}}}" for name in env if re.search(ENVSUBST_FILTER, name))
    result = subprocess.run(
        [find_tool("envsubst"), names],
        input=template,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    return result.stdout


def main_config(directory: Path, include: Path) -> str:
    """What the image's nginx.conf provides around ``conf.d/``: the process, the events, and
    writable paths (the image's are under /var/cache/nginx and /var/run)."""
    temp = "\n".join(
        f"    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx's workers would switch to an account that cannot write the test's
    # private temporary directory; the container runs all of nginx as one user.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes 1;\ndaemon off;\npid {directory / 'nginx.pid'};\n"
        "events { worker_connections 4096; }\n"
        f"http {{\n    access_log off;\n{temp}\n    include {include};\n}}\n"
    )


@dataclass
class Proxied:
    url: str
    port: int


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    """gunicorn (tiny models, one worker) behind nginx with the template, both on loopback."""
    tmp = tmp_path_factory.mktemp("proxy")
    models = tiny_models.build_repository(tmp / "models")
    app, app_url, _ = gunicorn(models, tmp, workers="1")
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "IMGSERVE_PROXY_LISTEN": f"127.0.0.1:{port}",
        "IMGSERVE_PROXY_UPSTREAM": app_url.removeprefix("http://"),
    }
    conf = tmp / "gateway.conf"
    conf.write_text(render(TEMPLATE.read_text(), env))
    main = tmp / "nginx.conf"
    main.write_text(main_config(tmp, conf))
    log = tmp / "nginx.log"
    nginx = start([find_tool("nginx"), "-p", str(tmp), "-e", str(log), "-c", str(main)], {}, log)
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", nginx, log, timeout=30)
        yield Proxied(f"http://127.0.0.1:{port}", port)
    finally:
        stop(nginx)
        stop(app)


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_template_renders_only_its_own_variables():
    text = render(TEMPLATE.read_text(), {"IMGSERVE_PROXY_LISTEN": "8080", "HOME": "/root"})
    assert "listen 8080 reuseport;" in text
    # nginx's variables are left for nginx; an unset IMGSERVE_PROXY_* stays visible.
    assert "$binary_remote_addr" in text and "$host" in text
    assert "${IMGSERVE_PROXY_UPSTREAM}" in text


def test_body_limit_is_the_gateways(proxied: Proxied):
    (size,) = re.findall(r"client_max_body_size (\d+)m;", TEMPLATE.read_text())
    limit = Settings().max_body_bytes
    assert int(size) * 1024 * 1024 == limit
    over = requests.post(
        proxied.url + "/v1/classify",
        data=b"\0" * (limit + 1),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert over.status_code == 413
    assert over.headers["Content-Type"] == "application/problem+json"
    assert over.json()["code"] == "payload_too_large"
    # At the limit nginx passes it on: the gateway reads it and finds no image.
    at = requests.post(
        proxied.url + "/v1/classify",
        data=b"\0" * limit,
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert at.status_code == 400 and at.json()["code"] == "undecodable_image"


def slow_header_sockets(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setblocking(False)
        socks.append(s)
    return socks


def trickle(socks: list[socket.socket], stop_at: float, closed: dict[int, float]) -> None:
    """One byte of a request header per socket per second until ``stop_at``; records when
    the server closed each socket."""
    header = b"GET /healthz HTTP/1.1\r\nHost: slow.example\r\nX-Padding: " + b"a" * 200
    t0, i = time.monotonic(), 0
    while time.monotonic() < stop_at and len(closed) < len(socks):
        for n, s in enumerate(socks):
            if n in closed:
                continue
            try:
                if s.recv(1024) == b"":
                    closed[n] = time.monotonic() - t0
                    continue
            except BlockingIOError:
                pass
            except OSError:
                closed[n] = time.monotonic() - t0
                continue
            try:
                s.send(header[i : i + 1])
            except OSError:
                closed[n] = time.monotonic() - t0
        i += 1
        time.sleep(1.0)


def test_slow_clients_do_not_starve_normal_ones(proxied: Proxied):
    socks = slow_header_sockets(proxied.port, SLOW_CLIENTS)
    closed: dict[int, float] = {}
    feeder = threading.Thread(
        target=trickle, args=(socks, time.monotonic() + 20, closed), daemon=True
    )
    feeder.start()
    try:
        time.sleep(2)  # every slow socket has started its header
        image = png()
        latencies = []
        with requests.Session() as session:
            for _ in range(50):
                t0 = time.monotonic()
                r = session.post(
                    proxied.url + "/v1/classify",
                    data=image,
                    headers={"Content-Type": "image/png"},
                    timeout=10,
                )
                latencies.append(time.monotonic() - t0)
                assert r.status_code == 200, r.text
        healthz = requests.get(proxied.url + "/healthz", timeout=5)
        feeder.join(25)
    finally:
        for s in socks:
            s.close()
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(0.99 * (len(latencies) - 1))]
    spread = sorted(closed.values())
    print(
        f"{SLOW_CLIENTS} slow sockets: 50 classify requests p50 {p50 * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms; slow sockets closed by nginx: {len(closed)}, "
        f"after {spread[0] if spread else float('nan'):.0f}-"
        f"{spread[-1] if spread else float('nan'):.0f} s"
    )
    assert healthz.status_code == 200 and healthz.json()["status"] == "ok"
    # A starvation bound, not a speed target: direct to gunicorn the same sockets hold
    # its threads and requests wait for them.
    assert p99 < 1.0, latencies
    # client_header_timeout (10 s): every slow socket is closed by nginx, none served.
    assert len(closed) == SLOW_CLIENTS
    assert spread[0] >= 8 and spread[-1] <= 18, spread


def test_one_client_connections_are_capped(proxied: Proxied):
    # Connections whose headers are in and whose body never comes count against the
    # client's limit (gunicorn sees none of them: nginx buffers the body first).
    head = (
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    held = []
    try:
        for _ in range(PER_CLIENT_CONNECTIONS):
            s = socket.create_connection(("127.0.0.1", proxied.port), timeout=5)
            s.sendall(head)
            held.append(s)
        time.sleep(0.5)
        over = requests.get(proxied.url + "/healthz", timeout=5)
    finally:
        for s in held:
            s.close()
    assert over.status_code == 429, over.text
    assert over.headers["Retry-After"] == "1"
    assert over.json()["code"] == "too_many_connections"
    time.sleep(0.5)  # nginx notices the closed connections
    assert requests.get(proxied.url + "/healthz", timeout=5).status_code == 200
