"""Headless Chromium (Debian's `chromium`) screenshots of the project's web UIs, for docs/img/."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

IMAGES = Path(__file__).resolve().parents[2] / "docs" / "img"
# Without the background-networking flags Chromium keeps dialling Google's hosts, which a closed
# network refuses; the virtual-time budget lets a single-page app finish its requests first.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def find_chromium() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("Chromium not found: apt-get install chromium")
    return chromium


def wait_for(url: str, seconds: float) -> bytes:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer in {seconds:.0f} s") from None
            time.sleep(1)


def screenshot(chromium: str, url: str, target: Path, size: str = "1440,900", budget_ms: int = 20000) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--window-size={size}", f"--virtual-time-budget={budget_ms}",
             f"--user-data-dir={profile}", f"--screenshot={target}", url],
            check=True, capture_output=True, timeout=180,
        )
    print(f"{url} -> {target}")
