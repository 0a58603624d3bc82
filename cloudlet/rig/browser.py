"""Headless Chromium (Debian's package, installed when missing) for the dashboard's tests:
the page as the browser rendered it, and a screenshot."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cloudlet.rig.apt import apt_install
from cloudlet.rig.process import RigError

# No background traffic: the machines a cloudlet runs on often have no way out.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]  # fmt: skip


def ensure_chromium() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    apt_install("chromium")
    found = shutil.which("chromium")
    if not found:
        raise RigError("apt-get installed chromium but it is not on PATH")
    return found


def _run(url: str, *extra: str, wait_ms: int) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="cloudlet-chromium-") as profile:
        return subprocess.run(
            [ensure_chromium(), *FLAGS, f"--user-data-dir={profile}",
             f"--virtual-time-budget={wait_ms}", "--window-size=1400,1100", *extra, url],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip


def rendered_dom(url: str, wait_ms: int = 6000) -> str:
    """The page's DOM after its scripts ran for `wait_ms` of virtual time."""
    done = _run(url, "--dump-dom", wait_ms=wait_ms)
    if done.returncode != 0 or not done.stdout:
        raise RigError(
            f"chromium --dump-dom {url} failed ({done.returncode}): {done.stderr[-1500:]}"
        )
    return done.stdout


def screenshot(url: str, path: Path, wait_ms: int = 6000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _run(url, f"--screenshot={path}", wait_ms=wait_ms)
    if not path.exists():
        raise RigError(
            f"chromium --screenshot {url} failed ({done.returncode}): {done.stderr[-1500:]}"
        )
    return path


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 1100) -> Iterator[Any]:
    """A page of the rig's Chromium driven by Playwright (clicks, waiting for what the page
    draws): Debian's browser, not a downloaded one. Playwright is a test dependency."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=ensure_chromium(),
            args=[f for f in FLAGS if f != "--headless"],
        )
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()
