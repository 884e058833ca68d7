"""Prometheus metrics change as tasks flow: scraped over HTTP before and after."""

import asyncio

import pytest
from google.protobuf.duration_pb2 import Duration
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from taskqueue.server.config import Config
from taskqueue.server.worker import TierName
from tests.ops_support import (
    METHOD,
    Samples,
    add,
    ops_config,
    rpc_with_metrics,
    scrape,
    scrape_until,
    task,
    worker_with_metrics,
)
from tests.support import Received, target

ADDED = "taskqueue_tasks_added_total"
CALLS = "taskqueue_calls_total"
DEAD = "taskqueue_dead_letters_total"
RETRIES = "taskqueue_retries_total"
LAG = "taskqueue_consumer_lag_records"


def scaled(bootstrap: str, **sections: object) -> Config:
    return ops_config(
        bootstrap,
        kafka={"partitions": 1},
        topics={"tiers": ["1s", "1m"]},
        queue_defaults={"deadline_s": 5, "retry": {"backoff_s": [0.3, 1.0]}},
        **sections,
    )


async def test_add_outcomes_and_calls_are_counted(kafka_bootstrap: str) -> None:
    config = scaled(kafka_bootstrap)
    async with (
        target() as cafe,
        rpc_with_metrics(config) as (port, rpc_metrics),
        worker_with_metrics(config) as (_, worker_metrics),
    ):
        rpc_before = await scrape(rpc_metrics)
        worker_before = await scrape(worker_metrics)

        for _ in range(2):
            await add(port, task(cafe.authority))
        for refused in (
            task("example.invalid:50051"),
            task(cafe.authority, method="x"),
        ):
            with pytest.raises(GRPCError):
                await add(port, refused)
        await cafe.wait_calls(2)

        rpc_after = await scrape(rpc_metrics)
        worker_after = await scrape_until(
            worker_metrics, lambda s: s(CALLS, **ok_call(cafe.authority)) >= 2
        )

    def added(samples: Samples, queue: str, outcome: str) -> float:
        return samples(ADDED, queue=queue, outcome=outcome)

    assert added(rpc_after, "default", "OK") - added(rpc_before, "default", "OK") == 2
    for outcome in ("PERMISSION_DENIED", "INVALID_ARGUMENT"):
        assert added(rpc_after, "", outcome) - added(rpc_before, "", outcome) == 1

    labels = ok_call(cafe.authority)
    assert worker_after(CALLS, **labels) - worker_before(CALLS, **labels) == 2
    timed_calls = "taskqueue_call_duration_seconds_count"  # a count, not a time
    assert worker_after(timed_calls, authority=cafe.authority) == 2
    lateness = "taskqueue_call_lateness_seconds_count"
    assert (
        worker_after(lateness, tier="main") - worker_before(lateness, tier="main") == 2
    )
    assert worker_after("taskqueue_calls_in_flight") == 0
    assert worker_after("taskqueue_broker_up") == 1


def ok_call(authority: str) -> dict[str, str]:
    return {"authority": authority, "method": METHOD, "code": "OK"}


async def fail_twice_or_dead(received: Received) -> None:
    """Bodies ``dead`` are refused for good; others fail twice, then succeed."""
    if received.body == b"dead":
        raise GRPCError(Status.INVALID_ARGUMENT, "never")
    if int(received.metadata["taskqueue-attempt"]) <= 2:
        raise GRPCError(Status.UNAVAILABLE, "not yet")


async def test_retries_by_tier_and_dead_letters_are_counted(
    kafka_bootstrap: str,
) -> None:
    config = scaled(kafka_bootstrap)
    async with (
        target(fail_twice_or_dead) as cafe,
        rpc_with_metrics(config) as (port, _),
        worker_with_metrics(config) as (_, main_metrics),
        worker_with_metrics(config, TierName.RETRY) as (_, retry_metrics),
    ):
        await add(port, task(cafe.authority, b"dead"))
        await add(port, task(cafe.authority, b"ok"))
        await cafe.wait_calls(4)

        main = await scrape_until(
            main_metrics, lambda s: s(RETRIES, tier="retry-1s") >= 1
        )
        retry = await scrape_until(
            retry_metrics, lambda s: s(CALLS, **ok_call(cafe.authority)) >= 1
        )

    # 0.3 s is below the smallest tier: waited out in the worker.
    assert main(RETRIES, tier="inplace") == 1
    assert main(RETRIES, tier="retry-1s") == 1
    assert main(DEAD, authority=cafe.authority, queue="default") == 1
    assert main.total(CALLS, code="UNAVAILABLE") == 2
    assert main.total(CALLS, code="INVALID_ARGUMENT") == 1
    assert retry(CALLS, **ok_call(cafe.authority)) == 1
    assert retry("taskqueue_call_lateness_seconds_count", tier="retry-1s") == 1


async def test_lag_in_flight_and_waiting_partitions(kafka_bootstrap: str) -> None:
    config = scaled(kafka_bootstrap)
    release = asyncio.Event()

    async def hold(_: Received) -> None:
        await release.wait()

    async with (
        target(hold) as cafe,
        rpc_with_metrics(config) as (port, _),
        worker_with_metrics(config) as (_, main_metrics),
        worker_with_metrics(config, TierName.RETRY) as (_, retry_metrics),
    ):
        for _ in range(3):
            await add(port, task(cafe.authority))
        # Due in 90 s: it sits on the 1 m tier, whose partition waits for it.
        await add(port, task(cafe.authority, delay=Duration(seconds=90)))
        await cafe.wait_calls(3)

        held = await scrape_until(
            main_metrics,
            lambda s: s(LAG, tier="main") == 3 and s("taskqueue_calls_in_flight") == 3,
        )
        waiting = await scrape_until(
            retry_metrics,
            lambda s: s("taskqueue_partitions_waiting", tier="retry-1m") == 1,
        )
        release.set()
        drained = await scrape_until(
            main_metrics,
            lambda s: s(LAG, tier="main") == 0 and s("taskqueue_calls_in_flight") == 0,
        )

    assert held(LAG, tier="main") == 3
    assert held("taskqueue_calls_in_flight") == 3
    assert held("taskqueue_partitions_assigned", tier="main") == 1
    assert waiting("taskqueue_partitions_waiting", tier="retry-1m") == 1
    assert waiting(LAG, tier="retry-1m") == 1
    assert waiting("taskqueue_partitions_assigned", tier="retry-1s") == 1
    assert drained(LAG, tier="main") == 0
    assert drained("taskqueue_calls_in_flight") == 0


async def test_no_task_id_in_any_label(kafka_bootstrap: str) -> None:
    config = scaled(kafka_bootstrap)
    async with (
        target() as cafe,
        rpc_with_metrics(config) as (port, rpc_metrics),
        worker_with_metrics(config) as (_, worker_metrics),
    ):
        reply = await add(port, task(cafe.authority))
        await cafe.wait_calls(1)
        samples = [
            await scrape(rpc_metrics),
            await scrape_until(
                worker_metrics, lambda s: s(CALLS, **ok_call(cafe.authority)) == 1
            ),
        ]

    for scraped in samples:
        for _, labels in scraped.values:
            assert all(reply.id not in value for _, value in labels)
