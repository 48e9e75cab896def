"""The load client's call for servers that may close the connection after a response.

The gateway bench's ``socket_call`` keeps one connection per client thread; gunicorn's
sync workers answer with ``Connection: close`` and close it (they keep no connection
alive, by design). A closed connection after such an answer is the server's protocol,
not an error: this call opens a new one for the next request, as an HTTP client would.
"""

from __future__ import annotations

import socket


def read_response(sock: socket.socket, buf: bytearray) -> tuple[int, bool]:
    """Read one HTTP/1.1 response with a Content-Length; (status, server closes)."""
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


def socket_call(port: int, payload: bytes):
    """A closed-loop client's call: ``payload`` on the thread's connection, True for a 200;
    a new connection after a ``Connection: close`` answer or a failure."""

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
