"""Bad input to ``add``: a clear gRPC status whose message names the field.

The raw ``Task`` goes through grpclib's generated stub, so these cases reach
the server exactly as a caller in another language would send them.
"""

import re
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.empty_pb2 import Empty
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from taskqueue.client.queue import QueueStub
from taskqueue.protobuf.service_grpc import TaskQueueStub
from taskqueue.protobuf.service_pb2 import AddReply, RetryPolicy, Task
from taskqueue.server.config import Config
from taskqueue.server.dispatcher import RawCodec
from taskqueue.server.validation import HEADER_ROOM_BYTES, MAX_ATTEMPTS
from tests.support import rpc_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "cafe"))
import cafe_pb2  # noqa: E402

ADD = "/taskqueue.service.TaskQueue/add"
CoffeeMachineQueue = QueueStub.for_(cafe_pb2, "CoffeeMachine")


def good_task() -> Task:
    """A task ``add`` accepts; each case spoils one field of it."""
    task = Task(
        authority="127.0.0.1:50999",
        method="/coffeemachine.CoffeeMachine/make_latte",
        queue="orders",
    )
    task.argument.Pack(cafe_pb2.LatteOrder(size=cafe_pb2.LARGE, temperature=80))
    return task


Spoil = Callable[[Task], None]


def setting(name: str, value: object) -> Spoil:
    def spoil(task: Task) -> None:
        setattr(task, name, value)

    return spoil


def duration(name: str, seconds: int, nanos: int = 0) -> Spoil:
    def spoil(task: Task) -> None:
        getattr(task, name).CopyFrom(Duration(seconds=seconds, nanos=nanos))

    return spoil


def metadata(key: str, value: str) -> Spoil:
    def spoil(task: Task) -> None:
        task.metadata[key] = value

    return spoil


def no_argument(task: Task) -> None:
    task.ClearField("argument")


def argument_without_type(task: Task) -> None:
    task.argument.type_url = ""


def retry(policy: RetryPolicy) -> Spoil:
    def spoil(task: Task) -> None:
        task.retry.CopyFrom(policy)

    return spoil


INVALID = Status.INVALID_ARGUMENT

# (case id, spoil, expected status, the field the message must name)
CASES: list[tuple[str, Spoil, Status, str]] = [
    ("authority-missing", setting("authority", ""), INVALID, "authority"),
    ("authority-no-port", setting("authority", "localhost"), INVALID, "authority"),
    ("authority-empty-port", setting("authority", "localhost:"), INVALID, "authority"),
    ("authority-port-zero", setting("authority", "127.0.0.1:0"), INVALID, "authority"),
    ("authority-port-big", setting("authority", "127.0.0.1:65536"), INVALID, "authority"),
    ("authority-port-name", setting("authority", "127.0.0.1:grpc"), INVALID, "authority"),
    ("authority-bad-host", setting("authority", "bad_host!:80"), INVALID, "authority"),
    ("authority-dash-host", setting("authority", "-cafe.local:80"), INVALID, "authority"),
    ("authority-ipv6-bad", setting("authority", "[::zz]:80"), INVALID, "authority"),
    ("authority-ipv6-open", setting("authority", "[::1:80"), INVALID, "authority"),
    ("authority-ipv6-bare", setting("authority", "::1:80"), INVALID, "authority"),
    (
        "authority-not-allowed",
        setting("authority", "10.1.2.3:50051"),
        Status.PERMISSION_DENIED,
        "authority",
    ),
    (
        "authority-not-allowed-name",
        setting("authority", "metadata.google.internal:80"),
        Status.PERMISSION_DENIED,
        "authority",
    ),
    ("method-missing", setting("method", ""), INVALID, "method"),
    ("method-no-slash", setting("method", "make_latte"), INVALID, "method"),
    ("method-no-name", setting("method", "/coffeemachine.Cafe"), INVALID, "method"),
    ("method-extra", setting("method", "/a.B/c/d"), INVALID, "method"),
    ("method-space", setting("method", "/a.B/make latte"), INVALID, "method"),
    ("argument-missing", no_argument, INVALID, "argument"),
    ("argument-no-type", argument_without_type, INVALID, "argument"),
    ("queue-space", setting("queue", "my queue"), INVALID, "queue"),
    ("queue-dot", setting("queue", "a.b"), INVALID, "queue"),
    ("queue-long", setting("queue", "q" * 65), INVALID, "queue"),
    ("queue-dlq", setting("queue", "dlq"), INVALID, "queue"),
    ("queue-retry-tier", setting("queue", "retry-5s"), INVALID, "queue"),
    ("delivery-unknown", setting("delivery", 7), INVALID, "delivery"),
    ("delay-negative", duration("delay", -1), INVALID, "delay"),
    ("delay-negative-nanos", duration("delay", 0, -1), INVALID, "delay"),
    ("deadline-zero", duration("deadline", 0), INVALID, "deadline"),
    ("deadline-negative", duration("deadline", -5), INVALID, "deadline"),
    ("deadline-too-large", duration("deadline", 10**6), INVALID, "deadline"),
    ("metadata-reserved", metadata("taskqueue-task-id", "x"), INVALID, "metadata"),
    ("metadata-reserved-grpc", metadata("grpc-timeout", "1S"), INVALID, "metadata"),
    ("metadata-upper-key", metadata("Tenant", "x"), INVALID, "metadata"),
    ("metadata-space-key", metadata("my key", "x"), INVALID, "metadata"),
    ("metadata-bin-key", metadata("blob-bin", "x"), INVALID, "metadata"),
    ("metadata-non-ascii", metadata("tenant", "café"), INVALID, "metadata"),
    ("metadata-newline", metadata("tenant", "a\nb"), INVALID, "metadata"),
    ("id-bad-chars", setting("id", "order 42!"), INVALID, "id"),
    ("id-too-long", setting("id", "i" * 129), INVALID, "id"),
    (
        "retry-too-many-attempts",
        retry(RetryPolicy(max_attempts=MAX_ATTEMPTS + 1)),
        INVALID,
        "retry.max_attempts",
    ),
    (
        "retry-negative-backoff",
        retry(RetryPolicy(backoff=[Duration(seconds=-1)])),
        INVALID,
        "retry.backoff",
    ),
]


@pytest.fixture
async def stub(config: Config) -> AsyncIterator[TaskQueueStub]:
    async with rpc_server(config) as port, Channel("127.0.0.1", port) as channel:
        yield TaskQueueStub(channel)


def names(field: str, message: str | None) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(field)}(?![\w])", message or "") is not None


@pytest.mark.parametrize(
    ("spoil", "status", "field"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
async def test_bad_field_gets_its_status_and_a_message_naming_it(
    stub: TaskQueueStub, spoil: Spoil, status: Status, field: str
) -> None:
    task = good_task()
    spoil(task)

    with pytest.raises(GRPCError) as raised:
        await stub.add(task, timeout=10)

    assert raised.value.status is status, raised.value.message
    assert names(field, raised.value.message), raised.value.message


async def test_too_large_argument_names_the_limit(
    stub: TaskQueueStub, config: Config
) -> None:
    limit = config.rpc.max_message_bytes - HEADER_ROOM_BYTES
    task = good_task()
    task.argument.value = b"x" * (limit + 1)

    with pytest.raises(GRPCError) as raised:
        await stub.add(task, timeout=10)

    assert raised.value.status is Status.INVALID_ARGUMENT
    assert names("argument", raised.value.message), raised.value.message
    assert str(limit) in (raised.value.message or ""), raised.value.message


async def test_argument_at_the_limit_is_accepted(
    stub: TaskQueueStub, config: Config
) -> None:
    task = good_task()
    task.argument.value = b"x" * (config.rpc.max_message_bytes - HEADER_ROOM_BYTES)

    reply = await stub.add(task, timeout=15)

    assert isinstance(reply, AddReply)
    assert reply.id


@pytest.mark.parametrize(
    "body",
    [b"\xff\xff\xff\xff not a protobuf", b"\x0a\x02\xff\xfe"],
    ids=["corrupt-wire-format", "authority-not-utf8"],
)
async def test_garbage_body_gets_a_status_and_the_server_keeps_serving(
    config: Config, body: bytes
) -> None:
    async with rpc_server(config) as port:
        async with Channel("127.0.0.1", port, codec=RawCodec()) as raw:
            garbage = UnaryUnaryMethod[bytes, bytes](raw, ADD, bytes, bytes)
            with pytest.raises(GRPCError) as raised:
                await garbage(body, timeout=10)
        async with Channel("127.0.0.1", port) as channel:
            reply = await TaskQueueStub(channel).add(good_task(), timeout=10)

    assert raised.value.status is Status.INVALID_ARGUMENT, raised.value
    assert "Task" in (raised.value.message or ""), raised.value.message
    assert reply.id


@pytest.mark.parametrize(
    "wrong",
    [Empty(), Duration(seconds=1), {"size": 2}, b"\x08\x02"],
    ids=["other-message", "well-known-type", "dict", "bytes"],
)
async def test_client_refuses_a_message_of_the_wrong_type(wrong: object) -> None:
    # No server: the client must refuse before anything is sent.
    async with Channel("127.0.0.1", 9) as channel:
        queue = CoffeeMachineQueue("127.0.0.1:50999", channel)
        with pytest.raises(TypeError, match=r"coffeemachine\.LatteOrder"):
            await queue.make_latte.add(wrong, timeout=1)  # type: ignore[arg-type]
