"""Records `add` would never write, put straight into a task topic by another
tool: each is dead-lettered with its reason, and what follows is called."""

from aiokafka import AIOKafkaProducer, ConsumerRecord

from taskqueue.protobuf.service_pb2 import Task
from taskqueue.server.config import Config
from taskqueue.server.dlq import read_letter
from taskqueue.server.kafka import KafkaWriter
from taskqueue.server.record import Headers, State, encode_task, to_headers
from taskqueue.server.topics import Topics
from tests.conftest import make_config
from tests.support import Target, read_topic, target, worker
from tests.test_ladder_kafka import task

# A record's value, headers and key.
Record = tuple[bytes, Headers, bytes | None]


async def write(config: Config, topic: str, records: list[Record]) -> None:
    writer = KafkaWriter(config)
    await writer.start()
    await writer.ensure_queue(topic)
    await writer.stop()
    producer = AIOKafkaProducer(bootstrap_servers=config.kafka.bootstrap_servers)
    await producer.start()
    try:
        for value, headers, key in records:
            await producer.send_and_wait(
                topic, value, key=key, headers=headers, partition=0
            )
    finally:
        await producer.stop()


def valid(one: Task, task_id: str, due_ms: int = 0) -> Record:
    one.id, one.queue = task_id, "default"
    state = State(id=task_id, due_ms=due_ms, added_ms=0)
    return encode_task(one), to_headers(state), task_id.encode()


def spoiled(record: Record, name: str, value: bytes) -> Record:
    """The record with one of its headers replaced."""
    task, headers, key = record
    return task, [(n, v) for n, v in headers if n != name] + [(name, value)], key


def keyless(record: Record) -> Record:
    task, headers, _ = record
    return task, headers, None


async def dead_letters(
    config: Config, cafe: Target, records: list[Record], count: int
) -> list[ConsumerRecord]:
    """Write ``records`` to the queue, run a worker until the one good task is
    called, and read the ``count`` dead letters of the others."""
    topics = Topics(config.topics.prefix)
    await write(config, topics.main(cafe.authority, "default"), records)
    async with worker(config):
        await cafe.wait_calls(1)
        return await read_topic(
            config.kafka.bootstrap_servers, topics.dlq(cafe.authority, "default"), count
        )


async def test_poison_records_are_dead_lettered_and_do_not_block(
    kafka_bootstrap: str,
) -> None:
    config = make_config(kafka_bootstrap, kafka={"partitions": 1})
    topics = Topics(config.topics.prefix)

    async with target() as cafe:
        main = topics.main(cafe.authority, "default")
        elsewhere = task("127.0.0.1:1")  # a valid task, in the wrong topic
        bad_metadata = task(cafe.authority, metadata={"Upper": "x"})
        good = task(cafe.authority)
        await write(
            config,
            main,
            [
                (b"\xff\x00 not a task", [], None),
                valid(elsewhere, "elsewhere"),
                # Written by another client, without a key: its letter's key
                # is its task id.
                keyless(valid(bad_metadata, "bad-metadata")),
                valid(good, "good"),
            ],
        )
        async with worker(config):
            [call] = await cafe.wait_calls(1)
            letters = await read_topic(
                kafka_bootstrap, topics.dlq(cafe.authority, "default"), 3
            )

    assert call.metadata["taskqueue-task-id"] == "good"
    reasons = [dict(r.headers)["tq-reason"].decode() for r in letters]
    assert "not a taskqueue.service.Task" in reasons[0]
    assert "not its topic's" in reasons[1]
    assert "metadata key" in reasons[2]
    assert letters[0].value == b"\xff\x00 not a task"
    assert [r.key for r in letters[1:]] == [b"elsewhere", b"bad-metadata"]


async def test_a_due_time_out_of_range_is_dead_lettered_not_called(
    kafka_bootstrap: str,
) -> None:
    """No calendar holds it: the worker could neither wait for it nor tell the
    target when the call was due (replayed tasks never carry one)."""
    config = make_config(kafka_bootstrap, kafka={"partitions": 1})

    async with target() as cafe:
        dues_ms = {"past": -(10**18), "future": 10**18, "good": 0}
        records = [valid(task(cafe.authority), i, d) for i, d in dues_ms.items()]
        letters = await dead_letters(config, cafe, records, 2)

    assert [c.metadata["taskqueue-task-id"] for c in cafe.calls] == ["good"]
    assert len(letters) == 2
    for letter in letters:
        reason = dict(letter.headers)["tq-reason"].decode()
        assert reason == "header tq-due-ms is out of range (years 1 to 9999)"
    # The task's own headers stay: `dlq show` reads it, and replay can take it.
    read = sorted(
        (letter.task_id, letter.state) for letter in map(read_letter, letters)
    )
    assert [(task_id, state and state.due_ms) for task_id, state in read] == [
        ("future", 10**18),
        ("past", -(10**18)),
    ]


async def test_headers_out_of_their_ascii_form_are_dead_lettered_not_called(
    kafka_bootstrap: str,
) -> None:
    """int() would read "-5" and "١٢٣" as attempts, and an empty id is none: a
    record claiming them must not be called (nor retried more than its policy
    allows); its dead letter keeps the record's own key."""
    config = make_config(kafka_bootstrap, kafka={"partitions": 1})

    async with target() as cafe:
        spoils = {
            "negative": ("tq-attempt", b"-5"),
            "arabic": ("tq-attempt", "١٢٣".encode()),
            "no-id": ("tq-id", b""),
        }
        records = [
            spoiled(valid(task(cafe.authority), task_id), *spoil)
            for task_id, spoil in spoils.items()
        ]
        records.append(valid(task(cafe.authority), "good"))
        letters = await dead_letters(config, cafe, records, 3)

    assert [c.metadata["taskqueue-task-id"] for c in cafe.calls] == ["good"]
    not_digits = "is not an integer in ASCII digits (no sign, at most 20 characters)"
    reasons = {r.key: dict(r.headers)["tq-reason"].decode() for r in letters}
    assert reasons == {
        b"negative": f"header tq-attempt {not_digits}",
        b"arabic": f"header tq-attempt {not_digits}",
        b"no-id": "header tq-id must be 1-128 of A-Z a-z 0-9 . _ : -",
    }
