"""Screenshots of a real TensorBoard on a run or sweep dir, as a user sees it in a browser.

    python docs/tensorboard_screenshot.py outputs/multirun/2026-12-03/09-00-00 [--out docs]

Starts ``tensorboard --logdir DIR`` on a free local port, waits until it has loaded the
scalars, and has headless Chromium (``apt-get install chromium``) take
``tensorboard_scalars_tab.png`` (the Scalars tab, groups sorted by name: train/ and val/
curves, no single values ahead of them) and ``tensorboard_hparams_tab.png`` (the HParams
table: one row per job, its overrides and key values as given, the val/ metrics).
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TABS = {"scalars": "tensorboard_scalars_tab.png", "hparams": "tensorboard_hparams_tab.png"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_scalars(base: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/data/plugin/scalars/tags", timeout=5) as response:
                if any("val/mIoU" in tags for tags in json.loads(response.read()).values()):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"TensorBoard at {base} loaded no val/mIoU in {seconds:.0f} s")


def screenshot(browser: str, url: str, path: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no state from another session
        subprocess.run(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
             "--window-size=1400,1000", "--virtual-time-budget=20000", f"--screenshot={path}", url],
            check=True, capture_output=True, timeout=120,
        )


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("no headless browser: apt-get install chromium")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(args.logdir), "--host", "127.0.0.1", "--port", str(port),
         "--load_fast=false", "--reload_interval=0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_scalars(base)
        args.out.mkdir(parents=True, exist_ok=True)
        written = []
        for tab, name in TABS.items():
            screenshot(browser, f"{base}/#{tab}", args.out / name)
            written.append(args.out / name)
        print("\n".join(str(path) for path in written))
        return written
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
