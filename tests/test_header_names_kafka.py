"""Records whose header name is not UTF-8, or whose header has no value (null),
as other Kafka clients can write them: every reader of taskqueue reads them,
and what surrounds them, once."""

import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from aiokafka import AIOKafkaProducer
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

from taskqueue.protobuf.service_pb2 import Task
from taskqueue.server import stats
from taskqueue.server.config import Config
from taskqueue.server.dlq import Filters, find, queue_stats
from taskqueue.server.kafka import KafkaWriter
from taskqueue.server.record import State, encode_task, to_headers
from taskqueue.server.topics import Topics
from taskqueue.server.worker import TierName
from tests.conftest import make_config
from tests.support import read_topic, target, worker
from tests.test_kafka_batches import BAD_NAME, SHOWN_AS, RawName
from tests.test_ladder_kafka import task

Headers = Sequence[tuple[str, bytes | None]]
Value = tuple[bytes, Headers]
TIER = "retry-1s"
HOUR_MS = 3_600_000
POISON = b"\xff\x00 not a task"


def valid(one: Task, task_id: str) -> Value:
    one.id, one.queue = task_id, "default"
    return encode_task(one), to_headers(State(id=task_id, due_ms=0, added_ms=0))


def odd(value: Value) -> Value:
    body, headers = value
    return body, [*headers, (RawName(BAD_NAME), b"from another client")]


def null_valued(value: Value) -> Value:
    """With headers of no value: one of another client's, and one of ours."""
    body, headers = value
    return body, [*headers, ("x-flag", None), ("tq-last-message", None)]


class Writer:
    """Writes whole batches, with header names as raw bytes."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer

    async def batch(
        self, topic: str, values: list[Value], timestamp_ms: int | None = None
    ) -> None:
        batch = self._producer.create_batch()
        # aiokafka's C builder takes only str names; its Python one encodes
        # them with str.encode, which RawName answers with raw bytes.
        batch._builder = _DefaultRecordBatchBuilderPy(2, 0, 0, -1, -1, 0, 1 << 20)
        for body, headers in values:
            batch.append(timestamp=timestamp_ms, key=None, value=body, headers=headers)
        await (await self._producer.send_batch(batch, topic, partition=0))


@asynccontextmanager
async def writer(config: Config, main_topic: str) -> AsyncIterator[Writer]:
    creator = KafkaWriter(config)
    await creator.start()
    try:
        await creator.ensure_queue(main_topic)
    finally:
        await creator.stop()
    producer = AIOKafkaProducer(bootstrap_servers=config.kafka.bootstrap_servers)
    await producer.start()
    try:
        yield Writer(producer)
    finally:
        await producer.stop()


async def test_workers_call_every_task_once_around_an_odd_header_name(
    kafka_bootstrap: str,
) -> None:
    config = make_config(
        kafka_bootstrap, kafka={"partitions": 1}, topics={"tiers": [TIER]}
    )
    topics = Topics(config.topics.prefix)

    async with target() as cafe:
        main = topics.main(cafe.authority, "default")
        tier = topics.tier(cafe.authority, "default", TIER)

        def good(task_id: str) -> Value:
            return valid(task(cafe.authority), task_id)

        async with writer(config, main) as write:
            await write.batch(main, [good("before")])
            await write.batch(main, [good("first"), odd(good("odd")), good("second")])
            await write.batch(main, [odd((POISON, [])), good("after")])
            await write.batch(main, [null_valued(good("null-valued"))])
            # A writer's clock an hour ahead: the tier topic's own append time
            # must rule, read from the batch the lenient way too.
            ahead_ms = int(time.time() * 1000) + HOUR_MS
            await write.batch(
                tier, [odd(good("odd-tier")), good("after-tier")], ahead_ms
            )

            async with worker(config), worker(config, TierName.RETRY):
                await cafe.wait_calls(8)
                # A worker that stopped, or read a record twice, shows by now.
                await write.batch(main, [good("last")])
                await cafe.wait_calls(9)
            [dead] = await read_topic(
                kafka_bootstrap, topics.dlq(cafe.authority, "default"), 1
            )

    called = Counter(c.metadata["taskqueue-task-id"] for c in cafe.calls)
    assert called == Counter(
        [
            *("before", "first", "odd", "second", "after", "null-valued"),
            *("odd-tier", "after-tier", "last"),
        ]
    )
    # A dead letter keeps a record's other headers: the name read leniently
    # is valid UTF-8, so it could be written back.
    assert dead.value == POISON
    assert (SHOWN_AS, b"from another client") in dead.headers


def dead_letter(authority: str, task_id: str) -> tuple[Task, State]:
    one = task(authority, id=task_id, queue="default")
    state = State(
        id=task_id,
        due_ms=0,
        added_ms=0,
        attempt=1,
        last_status="INVALID_ARGUMENT",
        reason="INVALID_ARGUMENT is not retried",
    )
    return one, state


async def test_dlq_and_queues_read_records_with_an_odd_header_name(
    kafka_bootstrap: str,
) -> None:
    config = make_config(kafka_bootstrap, kafka={"partitions": 1})
    topics = Topics(config.topics.prefix)
    authority = "127.0.0.1:1"
    main = topics.main(authority, "default")
    dead, state = dead_letter(authority, "dead")
    other, other_state = dead_letter(authority, "other")
    due_ms = 1_700_000_000_000
    head = State(id="head", due_ms=due_ms, added_ms=0)

    async with writer(config, main) as write:
        await write.batch(
            topics.dlq(authority, "default"),
            [
                odd((encode_task(dead), to_headers(state))),
                null_valued((encode_task(other), to_headers(other_state))),
            ],
        )
        await write.batch(
            main, [odd((b"", to_headers(head))), valid(task(authority), "y")]
        )

    [letters] = await queue_stats(config)
    [shown] = [s async for s in find(config, Filters(task_ids=(state.id,)))]
    [queue] = await stats.collect(config)

    assert letters.count == 2
    assert letters.statuses == {"INVALID_ARGUMENT": 2}
    assert shown.letter.header("reason") == state.reason
    assert (SHOWN_AS, b"from another client") in shown.letter.headers
    [null_shown] = [s async for s in find(config, Filters(task_ids=("other",)))]
    assert ("x-flag", b"") in null_shown.letter.headers
    assert queue.tiers["main"].depth == 2
    assert queue.oldest_due_ms == due_ms
