"""The work-aware router and the autoscaling policy as plain units, with fake replica stats:
the choice, the correction for what was sent since a report, stale stats falling back to Ray's
default, spill past replicas that refused, and scale decisions."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray.serve")

from service.ray_serve import view  # noqa: E402
from service.ray_serve.autoscaling import WorkPolicy  # noqa: E402
from service.ray_serve.router import LeastWorkRouter, WorkBook  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def stats(
    seq: int, image_steps: float, step_s: float = 0.1, rows: int = 16, start_s: float = 0.0
) -> dict[str, Any]:
    return {"seq": seq, "image_steps": image_steps, "free_slots": 0, "step_s": step_s,
            "rows": rows, "start_s": start_s}  # fmt: skip


def test_the_replica_with_the_least_work_comes_first():
    book = WorkBook(stale_after_s=2.0, clock=Clock())
    order = book.rank({"a": stats(1, 4096), "b": stats(1, 32), "c": stats(1, 512)})
    assert order == ["b", "c", "a"]


def test_work_is_weighed_by_step_time_and_rows():
    """A replica twice as fast per image-step clears the same work in half the time."""
    book = WorkBook(clock=Clock())
    slow, fast = stats(1, 1000, step_s=0.2, rows=16), stats(1, 1500, step_s=0.05, rows=16)
    assert book.rank({"slow": slow, "fast": fast}) == ["fast", "slow"]


def test_a_replica_whose_pool_is_full_ranks_by_when_a_new_request_would_start():
    """Fair scheduling: with the same work, the replica where a new request must wait for a
    slot (its policy's start_s) comes after the one where it starts at once."""
    book = WorkBook(clock=Clock())
    full, open_ = stats(1, 1000, start_s=6.4), stats(1, 1200)
    assert book.rank({"full": full, "open": open_}) == ["open", "full"]


def test_sends_since_the_last_report_count_until_the_next_report():
    clock = Clock()
    book = WorkBook(clock=clock)
    replicas = {"a": stats(1, 0), "b": stats(1, 100)}
    assert book.rank(replicas) == ["a", "b"]
    book.sent("a", 4096)  # a 16-image 256-step request went to a
    assert book.rank(replicas) == ["b", "a"]  # a's old report + what was sent
    replicas["a"] = stats(2, 10)  # a new report of a: it includes that work (or its end)
    assert book.rank(replicas) == ["a", "b"]


def test_stale_or_missing_stats_fall_back_to_the_default_router():
    clock = Clock()
    book = WorkBook(stale_after_s=2.0, clock=clock)
    assert book.rank({"a": stats(1, 0), "b": {}}) == []  # b never reported
    assert book.rank({"a": stats(1, 0), "b": stats(1, 5)}) == ["a", "b"]
    clock.now = 1.5
    assert book.rank({"a": stats(2, 0), "b": stats(1, 5)}) == ["a", "b"]  # b seen 1.5 s ago
    clock.now = 2.5
    assert book.rank({"a": stats(3, 0), "b": stats(1, 5)}) == []  # b: no report for 2.5 s


def test_replicas_that_refused_the_request_go_last():
    book = WorkBook(clock=Clock())
    replicas = {"a": stats(1, 0), "b": stats(1, 900), "c": stats(1, 50)}
    assert book.rank(replicas, avoid=["a"]) == ["c", "b", "a"]
    assert book.rank(replicas, avoid=["a", "c", "b"]) == ["a", "c", "b"]  # all refused: by load


def test_equal_loads_are_spread():
    book = WorkBook(clock=Clock())
    idle = {r: stats(1, 0) for r in "abcd"}
    firsts = {book.rank(idle)[0] for _ in range(200)}
    assert firsts == set("abcd")


# -- the Ray router class, driven as Serve drives it ----------------------------------------


@dataclass
class FakeReplica:
    unique_id: str
    routing_stats: dict[str, Any]
    replica_id: Any = field(init=False)

    def __post_init__(self) -> None:
        self.replica_id = SimpleNamespace(unique_id=self.unique_id)


def pending(**kwargs: Any) -> Any:
    return SimpleNamespace(kwargs=kwargs, routing_context=SimpleNamespace(should_backoff=False))


def make_router() -> LeastWorkRouter:
    router = LeastWorkRouter.__new__(LeastWorkRouter)  # no Serve runtime: only our state
    router.initialize_state(stale_after_s=2.0)
    return router


def test_the_router_ranks_one_replica_per_rank_and_backs_off():
    router = make_router()
    a, b = FakeReplica("a", stats(1, 640)), FakeReplica("b", stats(1, 64))
    request = pending(work=32, avoid=())
    ranks = asyncio.run(router.choose_replicas([a, b], request))
    assert ranks == [[b], [a]]  # singleton ranks: a full b spills to a
    assert request.routing_context.should_backoff  # no busy loop while all are full
    router.on_request_routed(request, b.replica_id, None)
    assert router.book.load("b", b.routing_stats) == pytest.approx((64 + 32) * 0.1 / 16)
    assert {r["replica"] for r in view.replicas()} >= {"a", "b"}  # what /info shows


def test_a_burst_routed_at_once_is_spread():
    """Serve ranks several requests before the first is accepted (a round trip): each one's
    work counts from its ranking (the hold), so 4 requests at once go 2 / 2 to 2 idle
    replicas, not 4 / 0 (seen on the 2-node cluster), and count once when routed."""
    router = make_router()
    a, b = FakeReplica("a", stats(1, 0)), FakeReplica("b", stats(1, 0))
    burst = [pending(work=256, avoid=()) for _ in range(4)]
    firsts = [asyncio.run(router.choose_replicas([a, b], r))[0][0].unique_id for r in burst]
    assert sorted(firsts) == ["a", "a", "b", "b"]
    for r, first in zip(burst, firsts, strict=True):
        router.on_request_routed(r, SimpleNamespace(unique_id=first), None)
    assert router.book.load("a", a.routing_stats) == pytest.approx(512 * 0.1 / 16)  # once


def test_a_held_request_counts_where_it_was_routed_and_expires_unrouted():
    clock = Clock()
    book = WorkBook(stale_after_s=2.0, clock=clock)
    replicas = {"a": stats(1, 0), "b": stats(1, 100)}
    book.hold("r1", "a", 4096)
    assert book.rank(replicas) == ["b", "a"]
    book.routed("r1", "b", 4096)  # a was full: b took it
    assert book.loads(replicas) == {"a": 0.0, "b": pytest.approx((100 + 4096) * 0.1 / 16)}
    book.hold("r2", "a", 4096)  # never routed (its client went away)
    clock.now = 1.5
    replicas = {"a": stats(2, 0), "b": stats(2, 0)}
    assert book.loads(replicas)["a"] == pytest.approx(4096 * 0.1 / 16)
    clock.now = 2.5
    assert book.loads({"a": stats(3, 0), "b": stats(3, 0)})["a"] == 0.0


def test_the_router_falls_back_to_all_candidates_on_stale_stats():
    router = make_router()
    a, b = FakeReplica("a", stats(1, 0)), FakeReplica("b", {})
    assert asyncio.run(router.choose_replicas([a, b], pending(work=1))) == [[a, b]]


def test_the_router_puts_replicas_that_refused_last():
    router = make_router()
    a, b = FakeReplica("a", stats(1, 0)), FakeReplica("b", stats(1, 500))
    ranks = asyncio.run(router.choose_replicas([a, b], pending(work=1, avoid=("a",))))
    assert ranks == [[b], [a]]


# -- autoscaling ------------------------------------------------------------------------------


def ctx(waits: dict[str, float], requests: dict[str, float] | None = None, queued: float = 0,
        target: int = 1) -> Any:  # fmt: skip
    metrics = {"wait_s": waits, "requests": requests or dict.fromkeys(waits, 1.0)}
    return SimpleNamespace(aggregated_metrics=metrics, total_queued_requests=queued,
                           target_num_replicas=target, policy_state={"kept": 1})  # fmt: skip


def test_the_policy_asks_for_replicas_in_proportion_to_work_seconds():
    policy = WorkPolicy(target_wait_s=10.0)
    desired, state = policy(ctx({"a": 25.0, "b": 13.0}))
    assert desired == pytest.approx(3.8)  # 38 s of work / 10 s per replica: Serve rounds up
    assert state["kept"] == 1 and state["work_s"] == 38.0


def test_the_policy_scales_down_when_idle_and_holds_without_reports():
    policy = WorkPolicy(target_wait_s=10.0)
    assert policy(ctx({"a": 0.0, "b": 0.0}, target=2))[0] == 0.0  # Serve clamps to min_replicas
    no_reports = SimpleNamespace(aggregated_metrics={}, total_queued_requests=0,
                                 target_num_replicas=2, policy_state={})  # fmt: skip
    assert policy(no_reports)[0] == 2


def test_requests_queued_at_handles_count_as_average_requests():
    policy = WorkPolicy(target_wait_s=10.0)
    desired, _ = policy(ctx({"a": 20.0}, requests={"a": 4.0}, queued=8))
    assert desired == pytest.approx((20.0 + 8 * 5.0) / 10.0)  # 5 s per request on a


def test_a_256_times_larger_request_weighs_256_times_more():
    """The request-count autoscaler sees 1 request either way; this policy sees the work."""
    policy = WorkPolicy(target_wait_s=10.0)
    small, _ = policy(ctx({"a": 0.1 * 16 / 16}))  # 1 image × 16 steps, 16 rows, 0.1 s steps
    large, _ = policy(ctx({"a": 0.1 * 16 * 256 / 16}))  # 16 images × 256 steps
    assert large / small == pytest.approx(256)


def test_the_policy_refuses_a_nonsense_target():
    with pytest.raises(ValueError):
        WorkPolicy(target_wait_s=0)


# -- the ingress: spill, 503 only when every replica refused, retry once on a lost replica ----


class FakeMethod:
    def __init__(self, answers: list[Any]) -> None:
        self.answers, self.calls = answers, []

    def remote(self, request: Any, work: int = 0, avoid: tuple[str, ...] = ()) -> Any:
        self.calls.append(avoid)
        answer = self.answers.pop(0)

        async def respond() -> Any:
            if isinstance(answer, BaseException):
                raise answer
            return answer

        return respond()


def ingress(answers: list[Any]) -> tuple[Any, FakeMethod]:
    from service.ray_serve.client import RayEngineClient

    method = FakeMethod(answers)
    handle = SimpleNamespace(generate=method, deployment_name="MarcheEngine")
    return RayEngineClient(handle), method


def request() -> Any:
    from engine.model.config import SamplingParams
    from service.core.client import EngineRequest

    return EngineRequest(1, [0, 1], SamplingParams(num_iter=32, cfg=1.0), "marche", 60.0)


def test_a_full_replica_passes_the_request_on():
    from service.core.jobs import QueueFull
    from service.ray_serve.client import Failure

    client, method = ingress([Failure(QueueFull("full", 30), "a"), "image"])
    assert asyncio.run(client.generate(request())) == "image"
    assert method.calls == [(), ("a",)]  # the second try ranks replica a last


def test_503_only_when_every_replica_refused_with_the_shortest_wait():
    from service.core.jobs import QueueFull
    from service.ray_serve.client import Failure

    refusals = [Failure(QueueFull("full", 30), "a"), Failure(QueueFull("full", 12), "b"),
                Failure(QueueFull("full", 40), "a")]  # fmt: skip  # back to a: all have refused
    client, method = ingress(refusals)
    with pytest.raises(QueueFull) as refused:
        asyncio.run(client.generate(request()))
    assert refused.value.retry_after == 12 and "every engine replica" in str(refused.value)
    assert method.calls == [(), ("a",), ("a", "b")]


def test_a_request_whose_replica_died_is_retried_once():
    from ray.exceptions import ActorDiedError

    from service.core.jobs import EngineError

    client, method = ingress([ActorDiedError(), "image"])
    assert asyncio.run(client.generate(request())) == "image"
    client, method = ingress([ActorDiedError(), ActorDiedError()])
    with pytest.raises(EngineError, match="replica failed"):
        asyncio.run(client.generate(request()))
    assert len(method.calls) == 2  # once, not more


def test_the_router_weighs_a_request_by_its_image_steps():
    from service.ray_serve.client import work

    assert work(request()) == 2 * 32
