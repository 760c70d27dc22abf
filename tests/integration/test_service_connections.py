"""What only a real socket shows: requests whose headers or body stop arriving are answered 408 (or closed) within
the read timeout, and a hostile request never costs the client its keep-alive connection."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

from service_testing import image_bytes, live_server, noise_image

READ_TIMEOUT_S = 1.0


def connect(base: str) -> socket.socket:
    url = urlsplit(base)
    sock = socket.create_connection((url.hostname, url.port), timeout=30)  # far above the read timeout
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length bodies only); (0, {}, b"") if the server closed without a word."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, {}, b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def request(method: str, path: str, body: bytes = b"", content_type: str = "image/png") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: macula.test\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_half_sent_headers_are_answered_408_within_the_read_timeout(model_dir, tmp_path):
    with live_server(model_dir, tmp_path, read_timeout_s=READ_TIMEOUT_S) as base:
        for partial in (b"POST /v1/predict HTTP/1.1\r\nHost: macula.test\r\nContent-Ty", b"GET /heal", b""):
            with connect(base) as sock:
                sock.sendall(partial)
                status, headers, body = read_response(sock)
                assert status == 408, partial
                assert json.loads(body)["code"] == "request_timeout" and headers["connection"] == "close"
                assert sock.recv(1) == b""  # and the connection is closed


def test_a_body_that_stops_arriving_is_answered_408(model_dir, tmp_path):
    blob = image_bytes(noise_image(1, 40, "L"))
    with live_server(model_dir, tmp_path, read_timeout_s=READ_TIMEOUT_S) as base:
        with connect(base) as sock:
            sock.sendall(request("POST", "/v1/predict", blob)[:-len(blob) // 2])  # Content-Length promises more
            status, _, body = read_response(sock)
        assert status == 408 and json.loads(body) == {
            "detail": f"the request body did not arrive within {READ_TIMEOUT_S:g} s", "code": "request_timeout"}
        with connect(base) as sock:  # a complete request on a fresh connection is served as usual
            sock.sendall(request("POST", "/v1/predict", blob))
            assert read_response(sock)[0] == 200


def test_hostile_requests_keep_the_connection_alive(model_dir, tmp_path):
    deep = b'{"images": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    blob = image_bytes(noise_image(2, 40, "L"))
    hostile = [request("POST", "/v1/predict", deep, "application/json"),
               request("POST", "/v1/predict?top_k=3.0", blob),
               request("POST", "/v1/predict", b"%PDF-1.4 not an image", "image/png"),
               request("POST", "/v1/predict", b"\x89PNG\r\n\x1a\n" + b"\0" * 100)]
    with live_server(model_dir, tmp_path) as base, connect(base) as sock:
        for one in hostile:  # all on one keep-alive connection, then a good request on it too
            sock.sendall(one)
            status, headers, body = read_response(sock)
            assert 400 <= status < 500 and "code" in json.loads(body), (status, body)
            assert headers.get("connection") != "close", headers
        sock.sendall(request("POST", "/v1/predict", blob))
        assert read_response(sock)[0] == 200


def test_a_header_timeout_is_counted_as_a_rejection(model_dir, tmp_path):
    import httpx

    with live_server(model_dir, tmp_path, read_timeout_s=READ_TIMEOUT_S) as base:
        with connect(base) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            assert read_response(sock)[0] == 408
        text = httpx.get(f"{base}/metrics", timeout=10).text
    assert 'macula_rejections_total{reason="read_timeout"} 1.0' in text
