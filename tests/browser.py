"""The browser harness: a real ``mlflow ui`` on 127.0.0.1 and Debian's headless Chromium driven by Playwright.

Nothing is downloaded: Playwright drives ``/usr/bin/chromium`` (``make install`` installs it where it can).
Screenshots go to ``$RAYMIA_SCREENSHOTS`` when set (the README's come from there), else to a temp folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1280, "height": 760}


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or ``None`` when they can."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the Python package 'playwright' is not installed (pip install -e '.[dev]')"
    if not Path(CHROMIUM).exists():
        return (f"no Chromium at {CHROMIUM}: 'make install' installs Debian's chromium when run as root, "
                "else run 'sudo apt-get install chromium'")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_ui(tracking_uri: str, *, timeout: float = 180) -> Iterator[str]:
    """``mlflow ui`` on a free 127.0.0.1 port against ``tracking_uri`` (one worker, no job runner); yields its base
    URL and stops its whole process group afterwards."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", tracking_uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow ui exited with {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
            try:
                if requests.get(f"{base}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow ui did not answer on {base} within {timeout:.0f} s")
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium (Playwright ``Browser``) on Debian's binary."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def shoot(page, name: str, fallback: Path) -> Path:  # noqa: ANN001 - a Playwright Page
    """Screenshot ``page`` as ``<name>.png`` in ``$RAYMIA_SCREENSHOTS`` (or ``fallback``)."""
    folder = Path(os.environ.get("RAYMIA_SCREENSHOTS") or fallback)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    if shutil.which("optipng"):
        subprocess.run(["optipng", "-quiet", "-o2", str(path)], check=False)
    return path
