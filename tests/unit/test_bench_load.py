"""The load generator sends the exact JPEG bytes as a raw image/jpeg body and reports parseable numbers."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from bench.load.wrk import parse_output, run_wrk, wrk_command
from bench.payload import JPEG_SIZE, jpeg_bytes, write_jpeg


class _Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str]] = []

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Recorder.seen.append((self.headers["Content-Type"], hashlib.sha256(body).hexdigest()))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_jpeg_is_a_real_photo_of_the_requested_size(tmp_path):
    path = write_jpeg(tmp_path / "cat.jpg")
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.size == JPEG_SIZE and image.mode == "RGB"
        assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 1000  # a photo, not a flat fill
    assert path.read_bytes() == jpeg_bytes()  # deterministic: every server gets the same bytes


def test_parse_output_finds_the_json_line_and_rejects_missing():
    out = 'Running 1s test\nWRK_JSON {"requests": 3, "req_per_s": 3.0}\nTransfer/sec: 1KB\n'
    assert parse_output(out) == {"requests": 3, "req_per_s": 3.0}
    with pytest.raises(RuntimeError, match="WRK_JSON"):
        parse_output("Running 1s test\n")


def test_wrk_command_uses_one_thread_and_passes_body_and_type(tmp_path):
    cmd = wrk_command("http://127.0.0.1:1/x", tmp_path / "a.jpg", concurrency=8, duration_s=2.4)
    assert cmd[1:7] == ["-t", "1", "-c", "8", "-d", "2s"]
    assert cmd[-3:] == ["--", str(tmp_path / "a.jpg"), "image/jpeg"]


def test_wrk_posts_the_exact_jpeg_bytes_and_reports_latency(tmp_path):
    path = write_jpeg(tmp_path / "cat.jpg")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Recorder.seen.clear()
    try:
        result = run_wrk(f"http://127.0.0.1:{server.server_port}/predict", path, concurrency=2, duration_s=1)
    finally:
        server.shutdown()
        server.server_close()
    assert 0 < result.requests <= len(_Recorder.seen) <= result.requests + 2  # + requests still in flight at the end
    assert set(_Recorder.seen) == {("image/jpeg", hashlib.sha256(path.read_bytes()).hexdigest())}
    assert result.error_count == 0
    assert 0 < result.p50_ms <= result.p95_ms <= result.p99_ms <= result.max_ms
    assert result.wrk_cpu_s >= 0 and result.to_dict()["wrk_cpu_share"] >= 0
