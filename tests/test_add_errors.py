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
import cafe_pb2

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


def many_metadata(count: int, value_chars: int) -> Spoil:
    def spoil(task: Task) -> None:
        for index in range(count):
            task.metadata[f"k{index}"] = "v" * value_chars

    return spoil


def type_url(value: str) -> Spoil:
    def spoil(task: Task) -> None:
        task.argument.type_url = value

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


def case(
    name: str, spoil: Spoil, field: str, status: Status = INVALID
) -> pytest.ParameterSet:
    """``spoil`` must get ``status`` and a message naming ``field``."""
    return pytest.param(spoil, status, field, id=name)


CASES = [
    case("authority-missing", setting("authority", ""), "authority"),
    case("authority-no-port", setting("authority", "localhost"), "authority"),
    case("authority-empty-port", setting("authority", "localhost:"), "authority"),
    case("authority-port-zero", setting("authority", "127.0.0.1:0"), "authority"),
    case("authority-port-big", setting("authority", "127.0.0.1:65536"), "authority"),
    case("authority-port-name", setting("authority", "127.0.0.1:grpc"), "authority"),
    case("authority-bad-host", setting("authority", "bad_host!:80"), "authority"),
    case("authority-dash-host", setting("authority", "-cafe.local:80"), "authority"),
    case("authority-ipv6-bad", setting("authority", "[::zz]:80"), "authority"),
    case("authority-ipv6-open", setting("authority", "[::1:80"), "authority"),
    case("authority-ipv6-bare", setting("authority", "::1:80"), "authority"),
    case(
        "authority-not-allowed",
        setting("authority", "10.1.2.3:50051"),
        "authority",
        Status.PERMISSION_DENIED,
    ),
    case(
        "authority-not-allowed-name",
        setting("authority", "metadata.google.internal:80"),
        "authority",
        Status.PERMISSION_DENIED,
    ),
    case("method-missing", setting("method", ""), "method"),
    case("method-no-slash", setting("method", "make_latte"), "method"),
    case("method-no-name", setting("method", "/coffeemachine.Cafe"), "method"),
    case("method-extra", setting("method", "/a.B/c/d"), "method"),
    case("method-space", setting("method", "/a.B/make latte"), "method"),
    case("method-empty-package-part", setting("method", "/a..B/c"), "method"),
    case("method-trailing-dot", setting("method", "/a.B./c"), "method"),
    case("argument-missing", no_argument, "argument"),
    case("argument-no-type", argument_without_type, "argument"),
    case("argument-type-url-long", type_url("t/" + "x" * 600), "argument.type_url"),
    case("authority-port-digits", setting("authority", "h:" + "9" * 5000), "authority"),
    case("queue-space", setting("queue", "my queue"), "queue"),
    case("queue-dot", setting("queue", "a.b"), "queue"),
    # Kafka would take "a_b" and "a.b" for one topic name.
    case("queue-underscore", setting("queue", "a_b"), "queue"),
    case("queue-long", setting("queue", "q" * 65), "queue"),
    case("queue-dlq", setting("queue", "dlq"), "queue"),
    case("queue-retry-tier", setting("queue", "retry-5s"), "queue"),
    case("delivery-unknown", setting("delivery", 7), "delivery"),
    case("delay-negative", duration("delay", -1), "delay"),
    case("delay-negative-nanos", duration("delay", 0, -1), "delay"),
    case("deadline-zero", duration("deadline", 0), "deadline"),
    case("deadline-negative", duration("deadline", -5), "deadline"),
    case("deadline-too-large", duration("deadline", 10**6), "deadline"),
    case("metadata-reserved", metadata("taskqueue-task-id", "x"), "metadata"),
    case("metadata-reserved-grpc", metadata("grpc-timeout", "1S"), "metadata"),
    case("metadata-upper-key", metadata("Tenant", "x"), "metadata"),
    case("metadata-space-key", metadata("my key", "x"), "metadata"),
    case("metadata-bin-key", metadata("blob-bin", "x"), "metadata"),
    case("metadata-non-ascii", metadata("tenant", "café"), "metadata"),
    case("metadata-newline", metadata("tenant", "a\nb"), "metadata"),
    case("metadata-host", metadata("host", "internal.admin"), "metadata"),
    case("metadata-te", metadata("te", "gzip"), "metadata"),
    case("metadata-connection", metadata("connection", "close"), "metadata"),
    case("metadata-trailing-space", metadata("tenant", "acme "), "metadata"),
    case("metadata-long-key", metadata("k" * 129, "x"), "metadata"),
    case("metadata-too-large", many_metadata(200, 8), "metadata"),
    case("id-bad-chars", setting("id", "order 42!"), "id"),
    case("id-too-long", setting("id", "i" * 129), "id"),
    case(
        "retry-too-many-attempts",
        retry(RetryPolicy(max_attempts=MAX_ATTEMPTS + 1)),
        "retry.max_attempts",
    ),
    case(
        "retry-too-many-backoffs",
        retry(RetryPolicy(backoff=[Duration(seconds=1)] * 101)),
        "retry.backoff",
    ),
    case(
        "retry-negative-backoff",
        retry(RetryPolicy(backoff=[Duration(seconds=-1)])),
        "retry.backoff",
    ),
]


@pytest.fixture
async def stub(config: Config) -> AsyncIterator[TaskQueueStub]:
    async with rpc_server(config) as port, Channel("127.0.0.1", port) as channel:
        yield TaskQueueStub(channel)


def names(field: str, message: str | None) -> bool:
    """``message`` mentions ``field`` as a word of its own."""
    pattern = rf"(?<![\w.]){re.escape(field)}(?!\w)"
    return re.search(pattern, message or "") is not None


@pytest.mark.parametrize(("spoil", "status", "field"), CASES)
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
