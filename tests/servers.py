"""Live servers for tests that need a real process on loopback (signals, RSS, Prometheus)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(log: Path | None = None, **settings: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`marche serve` on a free loopback port with MARCHE_* settings, until ready; yields
    (url, process) and terminates the process on exit. `log`: a file for its output."""
    port = free_port()
    env = os.environ | {"MARCHE_DEVICE": "cpu"}
    env |= {f"MARCHE_{k.upper()}": v for k, v in settings.items()}
    cmd = [sys.executable, "-c", "from marche.cli import main; main()", "serve",
           "--port", str(port)]  # fmt: skip
    out = log.open("w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(30)
        if log:
            out.close()


def wait_for(check, timeout: float, what: str) -> float:
    """Seconds until `check()` is true (an assertion error naming `what` after `timeout`)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.25)
    return time.monotonic() - started
