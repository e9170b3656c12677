"""The scheduling policies alone (allotments from claims), then under the worker with a fake
engine: a small request overtakes a big one without waiting for it, tenants share rows,
priorities and aging, pauses keep rows and resume them, fifo unchanged."""

from __future__ import annotations

import threading
import time

import pytest

from service.core.jobs import Job
from service.core.policies import Backlog, Claim, Deadline, Fair, Fifo, pool_rows, water_fill
from service.core.worker import EngineWorker, JobCancelled
from tests.service.test_scheduler import FakeRows, job


def claims_of(*specs: tuple[Job, int, int, bool]) -> list[Claim]:
    return [Claim(*spec) for spec in specs]


def test_water_fill_is_max_min_fair():
    assert water_fill(16, [1, 16]) == [1, 15]
    assert water_fill(16, [16, 16]) == [8, 8]
    assert water_fill(4, [1, 1, 1, 1, 1]) == pytest.approx([0.8] * 5)
    assert water_fill(16, [2, 3]) == [2, 3]  # demand below capacity: all of it
    assert water_fill(10, []) == []


def test_fair_shares_rows_per_tenant_first():
    a = [job(0, list(range(4)), tenant="a") for _ in range(3)]
    b = job(0, [0, 1, 2, 3], tenant="b")
    rows = Fair().allot([Claim(j, 0, 4, False) for j in [*a, b]], 8, 16, 0.0)
    assert rows == {a[0]: 4, b: 4}  # b: half the rows, not a quarter; a's oldest first


def test_fair_gives_a_newcomer_its_share_at_once_and_pauses_the_big_one():
    big, small = job(1, list(range(4))), job(2, [0])
    policy = Fair()
    rows = policy.allot(claims_of((big, 4, 0, True), (small, 0, 1, False)), 4, 4, 0.0)
    assert rows == {big: 3, small: 1}  # one of big's rows pauses (it keeps its slot)
    assert policy.allot(claims_of((big, 4, 0, True)), 4, 4, 0.0) == {big: 4}


def test_fair_equal_requests_beyond_the_rows_run_oldest_first():
    """No time-slicing among equals: it would make every one of them end as late as the
    last."""
    jobs = [job(i, [0]) for i in range(5)]
    claims = [Claim(j, 1, 0, True) for j in jobs]
    assert Fair().allot(claims, 4, 0, 0.0) == {j: 1 for j in jobs[:4]}


def test_fair_rotates_tenants_when_more_tenants_than_rows():
    jobs = [job(i, [0], tenant=str(i)) for i in range(5)]
    policy, runs = Fair(), {j: 0 for j in jobs}
    for _ in range(10):
        rows = policy.allot([Claim(j, 1, 0, True) for j in jobs], 4, 0, 0.0)
        assert sum(rows.values()) == 4  # work-conserving
        for j in rows:
            runs[j] += 1
    assert sorted(runs.values()) == [8, 8, 8, 8, 8]  # each ran 4/5 of the steps


def test_fair_needs_a_free_slot_to_admit_and_stays_work_conserving():
    big, small = job(1, list(range(4))), job(2, [0])
    rows = Fair().allot(claims_of((big, 4, 4, True), (small, 0, 1, False)), 4, 0, 0.0)
    assert rows == {big: 4}  # no slot for the newcomer: big keeps every row


def test_fifo_admits_whole_requests_in_order():
    running, big, small = job(1, [0, 1]), job(2, [0, 1, 2]), job(3, [0])
    claims = claims_of((running, 2, 0, True), (big, 0, 3, False), (small, 0, 1, False))
    assert Fifo().allot(claims, 4, 2, 0.0) == {running: 2}  # big waits; small may not pass
    assert Fifo().allot(claims[1:], 4, 4, 0.0) == {big: 3, small: 1}


def test_deadline_orders_by_priority_then_deadline_and_ages():
    now = time.monotonic()
    low = job(1, [0, 1, 2, 3], priority=5)
    urgent = job(2, [0], priority=0, timeout=5)
    relaxed = job(3, [0], priority=0, timeout=50)
    policy = Deadline(aging_s=10)
    claims = claims_of((low, 4, 0, True), (relaxed, 0, 1, False), (urgent, 0, 1, False))
    assert policy.allot(claims, 4, 4, now) == {urgent: 1, relaxed: 1, low: 2}
    assert policy.allot(claims, 1, 4, now) == {urgent: 1}
    # 60 s later low has aged past both: its priority 5 counts as -1
    for j in (low, urgent, relaxed):
        j.enqueued_at = now - 60
    urgent.enqueued_at = relaxed.enqueued_at = now
    assert policy.allot(claims, 4, 4, now) == {low: 4}


def test_the_pool_has_room_for_paused_rows_only_when_the_policy_pauses():
    assert pool_rows(16, Fifo()) == 16
    assert pool_rows(4, Fifo()) == 16  # fifo: any single request (16 images) fits whole
    assert pool_rows(16, Fair()) == 32
    assert pool_rows(4, Fair()) == 8  # admitted progressively: a step's rows, 4 paused
    assert pool_rows(128, Deadline(), pause_rows=32) == 160


@pytest.fixture
def fair():
    rows = FakeRows(capacity=8)
    worker = EngineWorker(None, rows=rows, max_batch_size=4, policy="fair")
    worker.start(warmup=False)
    yield worker, rows
    if rows.gate is not None:
        rows.gate.set()
    worker.stop(5)


def test_fair_a_small_request_starts_at_the_next_step_behind_a_big_one(fair):
    worker, rows = fair
    rows.delay = 0.01
    big = job(1, [0, 1, 2, 3], steps=20)
    worker.submit(big)
    while not rows.steps:
        time.sleep(0.001)
    small = job(2, [7], steps=3)
    worker.submit(small)
    assert small.future.result(5).images[0, 0, 0, 0] == 7
    big_result = big.future.result(5)
    joined = next(i for i, s in enumerate(rows.steps) if 2 in s)
    assert rows.steps[joined].count(1) == 3  # one of big's rows paused for it
    assert all(s.count(2) == 1 for s in rows.steps[joined : joined + 3])
    assert big_result.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3]  # in image order
    assert max(map(len, rows.steps)) <= 4 and rows.live == 0


def test_fair_a_big_request_is_admitted_progressively_and_its_images_stay_in_step(fair):
    worker, rows = fair
    rows.gate = threading.Event()
    smalls = [job(10 + i, [i], steps=4) for i in range(3)]
    for s in smalls:
        worker.submit(s)
    time.sleep(0.1)
    big = job(1, list(range(8)), steps=4)  # 8 images on 4 rows a step
    worker.submit(big)
    rows.gate.set()
    assert big.future.result(5).images[:, 0, 0, 0].tolist() == list(range(8))
    assert max(s.count(1) for s in rows.steps) <= 4
    assert sum(s.count(1) for s in rows.steps) == 8 * 4
    assert rows.live == 0


def test_fair_cancel_a_paused_request_frees_its_slots(fair):
    worker, rows = fair
    rows.delay = 0.005
    # 6 tenants' rows on 4 a step: 2 paused each step
    jobs = [job(i, [i], steps=40, tenant=str(i)) for i in range(6)]
    for j in jobs:
        worker.submit(j)
    while len(rows.steps) < 3:
        time.sleep(0.001)
    worker.cancel(jobs[0], "disconnected")
    with pytest.raises(JobCancelled):
        jobs[0].future.result(5)
    for j in jobs[1:]:
        assert j.future.result(5).images[0, 0, 0, 0] == j.seeds[0]
    assert rows.live == 0


def test_fair_a_paused_stream_keeps_reporting_its_own_progress(fair):
    worker, rows = fair
    events: list[int] = []
    streamed = job(0, [0], steps=12, on_event=lambda e: "step" in e and events.append(e["step"]))
    others = [job(i, [i], steps=12, tenant=str(i)) for i in range(1, 6)]  # 6 tenants, 4 rows
    for j in [streamed, *others]:
        worker.submit(j)
    streamed.future.result(5)
    assert events == list(range(1, 13))  # one event per step it ran, in order
    assert len(rows.steps) > 12  # it was paused for some of the steps


def test_deadline_a_higher_priority_request_pauses_a_running_one():
    rows = FakeRows(capacity=8)
    worker = EngineWorker(None, rows=rows, max_batch_size=2, policy="deadline")
    worker.start(warmup=False)
    try:
        rows.gate = threading.Event()
        low = job(1, [0, 1], steps=3, priority=1)
        worker.submit(low)
        time.sleep(0.1)
        high = job(2, [5, 6], steps=3, priority=0)
        worker.submit(high)
        rows.gate.set()
        high.future.result(5)
        low.future.result(5)
        assert rows.steps[0] == [1, 1]
        assert rows.steps[1:4] == [[2, 2]] * 3 and rows.steps[4:] == [[1, 1]] * 2
    finally:
        rows.gate.set()
        worker.stop(5)


def test_admitted_requests_leave_the_reserve_to_newcomers():
    """Two slots free, one of them the reserve: the running request grows by one only, and a
    request not admitted yet may take the last slot."""
    big, small = job(1, list(range(8))), job(2, [0])
    for policy in (Fair(), Deadline()):
        rows = policy.allot(claims_of((big, 2, 6, True)), 8, 2, 0.0, reserve=1)
        assert rows == {big: 3}, policy.name
        rows = policy.allot(claims_of((big, 2, 6, True), (small, 0, 1, False)), 8, 2, 0.0, 1)
        # fair serves the small request first: the big one may not take the reserve
        assert rows == ({big: 2, small: 1} if policy.name == "fair" else {big: 3, small: 1})


def test_fair_start_estimates_a_small_newcomer_at_once_and_a_big_one_behind_its_elders():
    big = job(1, list(range(16)), steps=100)
    backlog = Backlog([Claim(big, 16, 0, True)], [], width=16, slots=32)
    small, other_big = job(2, [0], steps=32), job(3, list(range(16)), steps=32)
    assert Fair().start_steps(backlog, small, 0.0) == 0  # a free slot, within the level
    assert Fair().start_steps(backlog, other_big, 0.0) == 100  # 1600 image-steps, 16 rows
    full = Backlog([Claim(big, 16, 0, True)], [], width=16, slots=16)
    assert Fair().start_steps(full, small, 0.0) == 100  # no slot until big's rows finish
    assert Fifo().start_steps(backlog, small, 0.0) == 100  # fifo: all the work ahead
