"""Fuzzing ``add`` on the real rpc server: no crash, a status for every request.

Hypothesis makes Task messages mixing valid and hostile fields, raw bodies that
are not Tasks at all, and broken gRPC framing. Every request must end with a
status that names a refusal (never INTERNAL or UNKNOWN, which would mean the
handler fell over), and the server must keep serving afterwards.
"""

import hashlib
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from taskqueue.protobuf.service_grpc import TaskQueueStub
from taskqueue.protobuf.service_pb2 import RetryPolicy, Task
from taskqueue.server.dispatcher import RawCodec
from taskqueue.server.topics import QUEUE_RE
from tests.conftest import make_config
from tests.support import rpc_server
from tests.test_add_errors import good_task
from tests.test_security_allowlist import BYPASSES

T = TypeVar("T")
ADD = "/taskqueue.service.TaskQueue/add"
ALLOWED = "127.0.0.1:50999"
METHOD = "/coffeemachine.CoffeeMachine/make_latte"
TYPE_URL = "type.googleapis.com/coffeemachine.LatteOrder"
# A refusal; INTERNAL or UNKNOWN would mean the handler fell over.
REFUSALS = {Status.INVALID_ARGUMENT, Status.PERMISSION_DENIED}
FUZZ = settings(
    max_examples=120,
    deadline=None,
    # The server is started once per test and shared by its examples on purpose.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@dataclass
class Running:
    port: int
    stub: TaskQueueStub
    raw: UnaryUnaryMethod[bytes, bytes]
    channel: Channel


@pytest.fixture
async def running(kafka_bootstrap: str) -> AsyncIterator[Running]:
    config = make_config(
        kafka_bootstrap, allow=[ALLOWED], rpc={"max_message_bytes": 64 * 1024}
    )
    async with (
        rpc_server(config) as port,
        Channel("127.0.0.1", port) as channel,
        Channel("127.0.0.1", port, codec=RawCodec()) as raw_channel,
    ):
        raw = UnaryUnaryMethod[bytes, bytes](raw_channel, ADD, bytes, bytes)
        yield Running(port, TaskQueueStub(channel), raw, channel)
        # Still serving after everything the test sent.
        assert (await TaskQueueStub(channel).add(good_task(), timeout=15)).id


def durations() -> st.SearchStrategy[Duration]:
    hostile = st.builds(
        Duration,
        seconds=st.integers(-(10**12), 10**12),
        nanos=st.integers(-(2**31), 2**31 - 1),
    )
    usual = st.builds(
        Duration, seconds=st.integers(0, 120), nanos=st.integers(0, 999_999_999)
    )
    return st.one_of(usual, hostile)


def timestamps() -> st.SearchStrategy[Timestamp]:
    hostile = st.builds(
        Timestamp,
        seconds=st.integers(-(10**12), 10**12),
        nanos=st.integers(-(2**31), 2**31 - 1),
    )
    near = st.builds(
        Timestamp,
        seconds=st.integers(int(time.time()) - 60, int(time.time()) + 60),
        nanos=st.integers(0, 999_999_999),
    )
    return st.one_of(near, hostile)


def _not_a_queue(text: str) -> bool:
    # A valid random queue name would create topics; a few fixed ones suffice.
    return QUEUE_RE.fullmatch(text) is None


def either(valid: T, hostile: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """Mostly the valid value, so that the checks after this field are reached."""
    return st.integers(0, 3).flatmap(lambda n: hostile if n == 0 else st.just(valid))


@st.composite
def tasks(draw: st.DrawFn) -> Task:
    task = Task(
        authority=draw(
            either(
                ALLOWED,
                st.one_of(
                    st.sampled_from([*BYPASSES, "127.0.0.1:0", "[::1]:1", ""]),
                    st.text(max_size=80),
                ),
            )
        ),
        method=draw(either(METHOD, st.text(max_size=600))),
        queue=draw(
            st.one_of(
                st.sampled_from(["", "default"]),
                st.text(max_size=80).filter(_not_a_queue),
            )
        ),
        delivery=draw(either(0, st.integers(-3, 3))),  # type: ignore[arg-type]
        id=draw(either("", st.text(max_size=140))),
    )
    task.argument.type_url = draw(either(TYPE_URL, st.text(max_size=600)))
    task.argument.value = draw(st.binary(max_size=2048))
    if draw(st.integers(0, 3)) == 0:
        for key, value in draw(
            st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=4)
        ).items():
            task.metadata[key] = value
    due = draw(st.sampled_from(["none", "delay", "eta"]))
    if due == "delay":
        task.delay.CopyFrom(draw(durations()))
    elif due == "eta":
        task.eta.CopyFrom(draw(timestamps()))
    if draw(st.booleans()):
        task.deadline.CopyFrom(draw(durations()))
    if draw(st.booleans()):
        task.retry.CopyFrom(
            RetryPolicy(
                max_attempts=draw(st.integers(0, 2**32 - 1)),
                backoff=draw(st.lists(durations(), max_size=3)),
                multiplier=draw(st.floats()),
            )
        )
    return task


@FUZZ
@given(tasks())
async def test_fuzzed_tasks_each_get_a_status(running: Running, task: Task) -> None:
    try:
        reply = await running.stub.add(task, timeout=15)
    except GRPCError as error:
        assert error.status in REFUSALS, error
        assert error.message, error
        event(error.status.name)
    else:
        assert reply.id
        event("accepted")


@FUZZ
@given(st.one_of(st.binary(max_size=4096), tasks().map(Task.SerializeToString)))
async def test_raw_bodies_each_get_a_status(running: Running, body: bytes) -> None:
    # Flip a byte of what may be a valid Task, so that it is almost one.
    if body:
        position = len(body) // 2
        body = body[:position] + bytes([body[position] ^ 0x5A]) + body[position + 1 :]
    try:
        await running.raw(body, timeout=15)
    except GRPCError as error:
        assert error.status in REFUSALS, error


@pytest.fixture
async def token_stub(kafka_bootstrap: str) -> AsyncIterator[TaskQueueStub]:
    digest = hashlib.sha256(b"the-right-token").hexdigest()
    config = make_config(
        kafka_bootstrap,
        allow=[ALLOWED],
        security={"callers": [{"name": "only", "token_sha256": digest}]},
    )
    async with rpc_server(config) as port, Channel("127.0.0.1", port) as channel:
        yield TaskQueueStub(channel)


@FUZZ
@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1))
async def test_fuzzed_authorization_values_are_unauthenticated(
    token_stub: TaskQueueStub, value: str
) -> None:
    with pytest.raises(GRPCError) as raised:
        await token_stub.add(good_task(), timeout=15, metadata={"authorization": value})

    assert raised.value.status is Status.UNAUTHENTICATED


def framed(payload: bytes, *, declared: int | None = None, flag: int = 0) -> bytes:
    length = len(payload) if declared is None else declared
    return struct.pack(">BI", flag, length) + payload


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (framed(b"\x0a\x01x", declared=2**31), "limit"),
        (framed(b"x" * 100, declared=64 * 1024 + 1), "limit"),
        (framed(good_task().SerializeToString(), flag=1), "compressed"),
        (framed(b"x" * 10, declared=100), "ended"),
        (b"\x00\x00", "ended"),
        (b"", "no Task"),
    ],
    ids=[
        "declares-2GiB",
        "over-the-limit",
        "compressed",
        "short",
        "cut-prefix",
        "empty",
    ],
)
async def test_broken_framing_gets_a_status(
    running: Running, data: bytes, named: str
) -> None:
    channel = Channel("127.0.0.1", running.port, codec=RawCodec())
    try:
        async with channel.request(
            ADD, Cardinality.UNARY_UNARY, bytes, bytes, timeout=15
        ) as stream:
            await stream.send_request()
            # Below grpclib's API: its send_message always frames correctly.
            await stream._stream.send_data(data, end_stream=True)
            stream._end_done = True
            with pytest.raises(GRPCError) as raised:
                await stream.recv_message()
    finally:
        channel.close()

    assert raised.value.status is Status.INVALID_ARGUMENT, raised.value
    assert named in (raised.value.message or ""), raised.value.message
