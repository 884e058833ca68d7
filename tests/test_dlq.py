"""``taskqueue dlq``: list, show and replay dead letters on a real broker.

Dead letters come the way production makes them (a target answering
INVALID_ARGUMENT, NOT_FOUND or UNAVAILABLE to a running worker) where the test
is about what a worker does next; tests of the replay bookkeeping alone write
dead letters in the documented record format instead, which is faster.
"""

import asyncio
import json
import logging
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import cafe_pb2
import msgspec
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from google.protobuf.any_pb2 import Any as AnyMessage
from grpc_tools import protoc
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from typer.testing import CliRunner

from taskqueue.protobuf.service_grpc import TaskQueueStub
from taskqueue.protobuf.service_pb2 import RetryPolicy, Task
from taskqueue.server.cli import cli
from taskqueue.server.config import Config
from taskqueue.server.descriptors import ArgumentTypes
from taskqueue.server.dlq import Filters, find, make_filters, queue_stats
from taskqueue.server.dlq_view import letter_json
from taskqueue.server.kafka import KafkaWriter
from taskqueue.server.record import State, encode_task, from_headers, to_headers
from taskqueue.server.replay import Outcome, Replayer, ReplayHooks, ReplayOptions
from taskqueue.server.topics import Topics
from tests.conftest import ROOT, make_config
from tests.support import Received, Target, read_topic, rpc_server, worker

LATTE = "/coffeemachine.CoffeeMachine/make_latte"
ESPRESSO = "/coffeemachine.CoffeeMachine/make_espresso"
ORDER = cafe_pb2.LatteOrder(size=cafe_pb2.LARGE, temperature=90, sugar=3)
RAW_VALUE = b"\x00not a task"
SECTION = "dlqtest"


def task(authority: str, method: str = LATTE, **fields: object) -> Task:
    argument = AnyMessage()
    argument.Pack(ORDER)
    return Task(authority=authority, method=method, argument=argument, **fields)  # type: ignore[arg-type]


async def add(port: int, *tasks: Task) -> list[str]:
    async with Channel("127.0.0.1", port) as channel:
        stub = TaskQueueStub(channel)
        return [(await stub.add(one, timeout=10)).id for one in tasks]


@dataclass
class Running:
    target: Target

    async def __aenter__(self) -> Target:
        await self.target.start()
        return self.target

    async def __aexit__(self, *_: object) -> None:
        await self.target.stop()


def refuse_by_queue(statuses: dict[str, Status]) -> "Target":
    async def refuse(received: Received) -> None:
        queue = received.metadata["taskqueue-queue"]
        raise GRPCError(statuses[queue], f"no {queue} today")

    return Target(refuse, methods=(LATTE, ESPRESSO))


async def end_offset(bootstrap: str, topic: str) -> int:
    """Records ever written to ``topic`` (the sum of its partitions' ends)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        [described] = await admin.describe_topics([topic])
        tps = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
        ends = await consumer.end_offsets(tps) if tps else {}
    finally:
        await consumer.stop()
        await admin.close()
    return sum(ends.values())


async def end_offsets(bootstrap: str, topics: list[str]) -> list[int]:
    return [await end_offset(bootstrap, topic) for topic in topics]


async def topic_exists(bootstrap: str, topic: str) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return topic in await admin.list_topics()
    finally:
        await admin.close()


async def write_letters(config: Config, *letters: tuple[Task, State]) -> None:
    """Dead letters in the record format a worker writes (docs/records.md)."""
    topics = Topics(config.topics.prefix)
    writer = KafkaWriter(config)
    await writer.start()
    try:
        for one, state in letters:
            await writer.write(
                topics.dlq(one.authority, one.queue),
                key=state.id.encode(),
                value=encode_task(one),
                headers=to_headers(state),
                timestamp_ms=int(time.time() * 1000),
            )
    finally:
        await writer.stop()


def letter(authority: str, queue: str = "default") -> tuple[Task, State]:
    """A task dead-lettered after one INVALID_ARGUMENT, with its state."""
    now_ms = int(time.time() * 1000)
    one = task(authority, queue=queue, id=uuid.uuid4().hex)
    state = State(
        id=one.id,
        due_ms=now_ms - 1000,
        added_ms=now_ms - 2000,
        attempt=1,
        first_attempt_ms=now_ms - 1000,
        last_attempt_ms=now_ms - 1000,
        last_status="INVALID_ARGUMENT",
        last_message="bad order",
        origin="taskqueue.somewhere.default/0/0",
        reason="INVALID_ARGUMENT is not retried",
    )
    return one, state


def config_file(tmp_path: Path, config: Config) -> str:
    """``FILE@SECTION`` of a YAML file holding ``config``."""
    path = tmp_path / "config.yaml"
    path.write_bytes(msgspec.yaml.encode({SECTION: msgspec.to_builtins(config)}))
    return f"{path}@{SECTION}"


def iso(ms: int) -> str:
    """An ISO 8601 time in UTC, as --since and --until take it."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def json_lines(output: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """The CLI points the root logger at the stderr CliRunner captured."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# ------------------------------------------------ dead letters from a worker


@dataclass
class Seeded:
    """Dead letters of two authorities and three queues, and one unreadable.

    cafe, queue orders: latte and espresso, INVALID_ARGUMENT (partition 0/1);
    cafe, queue refunds: latte, NOT_FOUND; then ``between_ms``; then
    bar, queue default: latte, UNAVAILABLE after its one attempt allowed, and
    the unreadable record on cafe's orders dead-letter topic.
    """

    config: Config
    cafe: str
    bar: str
    ids: dict[str, str]  # latte, espresso, refund, bar -> task id
    between_ms: int

    def name(self, found: dict[str, object]) -> str:
        by_id = {v: k for k, v in self.ids.items()}
        return by_id.get(str(found.get("task_id")), "raw")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def seeded(kafka_bootstrap: str) -> AsyncIterator[Seeded]:
    config = make_config(kafka_bootstrap)
    topics = Topics(config.topics.prefix)
    cafe = refuse_by_queue(
        {"orders": Status.INVALID_ARGUMENT, "refunds": Status.NOT_FOUND}
    )
    bar = refuse_by_queue({"default": Status.UNAVAILABLE})
    once = RetryPolicy(max_attempts=1)

    async with (
        Running(cafe),
        Running(bar),
        rpc_server(config) as port,
        worker(config),
    ):
        latte, espresso, refund = await add(
            port,
            task(cafe.authority, queue="orders"),
            task(cafe.authority, ESPRESSO, queue="orders"),
            task(cafe.authority, queue="refunds"),
        )
        await read_topic(kafka_bootstrap, topics.dlq(cafe.authority, "orders"), 2)
        await read_topic(kafka_bootstrap, topics.dlq(cafe.authority, "refunds"), 1)
        await asyncio.sleep(0.05)
        between_ms = int(time.time() * 1000)
        await asyncio.sleep(0.05)
        [bar_id] = await add(port, task(bar.authority, retry=once))
        await read_topic(kafka_bootstrap, topics.dlq(bar.authority, "default"), 1)

    writer = KafkaWriter(config)
    await writer.start()
    try:
        reason = [("tq-reason", b"value is not a taskqueue.service.Task")]
        await writer.write(
            topics.dlq(cafe.authority, "orders"),
            key=b"",
            value=RAW_VALUE,
            headers=reason,
            timestamp_ms=int(time.time() * 1000),
        )
    finally:
        await writer.stop()

    ids = {"latte": latte, "espresso": espresso, "refund": refund, "bar": bar_id}
    yield Seeded(config, cafe.authority, bar.authority, ids, between_ms)


async def test_list_counts_dead_letters_per_queue(seeded: Seeded) -> None:
    stats = {(s.authority, s.queue): s for s in await queue_stats(seeded.config)}

    assert set(stats) == {
        (seeded.cafe, "orders"),
        (seeded.cafe, "refunds"),
        (seeded.bar, "default"),
    }
    orders = stats[seeded.cafe, "orders"]
    assert orders.count == 3
    assert orders.statuses == {"INVALID_ARGUMENT": 2, "(unreadable)": 1}
    assert stats[seeded.cafe, "refunds"].statuses == {"NOT_FOUND": 1}
    assert stats[seeded.bar, "default"].statuses == {"UNAVAILABLE": 1}
    assert orders.oldest_ms is not None and orders.newest_ms is not None
    assert orders.oldest_ms < seeded.between_ms < orders.newest_ms
    assert all(s.replayed == 0 for s in stats.values())


async def test_show_gives_the_full_context(seeded: Seeded) -> None:
    filters = Filters(task_ids=(seeded.ids["latte"],))
    [shown] = [
        letter_json(s, ArgumentTypes()) async for s in find(seeded.config, filters)
    ]

    assert shown["authority"] == seeded.cafe
    assert shown["method"] == LATTE
    assert shown["queue"] == "orders"
    assert shown["status"] == "INVALID_ARGUMENT"
    assert shown["message"] == "no orders today"
    assert "not retried" in str(shown["reason"])
    assert shown["attempts"] == 1
    assert shown["first_attempt_at"] == shown["last_attempt_at"] is not None
    assert str(shown["origin"]).startswith(f"{seeded.config.topics.prefix}.")
    assert str(shown["dead_letter"]).startswith(
        Topics(seeded.config.topics.prefix).dlq(seeded.cafe, "orders")
    )
    assert shown["replayed"] is False
    # No descriptor set: the argument as its type and bytes.
    argument = shown["argument"]
    assert isinstance(argument, dict)
    assert argument["type_url"] == "type.googleapis.com/coffeemachine.LatteOrder"
    assert bytes.fromhex(argument["hex"]) == ORDER.SerializeToString()
    assert "json" not in argument


async def test_show_tells_what_an_unreadable_dead_letter_holds(seeded: Seeded) -> None:
    filters = make_filters(queues=["orders"], since=iso(seeded.between_ms))
    found = [
        letter_json(s, ArgumentTypes()) async for s in find(seeded.config, filters)
    ]

    [raw] = [f for f in found if f["task_id"] is None]
    assert raw["reason"] == "value is not a taskqueue.service.Task"
    assert "not a taskqueue.service.Task" in str(raw["unreadable"])
    value = raw["value"]
    assert isinstance(value, dict) and bytes.fromhex(value["hex"]) == RAW_VALUE


def descriptor_set(tmp_path: Path) -> Path:
    out = tmp_path / "cafe.pb"
    cafe = ROOT / "examples" / "cafe"
    code = protoc.main(
        [
            "protoc",
            f"-I{cafe}",
            f"-I{resources.files('grpc_tools') / '_proto'}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            str(cafe / "cafe.proto"),
        ]
    )
    assert code == 0
    return out


def test_show_decodes_the_argument_with_a_descriptor_set(
    seeded: Seeded, tmp_path: Path
) -> None:
    location = config_file(tmp_path, seeded.config)
    latte = seeded.ids["latte"]
    args = ["dlq", "show", "-c", location, "--task-id", latte, "--json"]

    plain = CliRunner().invoke(cli, args)
    decoded = CliRunner().invoke(
        cli, [*args, "--descriptor-set", str(descriptor_set(tmp_path))]
    )

    assert plain.exit_code == decoded.exit_code == 0, plain.output + decoded.output
    [without] = json_lines(plain.stdout)
    [with_set] = json_lines(decoded.stdout)
    assert with_set["argument"] == {
        "type_url": "type.googleapis.com/coffeemachine.LatteOrder",
        "json": {"size": "LARGE", "temperature": 90, "sugar": 3},
    }
    assert without["argument"]["base64"] == "CAIQWhgD"  # type: ignore[index]


def test_show_on_a_terminal_prints_panels(seeded: Seeded, tmp_path: Path) -> None:
    location = config_file(tmp_path, seeded.config)
    result = CliRunner().invoke(
        cli, ["dlq", "show", "-c", location, "--queue", "refunds"]
    )

    assert result.exit_code == 0, result.output
    assert seeded.ids["refund"] in result.stdout
    assert "NOT_FOUND" in result.stdout
    assert "1 dead letter(s) shown." in result.stdout


def test_a_wrong_descriptor_set_is_a_usage_error(
    seeded: Seeded, tmp_path: Path
) -> None:
    location = config_file(tmp_path, seeded.config)
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\xff\xff\xff")

    result = CliRunner().invoke(
        cli, ["dlq", "show", "-c", location, "--descriptor-set", str(junk)]
    )

    assert result.exit_code == 2
    assert "FileDescriptorSet" in result.stderr


FilterCase = Callable[[Seeded], Filters]
FILTER_CASES: dict[str, tuple[FilterCase, set[str] | None]] = {
    "authority": (lambda s: make_filters(authorities=[s.bar]), {"bar"}),
    "authority pattern": (lambda s: make_filters(authorities=["127.0.0.*:*"]), None),
    "queue": (lambda s: make_filters(queues=["refunds"]), {"refund"}),
    "two queues": (
        lambda s: make_filters(queues=["refunds", "default"]),
        {"refund", "bar"},
    ),
    "method": (lambda s: make_filters(methods=["*espresso"]), {"espresso"}),
    "status": (
        lambda s: make_filters(statuses=["not_found", "UNAVAILABLE"]),
        {"refund", "bar"},
    ),
    "task id": (lambda s: make_filters(task_ids=[s.ids["latte"]]), {"latte"}),
    "until": (
        lambda s: make_filters(until=iso(s.between_ms)),
        {"latte", "espresso", "refund"},
    ),
    "since": (lambda s: make_filters(since=iso(s.between_ms)), {"bar", "raw"}),
    "since an hour ago": (lambda s: make_filters(since="1h"), None),
    "until an hour ago": (lambda s: make_filters(until="1h"), set()),
    "queue and status": (
        lambda s: make_filters(queues=["orders"], statuses=["INVALID_ARGUMENT"]),
        {"latte", "espresso"},
    ),
}


@pytest.mark.parametrize("case", FILTER_CASES)
async def test_filters_select_dead_letters(seeded: Seeded, case: str) -> None:
    """Each option narrows; None: everything (the five tasks and the raw one)."""
    make, expected = FILTER_CASES[case]

    found = [
        letter_json(s, ArgumentTypes()) async for s in find(seeded.config, make(seeded))
    ]

    names = [seeded.name(f) for f in found]
    assert len(set(names)) == len(names)
    assert set(names) == ({*seeded.ids, "raw"} if expected is None else expected)


async def test_limit_stops_after_that_many(seeded: Seeded) -> None:
    found = [s async for s in find(seeded.config, Filters(), limit=2)]
    assert len(found) == 2


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--since", "yesterday"),
        ("--until", "5 minutes"),
        ("--status", "BROKEN"),
        ("--delay", "soon"),
        ("--delay", "400000d"),
        ("--since", "9" * 400 + "d"),
    ],
)
def test_wrong_values_are_usage_errors(
    seeded: Seeded, tmp_path: Path, option: str, value: str
) -> None:
    location = config_file(tmp_path, seeded.config)

    result = CliRunner().invoke(cli, ["dlq", "replay", "-c", location, option, value])

    assert result.exit_code == 2
    assert f"{option} {value!r}" in result.stderr


def test_list_through_the_cli(seeded: Seeded, tmp_path: Path) -> None:
    location = config_file(tmp_path, seeded.config)

    as_json = CliRunner().invoke(cli, ["dlq", "list", "-c", location, "--json"])
    as_table = CliRunner().invoke(cli, ["dlq", "list", "-c", location])

    assert as_json.exit_code == as_table.exit_code == 0, as_json.output
    rows = {(r["authority"], r["queue"]): r for r in json.loads(as_json.stdout)}
    assert rows[seeded.cafe, "orders"]["count"] == 3
    assert rows[seeded.cafe, "orders"]["statuses"] == {
        "INVALID_ARGUMENT": 2,
        "(unreadable)": 1,
    }
    assert rows[seeded.bar, "default"]["statuses"] == {"UNAVAILABLE": 1}
    assert "refunds" in as_table.stdout and "NOT_FOUND 1" in as_table.stdout


def test_list_as_a_real_process(seeded: Seeded, tmp_path: Path) -> None:
    location = config_file(tmp_path, seeded.config)
    command = Path(sys.executable).with_name("taskqueue")

    done = subprocess.run(
        [str(command), "dlq", "list", "--config", location, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    counts = {(r["authority"], r["queue"]): r["count"] for r in json.loads(done.stdout)}
    assert counts == {
        (seeded.cafe, "orders"): 3,
        (seeded.cafe, "refunds"): 1,
        (seeded.bar, "default"): 1,
    }


def test_list_of_an_unreachable_broker_fails_with_exit_1(tmp_path: Path) -> None:
    config = make_config("127.0.0.1:1", kafka={"request_timeout_s": 1})
    location = config_file(tmp_path, config)

    result = CliRunner().invoke(cli, ["dlq", "list", "-c", location])

    assert result.exit_code == 1
    assert "Kafka" in result.stderr


# ------------------------------------------------------------------- replay


async def test_replay_calls_the_target_again_from_attempt_1(
    kafka_bootstrap: str,
) -> None:
    config = make_config(kafka_bootstrap)
    topics = Topics(config.topics.prefix)
    broken = True

    async def until_fixed(_: Received) -> None:
        if broken:
            raise GRPCError(Status.INVALID_ARGUMENT, "menu not loaded")

    async with (
        Running(Target(until_fixed)) as cafe,
        rpc_server(config) as port,
        worker(config),
    ):
        ids = await add(port, task(cafe.authority), task(cafe.authority))
        dlq = topics.dlq(cafe.authority, "default")
        before = await read_topic(kafka_bootstrap, dlq, 2)
        broken = False

        summary = await Replayer(config, Filters(), ReplayOptions()).run()
        calls = await cafe.wait_calls(4)
        after = await read_topic(kafka_bootstrap, dlq, 2)
        replayed = await read_topic(
            kafka_bootstrap, topics.main(cafe.authority, "default"), 4
        )

    assert summary.outcomes == {Outcome.REPLAYED: 2}
    again = calls[2:]
    assert {c.metadata["taskqueue-task-id"] for c in again} == set(ids)
    assert all(c.metadata["taskqueue-attempt"] == "1" for c in again)
    assert all("taskqueue-previous-status" not in c.metadata for c in again)
    assert all(c.body == ORDER.SerializeToString() for c in again)
    # The replayed records: a fresh state, one replay more, same value.
    states = [from_headers(list(r.headers)) for r in replayed]
    assert sorted(s.replays for s in states) == [0, 0, 1, 1]
    assert all(s.attempt == 0 and s.last_status is None for s in states if s.replays)
    # The dead letters are as they were, and no others were added.
    # (Partitions are read in no set order: compare by where each record is.)
    assert sorted((r.partition, r.offset, r.value, r.headers) for r in after) == (
        sorted((r.partition, r.offset, r.value, r.headers) for r in before)
    )
    assert await end_offset(kafka_bootstrap, dlq) == 2


async def test_replaying_twice_requeues_once_unless_again(
    kafka_bootstrap: str,
) -> None:
    config = make_config(kafka_bootstrap)
    topics = Topics(config.topics.prefix)
    authority = "127.0.0.1:1"
    await write_letters(config, letter(authority), letter(authority))
    main = topics.main(authority, "default")

    first = await Replayer(config, Filters(), ReplayOptions()).run()
    after_first = await end_offset(kafka_bootstrap, main)
    second = await Replayer(config, Filters(), ReplayOptions()).run()
    after_second = await end_offset(kafka_bootstrap, main)
    again = await Replayer(config, Filters(), ReplayOptions(again=True)).run()
    after_again = await end_offset(kafka_bootstrap, main)

    assert first.outcomes == {Outcome.REPLAYED: 2}
    assert second.outcomes == {Outcome.ALREADY_REPLAYED: 2}
    assert again.outcomes == {Outcome.REPLAYED: 2}
    assert (after_first, after_second, after_again) == (2, 2, 4)
    stats = await queue_stats(config)
    assert [(s.count, s.replayed) for s in stats] == [(2, 2)]


async def test_copies_of_one_dead_letter_are_replayed_once(
    kafka_bootstrap: str,
) -> None:
    """C11: a worker killed after the dead-letter write writes it again."""
    config = make_config(kafka_bootstrap, kafka={"partitions": 1})
    authority = "127.0.0.1:1"
    copy = letter(authority)
    await write_letters(config, copy, copy, letter(authority))

    summary = await Replayer(config, Filters(), ReplayOptions()).run()

    assert summary.outcomes == {Outcome.REPLAYED: 2, Outcome.DUPLICATE: 1}
    main = Topics(config.topics.prefix).main(authority, "default")
    assert await end_offset(kafka_bootstrap, main) == 2


def test_dry_run_prints_what_would_be_replayed_and_writes_nothing(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    config = make_config(kafka_bootstrap)
    topics = Topics(config.topics.prefix)
    chosen = sorted(
        [letter("127.0.0.1:1", "a"), letter("127.0.0.1:2", "b")],
        key=lambda one: one[0].id,
    )
    other = letter("127.0.0.1:1", "c")
    asyncio.run(write_letters(config, *chosen, other))
    location = config_file(tmp_path, config)
    mains = [topics.main(t.authority, t.queue) for t, _ in [*chosen, other]]
    args = ["dlq", "replay", "-c", location, "--queue", "a", "--queue", "b"]

    dry = CliRunner().invoke(cli, [*args, "--dry-run"])
    ends = asyncio.run(end_offsets(kafka_bootstrap, mains))
    marked = asyncio.run(topic_exists(kafka_bootstrap, topics.replayed()))
    real = CliRunner().invoke(cli, args)

    assert dry.exit_code == real.exit_code == 0, dry.output + real.output
    assert ends == [0, 0, 0]
    assert not marked
    # "would replay <task id> <authority> <method> <dead letter> -> <topic>"
    would = sorted(
        line.split()
        for line in dry.stdout.splitlines()
        if line.startswith("would replay ")
    )
    assert [(w[2], w[-1]) for w in would] == [
        (t.id, topics.main(t.authority, t.queue)) for t, _ in chosen
    ]
    # The real run replays exactly those, where the dry run said.
    done = sorted(
        line.split()
        for line in real.stdout.splitlines()
        if line.startswith("replayed ")
    )
    assert [(d[1], d[-1].rpartition("/")[0].rpartition("/")[0]) for d in done] == [
        (w[2], w[-1]) for w in would
    ]
    assert asyncio.run(end_offsets(kafka_bootstrap, mains)) == [1, 1, 0]


async def test_replay_ends_when_replayed_tasks_fail_straight_back(
    kafka_bootstrap: str,
) -> None:
    config = make_config(kafka_bootstrap, kafka={"partitions": 1})

    async def refuse(_: Received) -> None:
        raise GRPCError(Status.INVALID_ARGUMENT, "never")

    scanned: list[int] = []
    hooks = ReplayHooks(scanned=lambda: scanned.append(1))
    async with (
        Running(Target(refuse)) as cafe,
        rpc_server(config) as port,
        worker(config),
    ):
        await add(port, *(task(cafe.authority) for _ in range(5)))
        dlq = Topics(config.topics.prefix).dlq(cafe.authority, "default")
        await read_topic(kafka_bootstrap, dlq, 5)

        replayer = Replayer(config, Filters(), ReplayOptions(rate_per_s=2), hooks=hooks)
        async with asyncio.timeout(20):
            summary = await replayer.run()
        came_back_meanwhile = await end_offset(kafka_bootstrap, dlq) - 5
        letters = await read_topic(kafka_bootstrap, dlq, 10)

    assert summary.outcomes == {Outcome.REPLAYED: 5}
    assert len(scanned) == 5
    # Replayed tasks did fail back while the replay ran, and were not read.
    assert came_back_meanwhile >= 1
    assert (
        sorted(from_headers(list(r.headers)).replays for r in letters)
        == [0] * 5 + [1] * 5
    )


async def test_replay_due_later_rides_the_delay_ladder(kafka_bootstrap: str) -> None:
    config = make_config(kafka_bootstrap, topics={"tiers": ["2s", "1m"]})
    topics = Topics(config.topics.prefix)
    authority = "127.0.0.1:1"
    await write_letters(config, letter(authority))

    started_ms = int(time.time() * 1000)
    summary = await Replayer(config, Filters(), ReplayOptions(delay_s=3)).run()
    [record] = await read_topic(
        kafka_bootstrap, topics.tier(authority, "default", "retry-2s"), 1
    )

    assert summary.outcomes == {Outcome.REPLAYED: 1}
    state = from_headers(list(record.headers))
    assert started_ms + 3000 <= state.due_ms <= int(time.time() * 1000) + 3000
    assert (state.attempt, state.replays) == (0, 1)
    assert await end_offset(kafka_bootstrap, topics.main(authority, "default")) == 0


def test_replay_leaves_what_it_cannot_replay_and_exits_1(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    config = make_config(kafka_bootstrap, allow=["127.0.0.1:1"])
    asyncio.run(write_letters(config, letter("127.0.0.1:1"), letter("127.0.0.1:2")))
    location = config_file(tmp_path, config)

    result = CliRunner().invoke(cli, ["dlq", "replay", "-c", location, "--json"])

    assert result.exit_code == 1, result.output
    *steps, summary = json_lines(result.stdout)
    outcomes = {s["authority"]: s["outcome"] for s in steps}
    assert outcomes == {
        "127.0.0.1:1": "replayed",
        "127.0.0.1:2": "not allowed",
    }
    assert summary["summary"] == {
        "scanned": 2,
        "dry_run": False,
        "replayed": 1,
        "not allowed": 1,
    }


def test_the_marks_topic_is_no_queue_of_the_main_worker() -> None:
    topics = Topics("taskqueue")
    assert re.match(topics.main_pattern(), topics.replayed()) is None
    assert re.match(topics.dlq_pattern(), topics.replayed()) is None
    assert re.match(topics.main_pattern(), topics.main("[::1]:5", "q"))


def test_authority_patterns_take_ipv6_brackets_literally() -> None:
    topics = Topics("taskqueue")
    ipv6 = topics.authority_and_queue(topics.dlq("[0:0::1]:50051", "q"))
    named = topics.authority_and_queue(topics.dlq("Cafe.Prod.:50051", "q"))

    assert ipv6 == ("[::1]:50051", "q")
    assert make_filters(authorities=["[::1]:*"]).covers_topic(*ipv6)
    assert not make_filters(authorities=["[::2]:*"]).covers_topic(*ipv6)
    assert make_filters(authorities=["*.PROD:5005?"]).covers_topic(*named)
    assert not make_filters(authorities=["*.prod:1"]).covers_topic(*named)
    assert not make_filters(queues=["other"]).covers_topic(*named)


def test_times_are_iso_in_utc_or_durations_ago() -> None:
    now_s = 1_750_000_000.0
    filters = make_filters(since="2025-06-15T12:00", until="90s", now_s=now_s)

    assert filters.since_ms == 1_749_988_800_000
    assert filters.until_ms == int((now_s - 90) * 1000)
    assert make_filters(since="2025-06-15T14:00+02:00").since_ms == filters.since_ms


def test_a_descriptor_set_without_imports_still_knows_well_known_types(
    tmp_path: Path,
) -> None:
    out = tmp_path / "bare.pb"
    cafe = ROOT / "examples" / "cafe"
    well_known = resources.files("grpc_tools") / "_proto"
    args = ["protoc", f"-I{cafe}", f"-I{well_known}", f"--descriptor_set_out={out}"]
    assert protoc.main([*args, str(cafe / "cafe.proto")]) == 0
    argument = AnyMessage()
    argument.Pack(ORDER)

    decoded = ArgumentTypes.load(out).decode(argument)

    assert decoded.json == {"size": "LARGE", "temperature": 90, "sugar": 3}


# ------------------------------------------------------- times out of range

# What another tool may write into a time header: integers, but no calendar's.
FAR_FUTURE_MS = 10**18
FAR_PAST_MS = -(10**18)


def letter_out_of_range(authority: str, due_ms: int) -> tuple[Task, State]:
    """A dead letter whose every time header is out of range."""
    one, state = letter(authority)
    odd = msgspec.structs.replace(
        state,
        due_ms=due_ms,
        added_ms=FAR_PAST_MS,
        first_attempt_ms=FAR_PAST_MS,
        last_attempt_ms=FAR_FUTURE_MS,
    )
    return one, odd


def test_show_and_list_print_times_out_of_range_as_their_numbers(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    config = make_config(kafka_bootstrap)
    one, state = letter_out_of_range("127.0.0.1:1", FAR_FUTURE_MS)
    asyncio.run(write_letters(config, (one, state)))
    location = config_file(tmp_path, config)
    commands = {
        "show": ["show"],
        "show --json": ["show", "--json"],
        "list": ["list"],
        "list --json": ["list", "--json"],
    }

    runs = {
        name: CliRunner().invoke(cli, ["dlq", *args, "-c", location])
        for name, args in commands.items()
    }

    for name, run in runs.items():
        assert (run.exit_code, run.exception) == (0, None), f"{name}: {run.output}"
    [shown] = json_lines(runs["show --json"].stdout)
    assert shown["task_id"] == one.id
    assert shown["added_at"] == f"out of range ({FAR_PAST_MS} ms)"
    assert shown["first_attempt_at"] == f"out of range ({FAR_PAST_MS} ms)"
    assert shown["last_attempt_at"] == f"out of range ({FAR_FUTURE_MS} ms)"
    panel = runs["show"].stdout
    assert f"out of range ({FAR_FUTURE_MS} ms)" in panel
    assert "1 dead letter(s) shown." in panel
    [listed] = json.loads(runs["list --json"].stdout)
    assert listed["count"] == 1
    assert one.queue in runs["list"].stdout


def test_replay_of_a_letter_due_out_of_range_is_due_now(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A due time no calendar holds bounds nothing: such a task is replayed
    due now onto its main topic, not parked on the ladder for good."""
    config = make_config(kafka_bootstrap)
    authority = "127.0.0.1:1"
    letters = [
        letter_out_of_range(authority, due) for due in (FAR_FUTURE_MS, FAR_PAST_MS)
    ]
    asyncio.run(write_letters(config, *letters))
    location = config_file(tmp_path, config)
    main = Topics(config.topics.prefix).main(authority, "default")

    started_ms = int(time.time() * 1000)
    run = CliRunner().invoke(cli, ["dlq", "replay", "-c", location, "--json"])
    ended_ms = int(time.time() * 1000)
    replayed = asyncio.run(read_topic(kafka_bootstrap, main, 2))

    assert (run.exit_code, run.exception) == (0, None), run.output
    *steps, _ = json_lines(run.stdout)
    assert [s["outcome"] for s in steps] == ["replayed", "replayed"]
    states = [from_headers(list(r.headers)) for r in replayed]
    assert sorted(s.id for s in states) == sorted(one.id for one, _ in letters)
    assert all(started_ms <= s.due_ms <= ended_ms for s in states)
    assert all(started_ms <= s.added_ms <= ended_ms for s in states)
