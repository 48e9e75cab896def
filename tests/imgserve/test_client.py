"""Whose fault a failed call is, and what a call asks for; a web server that is not the
gateway. (Calls against the real gateway, and each failure's exit code end to end:
``test_predict.py``.)"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from imgserve.client import (
    EXIT_REFUSED,
    EXIT_SERVER_FAILED,
    Image,
    Options,
    RequestRefused,
    RestClient,
    ServerFailed,
    error_for_status,
)


@pytest.mark.parametrize("status", [400, 404, 413, 415, 422])
def test_a_4xx_is_the_clients_fault(status):
    error = error_for_status(status, "why", image_index=1)
    assert isinstance(error, RequestRefused)
    assert (error.exit_code, error.image_index, str(error)) == (EXIT_REFUSED, 1, "why")


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_overload_and_5xx_are_the_servers(status):
    error = error_for_status(status, "why")
    assert isinstance(error, ServerFailed)
    assert error.exit_code == EXIT_SERVER_FAILED


def test_options_left_unset_are_not_sent():
    assert Options().fields() == {}
    assert Options(model="m", label="canary", top_k=3).fields() == {
        "model": "m",
        "label": "canary",
        "top_k": 3,
    }


class _NotTheGateway(BaseHTTPRequestHandler):
    """A web server of another kind: an HTML page for /page, 404 for anything else."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        found = self.path.startswith("/page")
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html><body><h1>Some other site</h1></body></html>")

    def log_message(self, *args):
        pass


@pytest.fixture
def other_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotTheGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_a_server_that_is_not_the_gateway_is_reported_plainly(other_server):
    image = Image("a.png", b"\x89PNG")
    client = RestClient(other_server, timeout=10)
    try:
        with pytest.raises(RequestRefused, match=r"^HTTP 404 Not Found$"):
            client.classify([image], Options())
        client.url = other_server + "/page"
        with pytest.raises(ServerFailed, match="no JSON document: is it an imgserve gateway"):
            client.classify([image], Options())
    finally:
        client.close()
