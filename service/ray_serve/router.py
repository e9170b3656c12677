"""Work-aware routing of engine requests, on Ray Serve 2.60's request-router API.

Ray's default router (power of two choices on ongoing *request counts*) treats a 1-image 16-step
request like a 16-image 256-step one, 256× the work. Here each engine replica reports its
outstanding work through `record_routing_stats` (`MarcheEngine.routing_stats`):

    {"seq": n, "image_steps": queued + running image-steps, "free_slots": pool slots free,
     "start_s": a new request's expected wait under the replica's scheduling policy (what its
     Retry-After and streams' `queued` events say), "step_s": its step time,
     "rows": rows per step}

and the router sends each request to the replica where it would start soonest and whose work
would clear first:

    load(r) = start_s(r) + (reported image_steps(r) + image-steps this router sent r since
              that report + image-steps on their way to r) × step_s(r) / rows(r)

(under fifo the two terms rank alike; under fair a new request starts at once wherever a
slot is free, and `start_s` counts only when the pool is full).

Replicas come back ranked one per rank, best first: Ray's base class takes the first whose
ongoing requests are under `max_ongoing_requests`, so a full replica spills to the next.
Replicas that already refused this request (queue full: the `avoid` keyword) rank last. When
any candidate's stats are missing or stale (no new report for `stale_after_s`), the router
falls back to Ray's default choice among all candidates (one rank: least queue length).

A request's work counts from the moment it ranks a replica first (`hold`), not only once the
replica has accepted it (`on_request_routed`, a round trip later): Serve routes several requests
at once, and without the hold every request of a burst ranked the same idle replica first (4
requests at once all went to one of two idle replicas). A hold ends when its request is routed
(then it counts as sent, to the replica that took it) or after `stale_after_s`.

A router runs in every process that holds a handle (each ingress replica) and corrects only
for its own sends. Serve pickles this module by value; what it records for `/info` goes to
`service.ray_serve.view`, imported by reference, so the ingress in the same process reads it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from service.ray_serve import view

ROUTER_PATH = "service.ray_serve.router:LeastWorkRouter"


class WorkBook:
    """What one router knows of each replica's outstanding work (no Ray in here)."""

    def __init__(self, stale_after_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.stale_after_s, self.clock = stale_after_s, clock
        self._seen: dict[str, tuple[Any, float]] = {}  # replica -> (seq, when first seen)
        self._sent: dict[str, float] = {}  # replica -> image-steps sent since that report
        self._held: dict[Hashable, tuple[str, float, float]] = {}  # request -> (replica,
        # image-steps, when held): requests on their way to the replica they ranked first

    def load(self, replica: str, stats: dict[str, Any]) -> float | None:
        """Seconds of work ahead on `replica` (None: no fresh report)."""
        if "seq" not in stats:
            return None
        now = self.clock()
        if self._seen.get(replica, (None,))[0] != stats["seq"]:  # a new report: it counts
            self._seen[replica] = (stats["seq"], now)  # what was sent before it was taken
            self._sent[replica] = 0.0
        if now - self._seen[replica][1] > self.stale_after_s:
            return None
        held = sum(w for r, w, _ in self._held.values() if r == replica)
        work = stats["image_steps"] + self._sent[replica] + held
        step_s = stats.get("step_s") or 1.0  # not timed yet: rank by work alone
        return stats.get("start_s", 0.0) + work * step_s / max(1, stats.get("rows") or 1)

    def loads(self, replicas: dict[str, dict[str, Any]]) -> dict[str, float | None]:
        """Each replica's `load` from its stats."""
        now = self.clock()
        for request in [q for q, (_, _, t) in self._held.items() if now - t > self.stale_after_s]:
            del self._held[request]  # never routed (cancelled): it stops counting
        return {r: self.load(r, stats) for r, stats in replicas.items()}

    def rank(self, replicas: dict[str, dict[str, Any]], avoid: Iterable[str] = ()) -> list[str]:
        """Replica ids, best first; [] when any report is missing or stale (use the default)."""
        return self.order(self.loads(replicas), avoid)

    def order(self, loads: dict[str, float | None], avoid: Iterable[str] = ()) -> list[str]:
        """`rank` on loads already computed."""
        if not loads or any(load is None for load in loads.values()):
            return []
        avoided = set(avoid)
        order = list(loads)
        random.shuffle(order)  # equal loads (say, all idle): spread, not always the first
        return sorted(order, key=lambda r: (r in avoided, loads[r]))

    def sent(self, replica: str, image_steps: float) -> None:
        self._sent[replica] = self._sent.get(replica, 0.0) + image_steps

    def hold(self, request: Hashable, replica: str, image_steps: float) -> None:
        """`request` ranked `replica` first: its work counts there until it is `routed`."""
        self._held[request] = (replica, image_steps, self.clock())

    def release(self, request: Hashable) -> None:
        """`request` is being ranked again (a retry): its own hold must not weigh its choice."""
        self._held.pop(request, None)

    def routed(self, request: Hashable, replica: str, image_steps: float) -> None:
        """`replica` accepted `request`: sent there, whichever replica it was held for."""
        self.release(request)
        self.sent(replica, image_steps)

    def forget(self, alive: Iterable[str]) -> None:
        keep = set(alive)
        for book in (self._seen, self._sent):
            for replica in [r for r in book if r not in keep]:
                del book[replica]
        for request in [q for q, (r, _, _) in self._held.items() if r not in keep]:
            del self._held[request]


class LeastWorkRouter(RequestRouter):
    """Least outstanding work first (no FIFOMixin: it would hand a replica chosen for one
    request to another request of a different cost)."""

    def initialize_state(self, stale_after_s: float = 2.0) -> None:
        self.book = WorkBook(stale_after_s)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:  # all full: back off before asking again (no spin)
            pending_request.routing_context.should_backoff = True
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        stats = {rid: dict(r.routing_stats or {}) for rid, r in by_id.items()}
        avoid = pending_request.kwargs.get("avoid", ()) if pending_request else ()
        if pending_request is not None:
            self.book.release(id(pending_request))
        loads = self.book.loads(stats)
        ranked = self.book.order(loads, avoid)
        view.record(stats, loads)
        if not ranked:
            return [candidate_replicas]  # stale: Ray's default (least queue length)
        if pending_request is not None:  # Ray's base class takes the first rank unless full
            self.book.hold(id(pending_request), ranked[0], _work(pending_request))
        return [[by_id[rid]] for rid in ranked]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        self.book.routed(id(pending_request), replica_id.unique_id, _work(pending_request))

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)  # a new replica set: forget the ones that left
        self.book.forget(r.replica_id.unique_id for r in replicas)
        view.forget({r.replica_id.unique_id for r in replicas})


def _work(pending_request: PendingRequest) -> float:
    """The request's image-steps (`client.work`, passed as the `work` keyword)."""
    return float(pending_request.kwargs.get("work", 0))
