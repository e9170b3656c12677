"""Who runs in the next step: the schedule phase's policies.

At every step boundary the continuous scheduler describes each request to its policy as a
`Claim` (rows it holds in the pool, images not admitted yet) and asks for an **allotment**:
how many rows each request runs in this step. A request given fewer rows than it holds has
the rest **paused**: they keep their slots (caches, generator, step) and run again later,
exactly where they stopped. A request given more rows than it holds has new images admitted
into free slots. The scheduler then chooses which rows (`choose_rows`) and steps them.

Three policies (`MARCHE_SCHEDULING_POLICY`):

* `fifo`: admission in arrival order, a request's images all at once, never overtaken,
  never paused. Large requests are never starved; small ones wait behind them.
* `fair` (default): deficit round robin over tenants in image-steps: each step's `width`
  rows are shared max-min fairly among tenants, each tenant's deficit gains its share every
  step, and rows go one at a time to the tenant furthest behind. Within a tenant, requests
  whose demand is within the max-min fair level run whole (a small request never waits
  behind a big one), and the bottlenecked rest run oldest first (`within_tenant`). A
  request's images are admitted as its rows allow.
* `deadline`: rows by (priority, deadline, arrival), lower first, as vLLM's priority
  scheduling, with aging: a request's priority improves by one every `aging_s` it has
  waited since it arrived, so a low priority delays a request but cannot starve it.

Policies are plain objects on the worker thread: no locks, no engine, no clock of their own
(`now` is passed in), so they are tested alone (tests/service/test_policies.py).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from service.core.jobs import MAX_IMAGES, Job

POLICIES = ("fifo", "fair", "deadline")


@dataclass(eq=False)
class Claim:
    """A request at a step boundary, as a policy sees it."""

    job: Job
    resident: int  # its unfinished rows in the pool (run last step, or paused)
    pending: int  # its images not admitted yet
    admitted: bool  # some of its images are (or were) in the pool

    @property
    def demand(self) -> int:
        """Rows it could use in this step."""
        return self.resident + self.pending


Allotment = dict[Job, int]  # rows each request runs in this step (> resident: admit the rest)


@dataclass
class Backlog:
    """The queue as a wait estimate sees it (taken under the queue's lock)."""

    running: Sequence[Claim]  # admitted requests
    waiting: Sequence[Job]  # in arrival order
    width: int  # rows a step runs
    slots: int  # the pool's slots

    def claims(self, without: Job | None = None) -> list[Claim]:
        """The admitted requests' claims, then the waiting ones' (but `without`'s)."""
        waiting = [Claim(j, 0, len(j.seeds), False) for j in self.waiting if j is not without]
        return [*self.running, *waiting]

    @property
    def free(self) -> int:
        """Slots no resident row holds."""
        return self.slots - sum(c.resident for c in self.running)

    def rows_left(self) -> list[float]:
        """Steps left of each resident row (a request's unfinished images share its work)."""
        left = []
        for c in self.running:
            unfinished = max(1, len(c.job.seeds) - len(c.job.images))
            left += [c.job.work_left / unfinished] * c.resident
        return left


class Policy(Protocol):
    name: str
    pauses: bool  # may run fewer rows than a request holds (the pool needs room for those)

    def allot(
        self, claims: Sequence[Claim], width: int, free: int, now: float, reserve: int = 0
    ) -> Allotment:
        """Rows per request: at most `width` in all (fifo: an idle engine takes a request
        wider than that whole), at most `free` new images admitted, of which admitted
        requests growing take none of the last `reserve` (kept for requests not admitted
        yet). `claims`: admitted requests in admission order, then waiting ones in arrival
        order."""
        ...

    def order(self, waiting: Sequence[Job], now: float) -> list[Job]:
        """The waiting requests in the order they will start."""
        ...

    def start_steps(self, backlog: Backlog, job: Job, now: float) -> float:
        """Steps until `job` runs its first step: a waiting request, or one arriving now
        (not in `backlog.waiting`: it would join at the back)."""
        ...


class Fifo:
    """Today's continuous batching: admitted requests run all their rows; the oldest waiting
    request joins whole when its images fit, and nothing overtakes it."""

    name, pauses = "fifo", False

    def allot(
        self, claims: Sequence[Claim], width: int, free: int, now: float, reserve: int = 0
    ) -> Allotment:
        rows = {c.job: c.resident for c in claims if c.admitted}
        used = sum(rows.values())
        for c in claims:
            if c.admitted:
                continue
            if (used and used + c.demand > width) or c.demand > free:
                break  # the head waits for rows (an idle engine takes it anyway)
            rows[c.job] = c.demand
            used, free = used + c.demand, free - c.demand
        return rows

    def order(self, waiting: Sequence[Job], now: float) -> list[Job]:
        return list(waiting)

    def start_steps(self, backlog: Backlog, job: Job, now: float) -> float:
        """Everything admitted and everything that arrived before it runs first."""
        before = waiting_before(backlog, job)
        ahead = sum(c.job.work_left for c in backlog.running) + sum(j.work_left for j in before)
        return math.ceil(ahead / max(1, backlog.width))


class Fair:
    """Deficit round robin over tenants (`Job.tenant`); within a tenant, max-min fair levels
    with the bottlenecked requests served oldest first."""

    name, pauses = "fair", True

    def __init__(self) -> None:
        self.deficit: dict[str, float] = {}  # image-steps owed to each tenant

    def allot(
        self, claims: Sequence[Claim], width: int, free: int, now: float, reserve: int = 0
    ) -> Allotment:
        tenants, totals = tenant_shares(claims, width)
        limit = float(width)
        self.deficit = {  # owed at most one step's worth; tenants that left drop out
            t: min(limit, self.deficit.get(t, 0.0) + share)
            for t, share in zip(tenants, totals, strict=True)
        }
        queues = {t: within_tenant(cs, share) for (t, cs), share in
                  zip(tenants.items(), totals, strict=True)}  # fmt: skip
        rows: Allotment = {}
        # rows one at a time to the tenant furthest behind (ties: the first to arrive)
        heap = [(-self.deficit[t], i, t) for i, t in enumerate(tenants)]
        heapq.heapify(heap)
        while heap and width:
            owed, i, t = heapq.heappop(heap)
            queue = queues[t]
            while queue:  # its next row that can run: held, or a new image with a slot
                c = queue[0]
                given = rows.get(c.job, 0)
                if given < c.demand and (given < c.resident or
                                         free > (reserve if c.admitted else 0)):  # fmt: skip
                    break
                queue.popleft()  # done, or needs a slot none is free for: the next request
            if not queue:
                continue
            rows[c.job] = given + 1
            width, free = width - 1, free - (given >= c.resident)
            heapq.heappush(heap, (owed + 1, i, t))
        for t in tenants:  # spare rows taken are owed back, one step's worth
            given = sum(rows.get(c.job, 0) for c in tenants[t])
            self.deficit[t] = max(-limit, self.deficit[t] - given)
        return rows

    def order(self, waiting: Sequence[Job], now: float) -> list[Job]:
        return list(waiting)  # free slots go to the most owed: the longest waiting

    def start_steps(self, backlog: Backlog, job: Job, now: float) -> float:
        """Within its tenant's fair level, a request runs as soon as it has a slot: at once
        while slots are free, else when resident rows finish (`slot_steps`). Bottlenecked,
        it waits for the requests ahead of it in its tenant (those within the level, and the
        older bottlenecked ones) to leave it rows: their work over the tenant's share."""
        me = Claim(job, 0, len(job.seeds), False)
        tenants, totals = tenant_shares([*backlog.claims(without=job), me], backlog.width)
        share = dict(zip(tenants, totals, strict=True))[job.tenant]
        order = list(within_tenant(tenants[job.tenant], share))
        ahead = order[: order.index(me)]
        level = water_fill(share, [c.demand for c in order])[order.index(me)]
        if level >= me.demand - 1e-9:  # within the level: it needs only a slot
            return slot_steps(backlog, sum(not c.admitted for c in ahead))
        return math.ceil(sum(c.job.work_left for c in ahead) / max(1.0, share))


class Deadline:
    """Rows by (aged priority, deadline, arrival): earliest deadline first within a priority."""

    name, pauses = "deadline", True

    def __init__(self, aging_s: float = 10.0) -> None:
        self.aging_s = aging_s

    def rank(self, job: Job, now: float) -> tuple[int, float, float]:
        aged = job.priority - math.floor(max(0.0, now - job.enqueued_at) / self.aging_s)
        return aged, job.deadline, job.enqueued_at

    def order(self, waiting: Sequence[Job], now: float) -> list[Job]:
        return sorted(waiting, key=lambda j: self.rank(j, now))

    def start_steps(self, backlog: Backlog, job: Job, now: float) -> float:
        """The work of every request ranked before it runs first, and it needs a slot."""
        rank = self.rank(job, now)
        jobs = [c.job for c in backlog.running] + [j for j in backlog.waiting if j is not job]
        ahead = sum(j.work_left for j in jobs if self.rank(j, now) < rank)
        k = sum(self.rank(j, now) < rank for j in backlog.waiting if j is not job)
        return max(math.ceil(ahead / max(1, backlog.width)), slot_steps(backlog, k))

    def allot(
        self, claims: Sequence[Claim], width: int, free: int, now: float, reserve: int = 0
    ) -> Allotment:
        rows: Allotment = {}
        for c in sorted(claims, key=lambda c: self.rank(c.job, now)):
            spare = max(0, free - (reserve if c.admitted else 0))
            n = min(c.demand, width, c.resident + spare)
            if n > 0:
                rows[c.job] = n
                width, free = width - n, free - max(0, n - c.resident)
        return rows


def make_policy(name: str, aging_s: float = 10.0) -> Policy:
    if name == "fifo":
        return Fifo()
    if name == "fair":
        return Fair()
    if name == "deadline":
        return Deadline(aging_s)
    raise ValueError(f"scheduling policy must be one of {POLICIES}, not {name!r}")


def pool_rows(max_batch_size: int, policy: Policy, pause_rows: int | None = None) -> int:
    """Slots in the engine's pool. A policy that pauses admits a request's images as rows
    free up, so it needs the rows of one step plus room for paused rows (`pause_rows`,
    default `max_batch_size`; half of that room is the reserve, `reserve_rows`); fifo
    admits a request whole and runs one wider than `max_batch_size` on an idle engine, so
    any single request must fit. A slot costs its caches: the pool's memory grows with it
    (docs/SERVING.md#pauses-and-the-pools-size)."""
    if not policy.pauses:
        return max(max_batch_size, MAX_IMAGES)
    return max_batch_size + (max_batch_size if pause_rows is None else pause_rows)


def waiting_before(backlog: Backlog, job: Job) -> Sequence[Job]:
    """The waiting requests that arrived before `job` (all of them if it is arriving now)."""
    waiting = backlog.waiting
    return waiting[: waiting.index(job)] if job in waiting else waiting


def slot_steps(backlog: Backlog, k: int) -> float:
    """Steps until the waiting request with `k` others ahead of it gets a slot: the pool's
    free slots first, then resident rows as they finish, soonest first, each running at
    width / resident rows a step; past them, the same again."""
    left, free = sorted(backlog.rows_left()), backlog.free
    if k < free:
        return 0.0
    if not left:
        return 0.0
    pace = max(1.0, len(left) / max(1, backlog.width))
    rounds, i = divmod(k - free, len(left))
    return pace * (left[i] + rounds * left[-1])


def reserve_rows(slots: int, width: int, policy: Policy) -> int:
    """Slots that requests already admitted may not grow into: half the room beyond a
    step's rows, so a new request finds a slot even after the running ones have grown
    while it was quieter (their paused rows keep their slots)."""
    return max(0, slots - width) // 2 if policy.pauses else 0


def water_fill(capacity: float, demands: Sequence[float]) -> list[float]:
    """Max-min fair shares of `capacity`: nobody gets more than its demand, and what a small
    demand leaves is shared equally among the larger ones."""
    shares = [0.0] * len(demands)
    order = sorted(range(len(demands)), key=lambda i: demands[i])
    for k, i in enumerate(order):
        shares[i] = min(demands[i], capacity / (len(order) - k))
        capacity -= shares[i]
    return shares


def tenant_shares(
    claims: Sequence[Claim], width: int
) -> tuple[dict[str, list[Claim]], list[float]]:
    """The claims by tenant (in first-claim order) and each tenant's max-min fair share of
    a step's `width` rows."""
    tenants: dict[str, list[Claim]] = {}
    for c in claims:
        tenants.setdefault(c.job.tenant, []).append(c)
    return tenants, water_fill(width, [sum(c.demand for c in cs) for cs in tenants.values()])


def within_tenant(claims: Sequence[Claim], share: float) -> deque[Claim]:
    """A tenant's requests in the order its rows go: first those whose demand is within the
    max-min fair level of the tenant's `share` (they run whole: a small request never waits
    behind a big one), then the bottlenecked ones, oldest first (equal shares would make
    every big request end as late as the last: processor sharing)."""
    shares = water_fill(share, [c.demand for c in claims])
    whole = [c for c, s in zip(claims, shares, strict=True) if s >= c.demand - 1e-9]
    rest = [c for c in claims if c not in whole]
    return deque(sorted(whole, key=arrival) + sorted(rest, key=arrival))


def arrival(claim: Claim) -> float:
    return claim.job.enqueued_at
