"""The dispatch engine on a real broker (CASES.md C01, C08, C12; isolation)."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiokafka import TopicPartition

from taskqueue.protobuf.service_pb2 import AT_MOST_ONCE, Task
from taskqueue.server.config import Config
from taskqueue.server.topics import Topics
from taskqueue.server.worker import Worker
from tests.conftest import make_config
from tests.support import Received, Target, rpc_server, target, worker
from tests.test_delivery import committed_offset
from tests.test_ladder_kafka import add, task


def one_partition(bootstrap: str, **sections: object) -> Config:
    return make_config(bootstrap, kafka={"partitions": 1}, **sections)


async def wait_until_committed(config: Config, tp: TopicPartition, offset: int) -> None:
    async with asyncio.timeout(30):
        while (await committed_offset(config, tp) or 0) < offset:
            await asyncio.sleep(0.1)


async def settled_group(*workers: Worker) -> None:
    """Wait until every worker is in the group and the one partition is held
    by one of them: a worker joining late would rebalance them later on."""

    def settled() -> bool:
        held = sum(len(w.assigned_partitions()) for w in workers)
        return all(w.assignments for w in workers) and held == 1

    async with asyncio.timeout(30):
        while not settled():
            await asyncio.sleep(0.05)


async def test_calls_longer_than_the_poll_interval_cause_no_rebalance(
    kafka_bootstrap: str,
) -> None:
    """C01: the fetch loop keeps polling while every call slot is busy."""
    config = one_partition(
        kafka_bootstrap,
        worker={"max_poll_interval_s": 5, "concurrency": 2},
        queue_defaults={"deadline_s": 4},
    )

    async def slow(_: Received) -> None:
        await asyncio.sleep(3)

    async with (
        target(slow) as cafe,
        rpc_server(config) as port,
        worker(config) as first,
        worker(config) as second,
    ):
        await add(port, task(cafe.authority))
        await cafe.wait_calls(1)
        await settled_group(first, second)
        settled = (first.assignments, second.assignments)
        await add(port, *(task(cafe.authority) for _ in range(3)))
        # Four 3 s calls, two at a time, on one partition: 6 s of busy slots.
        calls = await cafe.wait_calls(4, timeout_s=30)
        topic = Topics(config.topics.prefix).main(cafe.authority, "default")
        await wait_until_committed(config, TopicPartition(topic, 0), 4)

        assert (first.assignments, second.assignments) == settled
        assert first.pending() == second.pending() == 0

    ids = [c.metadata["taskqueue-task-id"] for c in calls]
    assert len(ids) == len(set(ids)) == 4


async def test_a_full_worker_stays_in_its_group(kafka_bootstrap: str) -> None:
    """C01 with every pending place taken for longer than max.poll.interval:
    the loop waits for room instead of polling, yet still polls often enough
    to keep its partitions."""
    config = one_partition(
        kafka_bootstrap,
        worker={
            "max_poll_interval_s": 3,
            "concurrency": 2,
            "max_pending": 2,
            "max_pending_per_queue": 2,
        },
        queue_defaults={"deadline_s": 2},
        # One call per 4 s: the two pending jobs hold their places that long.
        authority_limits=[{"authority": "127.0.0.1:*", "rate_per_s": 0.25}],
    )

    async with (
        target() as cafe,
        rpc_server(config) as port,
        worker(config) as only,
    ):
        await add(port, task(cafe.authority))
        await cafe.wait_calls(1)
        settled = only.assignments
        await add(port, *(task(cafe.authority) for _ in range(3)))
        calls = await cafe.wait_calls(4, timeout_s=30)
        topic = Topics(config.topics.prefix).main(cafe.authority, "default")
        await wait_until_committed(config, TopicPartition(topic, 0), 4)

        assert only.assignments == settled
        assert only.pending() == 0

    ids = [c.metadata["taskqueue-task-id"] for c in calls]
    assert len(ids) == len(set(ids)) == 4


async def test_commit_never_passes_an_unfinished_record(kafka_bootstrap: str) -> None:
    """C12: out-of-order completion; offset 3 is slow, the others are quick."""
    config = one_partition(kafka_bootstrap, worker={"concurrency": 10})
    slow_started = asyncio.Event()
    release = asyncio.Event()

    async def third_is_slow(received: Received) -> None:
        if received.metadata.get("order") == "3":
            slow_started.set()
            await release.wait()

    async with target(third_is_slow) as cafe, rpc_server(config) as port:
        tasks = [task(cafe.authority, metadata={"order": str(i)}) for i in range(10)]
        await add(port, *tasks)
        topic = Topics(config.topics.prefix).main(cafe.authority, "default")
        tp = TopicPartition(topic, 0)

        async with worker(config):
            await cafe.wait_calls(10)
            await slow_started.wait()
            await asyncio.sleep(3 * config.worker.commit_interval_s)
            assert await committed_offset(config, tp) == 3

            release.set()
            await wait_until_committed(config, tp, 10)


async def test_deadline_exceeded_is_retried_with_the_same_task_id(
    kafka_bootstrap: str,
) -> None:
    """C08: a call past its deadline may have run; at-least-once calls again
    with the same id, at-most-once never does."""
    config = one_partition(
        kafka_bootstrap,
        queue_defaults={
            "deadline_s": 1,
            "retry": {"backoff_s": [0.5], "max_attempts": 2},
        },
    )

    async def sleepy(_: Received) -> None:
        await asyncio.sleep(2)

    async with target(sleepy) as cafe, rpc_server(config) as port, worker(config) as w:
        await add(port, task(cafe.authority, queue="once", delivery=AT_MOST_ONCE))
        await add(port, task(cafe.authority, queue="twice"))
        calls = await cafe.wait_calls(3)
        async with asyncio.timeout(30):
            while w.pending():
                await asyncio.sleep(0.1)

    by_queue: dict[str, list[Received]] = {}
    for call in cafe.calls:
        by_queue.setdefault(call.metadata["taskqueue-queue"], []).append(call)
    assert len(by_queue["once"]) == 1
    twice = by_queue["twice"]
    assert [c.metadata["taskqueue-attempt"] for c in twice] == ["1", "2"]
    assert (
        twice[0].metadata["taskqueue-task-id"] == twice[1].metadata["taskqueue-task-id"]
    )
    assert twice[1].metadata["taskqueue-previous-status"] == "DEADLINE_EXCEEDED"
    assert len(calls) == 3


@asynccontextmanager
async def stuck_beside_quick(
    config: Config,
) -> AsyncIterator[tuple[Target, Target, int, Worker, asyncio.Event]]:
    """A target that holds every call until the event is set, a quick one,
    and the rpc server and a worker serving both."""
    stuck = asyncio.Event()

    async def hang(_: Received) -> None:
        await stuck.wait()

    async with (
        target(hang) as slow,
        target() as quick,
        rpc_server(config) as port,
        worker(config) as running,
    ):
        yield slow, quick, port, running, stuck


async def test_a_slow_authority_does_not_hold_up_another(kafka_bootstrap: str) -> None:
    """Invariant 4: a backlog on one queue pauses that queue, not the others."""
    config = make_config(
        kafka_bootstrap,
        worker={"concurrency": 20, "max_pending": 40, "max_pending_per_queue": 10},
        authority_limits=[{"authority": "127.0.0.1:*", "concurrency": 2}],
    )
    async with stuck_beside_quick(config) as (slow, quick, port, w, stuck):
        await add(port, *(task(slow.authority) for _ in range(60)))
        await slow.wait_calls(2)
        await add(port, *(task(quick.authority) for _ in range(20)))
        await quick.wait_calls(20)

        assert len(slow.calls) == 2  # its concurrency cap
        assert w.pending() <= 10 + 2  # the slow queue's cap, plus in-flight quick ones
        stuck.set()
        await slow.wait_calls(60, timeout_s=30)


async def test_a_queue_of_large_tasks_leaves_bytes_for_the_others(
    kafka_bootstrap: str,
) -> None:
    """A queue whose large tasks wait holds no more than its byte share, so
    the worker's byte budget is never all taken by one queue."""
    config = make_config(
        kafka_bootstrap,
        worker={
            "max_pending_bytes": 1_000_000,
            "max_pending_bytes_per_queue": 250_000,
            "max_pending_per_queue": 50,
        },
    )

    def large(authority: str) -> Task:
        one = task(authority)
        one.argument.value = b"x" * 100_000
        return one

    async with stuck_beside_quick(config) as (slow, quick, port, w, stuck):
        await add(port, *(large(slow.authority) for _ in range(20)))
        await slow.wait_calls(3)
        await add(port, *(task(quick.authority) for _ in range(30)))
        await quick.wait_calls(30)

        # Three of 100 kB reach the share: the rest stay in Kafka meanwhile.
        async with asyncio.timeout(10):
            while w.pending() > 3:  # the quick jobs finishing
                await asyncio.sleep(0.05)
        assert len(slow.calls) == 3
        assert w.pending() == 3
        stuck.set()
        await slow.wait_calls(20, timeout_s=30)
