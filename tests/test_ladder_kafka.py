"""The delay ladder and retries on a real broker (CASES.md C09, C10, C15).

Tier delays are scaled down from the production defaults (5 s, 1 m) to a few
seconds so that the suite stays fast; the properties are the same.
"""

import asyncio
import time

from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from taskqueue.protobuf.service_grpc import TaskQueueStub
from taskqueue.protobuf.service_pb2 import RetryPolicy, Task
from taskqueue.server.config import Config
from taskqueue.server.record import from_headers
from taskqueue.server.topics import Topics
from taskqueue.server.worker import TierName
from tests.conftest import make_config
from tests.support import Received, read_topic, rpc_server, target, worker

METHOD = "/coffeemachine.CoffeeMachine/make_latte"
# Scheduling noise allowed on top of a due time: the product's target is a
# p99 under 50 ms; this bound only keeps a loaded CI machine from flaking.
LATE_S = 0.5


def scaled(bootstrap: str, tiers: list[str], backoff_s: list[float]) -> Config:
    return make_config(
        bootstrap,
        kafka={"partitions": 1},
        topics={"tiers": tiers},
        queue_defaults={"deadline_s": 5, "retry": {"backoff_s": backoff_s}},
    )


def task(authority: str, **fields: object) -> Task:
    argument = AnyMessage(type_url="type.googleapis.com/coffeemachine.LatteOrder")
    return Task(authority=authority, method=METHOD, argument=argument, **fields)  # type: ignore[arg-type]


async def add(port: int, *tasks: Task) -> list[tuple[str, float]]:
    """Add tasks; returns (id, time the add was sent) for each."""
    added = []
    async with Channel("127.0.0.1", port) as channel:
        stub = TaskQueueStub(channel)
        for one in tasks:
            sent = time.time()
            reply = await stub.add(one, timeout=10)
            added.append((reply.id, sent))
    return added


async def test_delayed_task_is_called_on_time(kafka_bootstrap: str) -> None:
    config = scaled(kafka_bootstrap, ["5s", "1m"], [5])

    async with target() as cafe, rpc_server(config) as port, worker(config):
        [(_, sent)] = await add(port, task(cafe.authority, delay=Duration(seconds=3)))
        [call] = await cafe.wait_calls(1)

    assert sent + 3 <= call.at <= sent + 3 + LATE_S


async def test_task_delayed_past_a_tier_rides_the_ladder(kafka_bootstrap: str) -> None:
    config = scaled(kafka_bootstrap, ["2s", "4s"], [2])
    topics = Topics(config.topics.prefix)

    async with (
        target() as cafe,
        rpc_server(config) as port,
        worker(config),
        worker(config, TierName.RETRY),
    ):
        [(task_id, sent)] = await add(
            port, task(cafe.authority, delay=Duration(seconds=7))
        )
        [call] = await cafe.wait_calls(1, timeout_s=30)
        tier_records = await read_topic(
            kafka_bootstrap, topics.tier(cafe.authority, "default", "retry-4s"), 1
        )

    assert sent + 7 <= call.at <= sent + 7 + LATE_S
    assert from_headers(list(tier_records[0].headers)).id == task_id


async def test_fail_fail_succeed_follows_the_tier_delays(kafka_bootstrap: str) -> None:
    """C09: each retry is due its tier's delay after the failure, never before."""
    config = scaled(kafka_bootstrap, ["2s", "4s"], [2, 4])

    async def flaky(received: Received) -> None:
        if received.metadata["taskqueue-attempt"] != "3":
            raise GRPCError(Status.UNAVAILABLE, "warming up")

    async with (
        target(flaky) as cafe,
        rpc_server(config) as port,
        worker(config),
        worker(config, TierName.RETRY),
    ):
        await add(port, task(cafe.authority))
        first, second, third = await cafe.wait_calls(3, timeout_s=30)

    assert first.at + 2 <= second.at <= first.at + 2 + LATE_S
    assert second.at + 4 <= third.at <= second.at + 4 + LATE_S
    assert [c.metadata["taskqueue-attempt"] for c in (first, second, third)] == [
        "1",
        "2",
        "3",
    ]
    assert second.metadata["taskqueue-previous-status"] == "UNAVAILABLE"
    assert len({c.metadata["taskqueue-task-id"] for c in (first, second, third)}) == 1


async def test_final_status_is_dead_lettered_after_one_attempt(
    kafka_bootstrap: str,
) -> None:
    """C10 (a): INVALID_ARGUMENT, NOT_FOUND, UNIMPLEMENTED are not retried."""
    config = scaled(kafka_bootstrap, ["2s"], [2])
    topics = Topics(config.topics.prefix)
    statuses = {"a": Status.INVALID_ARGUMENT, "b": Status.NOT_FOUND}

    async def refuse(received: Received) -> None:
        queue = received.metadata["taskqueue-queue"]
        raise GRPCError(statuses.get(queue, Status.UNIMPLEMENTED), f"no {queue}")

    async with target(refuse) as cafe, rpc_server(config) as port, worker(config):
        ids = await add(port, *(task(cafe.authority, queue=q) for q in ("a", "b", "c")))
        letters = {}
        for queue in ("a", "b", "c"):
            dlq = topics.dlq(cafe.authority, queue)
            [record] = await read_topic(kafka_bootstrap, dlq, 1)
            letters[queue] = from_headers(list(record.headers))

    assert len(cafe.calls) == 3
    assert [letters[q].id for q in ("a", "b", "c")] == [i for i, _ in ids]
    assert letters["a"].last_status == "INVALID_ARGUMENT"
    assert letters["b"].last_status == "NOT_FOUND"
    assert letters["c"].last_status == "UNIMPLEMENTED"
    for letter in letters.values():
        assert letter.attempt == 1
        assert letter.reason is not None and "not retried" in letter.reason
        assert letter.origin is not None and letter.origin.startswith(
            config.topics.prefix
        )


async def test_exhausted_attempts_are_dead_lettered(kafka_bootstrap: str) -> None:
    config = scaled(kafka_bootstrap, ["2s"], [0.2])
    topics = Topics(config.topics.prefix)
    policy = RetryPolicy(max_attempts=3)

    async def down(_: Received) -> None:
        raise GRPCError(Status.UNAVAILABLE, "down for maintenance")

    async with target(down) as cafe, rpc_server(config) as port, worker(config):
        await add(port, task(cafe.authority, retry=policy))
        [record] = await read_topic(
            kafka_bootstrap, topics.dlq(cafe.authority, "default"), 1
        )

    letter = from_headers(list(record.headers))
    assert len(cafe.calls) == 3
    assert letter.attempt == 3
    assert letter.last_status == "UNAVAILABLE"
    assert letter.last_message == "down for maintenance"
    assert letter.first_attempt_ms is not None and letter.last_attempt_ms is not None
    assert letter.first_attempt_ms < letter.last_attempt_ms


async def test_retry_info_from_the_target_sets_the_delay(kafka_bootstrap: str) -> None:
    config = scaled(kafka_bootstrap, ["5s"], [5])

    async def busy_once(received: Received) -> None:
        if received.metadata["taskqueue-attempt"] == "1":
            info = RetryInfo(retry_delay=Duration(nanos=700_000_000))
            raise GRPCError(Status.RESOURCE_EXHAUSTED, "busy", [info])

    async with target(busy_once) as cafe, rpc_server(config) as port, worker(config):
        await add(port, task(cafe.authority))
        first, second = await cafe.wait_calls(2)

    assert first.at + 0.7 <= second.at <= first.at + 0.7 + LATE_S


async def test_retry_is_not_held_up_by_a_later_task_on_its_tier(
    kafka_bootstrap: str,
) -> None:
    """C15: on one tier partition, a retry due soon is not queued behind a task
    scheduled much later that was written first."""
    config = scaled(kafka_bootstrap, ["3s"], [3])

    async def fail_first(received: Received) -> None:
        if received.metadata["taskqueue-attempt"] == "1" and (
            received.metadata["taskqueue-queue"] == "default"
        ):
            raise GRPCError(Status.UNAVAILABLE, "once")

    async with (
        target(fail_first) as cafe,
        rpc_server(config) as port,
        worker(config),
        worker(config, TierName.RETRY),
    ):
        [(_, later_sent)] = await add(
            port, task(cafe.authority, delay=Duration(seconds=10))
        )
        await asyncio.sleep(0.5)  # the scheduled task is first on the tier
        await add(port, task(cafe.authority))
        calls = await cafe.wait_calls(3, timeout_s=30)

    first_attempt, retry, scheduled = calls
    assert retry.metadata["taskqueue-attempt"] == "2"
    assert first_attempt.at + 3 <= retry.at <= first_attempt.at + 3 + LATE_S
    assert later_sent + 10 <= scheduled.at <= later_sent + 10 + LATE_S
