"""Browser-test helpers: the real service as a process, Debian's chromium driven headless by Playwright, and a
guard that records every request a page makes and refuses (aborts) any that leaves the app's origin.

Playwright is pointed at the system browser (``executable_path``); nothing here downloads a browser. CI runs as
root, where chromium's sandbox cannot start, hence ``--no-sandbox`` (the pages are our own, served locally).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT_DIR = ROOT / "runs" / "e2e-screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    """Debian's chromium, if installed (``make system-deps`` installs it)."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_service(model_dir: Path, workdir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """``python -m service`` on a free port; yields its base URL once ``/readyz`` answers 200."""
    port = free_port()
    log_path = workdir / "service.log"
    process_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "service", "--model-dir", str(model_dir),
                                    "--port", str(port), "--device", "cpu", *args],
                                   cwd=ROOT, env=process_env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, log_path.read_text()
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                assert time.monotonic() < deadline, "service did not become ready in 120 s:\n" + log_path.read_text()
                time.sleep(0.2)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@dataclass
class RequestGuard:
    """Every request a browser context makes; those outside ``origin`` are aborted and kept in ``outside``."""

    origin: str
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # (method, url, headers)
    outside: list[str] = field(default_factory=list)
    checked: bool = False  # the test looked at `outside` itself

    def attach(self, context) -> None:
        context.on("request", lambda request: self.requests.append((request.method, request.url, request.headers)))
        context.route("**/*", self._route)

    def _route(self, route) -> None:
        url = route.request.url
        if url.startswith(("data:", "blob:")) or origin_of(url) == self.origin:
            route.continue_()
        else:
            self.outside.append(url)
            route.abort("blockedbyclient")

    def assert_inside(self, what: str = "the page") -> None:
        """Fail now (and only once) if a request left the app's origin."""
        self.checked = True
        assert self.outside == [], f"{what} asked outside the app for {self.outside}"

    def urls(self, path_prefix: str = "") -> list[str]:
        return [url for _, url, _ in self.requests if urlsplit(url).path.startswith(path_prefix)]


def save_screenshot(page, name: str) -> Path:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOT_DIR / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
