"""The engine replicas as this process's router last saw them, for `/info`.

`LeastWorkRouter` (pickled by value into every handle holder) records here; this module is
imported by reference, so the ingress in the same process reads what its router saw. Empty under
Ray's default router."""

from __future__ import annotations

import threading
import time
from typing import Any

_lock = threading.Lock()
_replicas: dict[str, dict[str, Any]] = {}  # replica id -> last stats, load, when seen


def record(stats: dict[str, dict[str, Any]], loads: dict[str, float | None]) -> None:
    now = time.monotonic()
    with _lock:
        for replica, s in stats.items():
            _replicas[replica] = {**s, "load_s": loads.get(replica), "seen": now}


def forget(alive: set[str]) -> None:
    with _lock:
        for replica in [r for r in _replicas if r not in alive]:
            del _replicas[replica]


def replicas() -> list[dict[str, Any]]:
    """One entry per replica: its id, last reported work and the router's load estimate."""
    now = time.monotonic()
    with _lock:
        return [
            {"replica": r, **{k: v for k, v in s.items() if k != "seen"},
             "stats_age_s": round(now - s["seen"], 3)}
            for r, s in sorted(_replicas.items())
        ]  # fmt: skip
