"""Scheduled tasks across rebalances of the retry tier (issue: the ladder).

A paused tier partition must be paused again by whichever worker owns it after
a rebalance, and no task is ever called before it is due while workers join
and leave.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from google.protobuf.duration_pb2 import Duration

from taskqueue.server.config import Config
from taskqueue.server.worker import TierName, Worker
from tests.conftest import make_config
from tests.support import rpc_server, target, worker
from tests.test_ladder_kafka import LATE_S, add, task


def two_tier_config(bootstrap: str) -> Config:
    return make_config(
        bootstrap,
        kafka={"partitions": 4},
        topics={"tiers": ["2s", "4s"]},
        queue_defaults={"deadline_s": 5, "retry": {"backoff_s": [2]}},
    )


async def test_pause_survives_a_rebalance_between_retry_workers(
    kafka_bootstrap: str,
) -> None:
    config = two_tier_config(kafka_bootstrap)

    async with (
        target() as cafe,
        rpc_server(config) as port,
        worker(config),
        worker(config, TierName.RETRY) as first,
    ):
        added = await add(
            port,
            *(task(cafe.authority, delay=Duration(seconds=6)) for _ in range(4)),
        )
        async with asyncio.timeout(10):
            while not first.waiting_partitions():
                await asyncio.sleep(0.05)
        async with worker(config, TierName.RETRY):
            calls = await cafe.wait_calls(4, timeout_s=30)

    due = {task_id: sent + 6 for task_id, sent in added}
    for call in calls:
        scheduled = due[call.metadata["taskqueue-task-id"]]
        assert scheduled <= call.at <= scheduled + LATE_S + 1  # one rebalance's time
    assert sorted(c.metadata["taskqueue-task-id"] for c in calls) == sorted(due)


@contextlib.asynccontextmanager
async def churn(config: Config, rounds: int) -> AsyncIterator[None]:
    """Retry workers joining and leaving every half second, in the background."""

    async def run() -> None:
        for _ in range(rounds):
            extra = Worker(config, TierName.RETRY)
            running = asyncio.create_task(extra.run())
            await asyncio.sleep(0.5)
            extra.stop()
            await running

    background = asyncio.create_task(run())
    try:
        yield
    finally:
        await background


async def test_no_early_call_while_workers_join_and_leave(kafka_bootstrap: str) -> None:
    config = two_tier_config(kafka_bootstrap)
    delays_s = [2.5, 3, 4.5, 5, 6.5, 7]

    async with (
        target() as cafe,
        rpc_server(config) as port,
        worker(config),
        worker(config, TierName.RETRY),
        churn(config, rounds=8),
    ):
        added = await add(
            port,
            *(
                task(
                    cafe.authority,
                    delay=Duration(nanos=int(d * 1e9) % 10**9, seconds=int(d)),
                )
                for d in delays_s
            ),
        )
        calls = await cafe.wait_calls(len(delays_s), timeout_s=40)

    due = {
        task_id: sent + d for (task_id, sent), d in zip(added, delays_s, strict=True)
    }
    early = [c for c in calls if c.at < due[c.metadata["taskqueue-task-id"]]]
    assert early == []
    assert sorted(c.metadata["taskqueue-task-id"] for c in calls) == sorted(due)
