"""Faults on a real broker: rebalances mid-call (C02, C13) and kill -9 under
load with a ledger of every acknowledged task (issue: the dispatch engine)."""

import asyncio
import random
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from taskqueue.server.topics import Topics
from tests.conftest import make_config
from tests.support import Received, rpc_server, target, worker
from tests.test_delivery import kill_9, show_log, worker_process, write_config
from tests.test_dispatch_kafka import wait_until_committed
from tests.test_ladder_kafka import add, task


async def test_call_in_flight_through_a_rebalance_is_not_repeated(
    kafka_bootstrap: str,
) -> None:
    """C13: the partition comes straight back to the same worker; its call in
    flight completes once, moves the commit, and nothing stays paused."""
    config = make_config(kafka_bootstrap, kafka={"partitions": 1})
    entered, release = asyncio.Event(), asyncio.Event()

    async def first_blocks(received: Received) -> None:
        if received.metadata.get("order") == "blocked":
            entered.set()
            await release.wait()

    async with (
        target(first_blocks) as cafe,
        rpc_server(config) as port,
        worker(config) as only,
    ):
        await add(port, task(cafe.authority, metadata={"order": "blocked"}))
        await entered.wait()
        before = only.assignments
        # A new queue means a new topic: the group rebalances.
        await add(port, task(cafe.authority, queue="other"))
        async with asyncio.timeout(20):
            while only.assignments == before:
                await asyncio.sleep(0.05)
        release.set()

        topics = Topics(config.topics.prefix)
        main = TopicPartition(topics.main(cafe.authority, "default"), 0)
        await wait_until_committed(config, main, 1)
        async with asyncio.timeout(10):
            while only.pending():
                await asyncio.sleep(0.05)
        assert only.waiting_partitions() == []

    blocked = [c for c in cafe.calls if c.metadata.get("order") == "blocked"]
    assert len(blocked) == 1
    assert len(cafe.calls) == 2


async def test_second_worker_joining_mid_call_loses_nothing(
    kafka_bootstrap: str,
) -> None:
    """C02: worker B joins while A is calling; every task is called at least
    once and no worker fails."""
    config = make_config(kafka_bootstrap, kafka={"partitions": 4})
    entered, release = asyncio.Event(), asyncio.Event()

    async def first_blocks(received: Received) -> None:
        if received.metadata.get("order") == "0":
            entered.set()
            await release.wait()

    async with target(first_blocks) as cafe, rpc_server(config) as port:  # noqa: SIM117
        async with worker(config) as a:  # b joins later, inside
            tasks = [
                task(cafe.authority, metadata={"order": str(i)}) for i in range(20)
            ]
            added = await add(port, *tasks)
            await entered.wait()
            async with worker(config) as b:
                async with asyncio.timeout(20):
                    while b.assignments == 0:
                        await asyncio.sleep(0.05)
                release.set()
                async with asyncio.timeout(30):
                    while {c.metadata["taskqueue-task-id"] for c in cafe.calls} != {
                        i for i, _ in added
                    }:
                        await asyncio.sleep(0.05)
                    while a.pending() or b.pending():
                        await asyncio.sleep(0.05)

    counts = [
        sum(c.metadata["taskqueue-task-id"] == task_id for c in cafe.calls)
        for task_id, _ in added
    ]
    assert min(counts) >= 1
    assert max(counts) <= 2


@pytest.mark.timeout(400)
async def test_kill_9_under_load_loses_no_acknowledged_task(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Every task `add` acknowledged is called at least once although the
    worker is killed twice mid-stream; duplicates are counted, not forbidden."""
    config = make_config(
        kafka_bootstrap,
        kafka={"partitions": 4},
        worker={"session_timeout_s": 6, "concurrency": 20},
    )
    location = write_config(config, tmp_path / "config.yaml")
    log = tmp_path / "workers.log"
    rng = random.Random(7)

    async def jittery(_: Received) -> None:
        await asyncio.sleep(rng.uniform(0, 0.05))

    try:
        async with target(jittery) as cafe, rpc_server(config) as port:
            added = await add(port, *(task(cafe.authority) for _ in range(300)))
            expected = {task_id for task_id, _ in added}
            for kill_after in (60, 150):
                with worker_process(location, log) as proc:
                    await cafe.wait_calls(kill_after, timeout_s=120)
                    await kill_9(proc)
            with worker_process(location, log):
                async with asyncio.timeout(120):
                    while not expected <= {
                        c.metadata["taskqueue-task-id"] for c in cafe.calls
                    }:
                        await asyncio.sleep(0.1)
    finally:
        show_log(log)

    seen = [c.metadata["taskqueue-task-id"] for c in cafe.calls]
    duplicates = len(seen) - len(set(seen))
    print(f"ledger: {len(expected)} acknowledged, {len(seen)} calls, {duplicates} dups")
    assert expected <= set(seen)
