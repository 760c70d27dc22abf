"""Browser fixtures for the e2e tests: one headless chromium per module, one guarded context per page.

A page opened through ``open_page`` fails its test at teardown if it made any request outside the app's
origin. Screenshots taken with ``screenshot`` are listed at the end of the run (they live under runs/).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.browser import CHROMIUM_ARGS, RequestGuard, chromium_path, origin_of, save_screenshot

SAVED_SCREENSHOTS: list[Path] = []


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium, headless, driven by Playwright (no browser download). One per module, not per session:
    Playwright's sync API marks an event loop as running in the main thread while it is open, and every asyncio
    test run after it in the same process would fail."""
    executable = chromium_path()
    if executable is None:
        pytest.skip("Debian's chromium is not installed (make system-deps installs it)")
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
    try:
        yield browser
    finally:
        browser.close()
        playwright.stop()


@pytest.fixture
def open_page(chromium) -> Iterator[Callable[[str], tuple[object, RequestGuard]]]:
    """``open_page(base_url)`` → (page, guard): a fresh context whose requests outside base_url fail the test."""
    opened: list[tuple[object, RequestGuard]] = []

    def open_(base_url: str):
        context = chromium.new_context(base_url=base_url, viewport={"width": 1280, "height": 900})
        context.set_default_timeout(20_000)
        guard = RequestGuard(origin_of(base_url))
        guard.attach(context)
        opened.append((context, guard))
        return context.new_page(), guard

    yield open_
    for context, guard in opened:
        context.close()
        if not guard.checked:
            guard.assert_inside()


@pytest.fixture
def screenshot(request) -> Callable[[object, str], Path]:
    """``screenshot(page, name)`` saves a full-page PNG under runs/e2e-screenshots and reports its path."""

    def take(page, name: str) -> Path:
        path = save_screenshot(page, name)
        SAVED_SCREENSHOTS.append(path)
        print(f"screenshot: {path}")
        return path

    return take


def pytest_terminal_summary(terminalreporter) -> None:
    if SAVED_SCREENSHOTS:
        terminalreporter.write_sep("-", "browser screenshots")
        for path in SAVED_SCREENSHOTS:
            terminalreporter.write_line(str(path))
