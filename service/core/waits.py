"""How long requests waited, per tenant and per priority: what /info shows (Prometheus has
the full histograms, `marche_tenant_queue_wait_seconds`)."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

WINDOW = 256  # the newest waits kept per tenant and per priority
MAX_TENANTS = 64  # distinct tenants tracked; later ones count as "other"


class WaitBook:
    """The newest admission waits of each tenant and each priority (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tenants: dict[str, deque[float]] = {}
        self._priorities: dict[int, deque[float]] = {}
        self._counts: dict[str, int] = {}

    def tenant_label(self, tenant: str) -> str:
        """The tenant's name, or "other" past `MAX_TENANTS` (bounded metric labels)."""
        with self._lock:
            if tenant in self._tenants or len(self._tenants) < MAX_TENANTS:
                return tenant
        return "other"

    def record(self, tenant: str, priority: int, wait_s: float) -> str:
        """Note a wait; returns the tenant's label (`tenant_label`)."""
        label = self.tenant_label(tenant)
        with self._lock:
            self._tenants.setdefault(label, deque(maxlen=WINDOW)).append(wait_s)
            self._priorities.setdefault(priority, deque(maxlen=WINDOW)).append(wait_s)
            self._counts[label] = self._counts.get(label, 0) + 1
        return label

    def view(self) -> dict[str, Any]:
        """{"tenants": {name: summary}, "priorities": {p: summary}}; a summary is admitted
        (all time) and the newest waits' count, p50, p99 and max in seconds."""
        with self._lock:
            tenants = {t: summary(w) | {"admitted": self._counts[t]}
                       for t, w in self._tenants.items()}  # fmt: skip
            priorities = {str(p): summary(w) for p, w in sorted(self._priorities.items())}
        return {"tenants": tenants, "priorities": priorities}


def summary(waits: deque[float]) -> dict[str, Any]:
    ordered = sorted(waits)

    def q(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 4)

    return {"window": len(ordered), "wait_p50_s": q(0.5), "wait_p99_s": q(0.99),
            "wait_max_s": round(ordered[-1], 4)}  # fmt: skip
