"""Slow and abusive clients of the rpc server, seen from the wire.

A raw HTTP/2 client (h2, below any gRPC library) does what gRPC libraries
never do: stops halfway through a request, opens more streams than the server
allows (with or without acknowledging the limit), sends a ``grpc-timeout``
already spent or malformed, connects and says nothing, never lets an answer
be written, or opens and resets streams by the hundred.
Each gets a clear answer within its limit, and other clients (and the abusive
connection's own other requests) carry on.

Most tests build the server with ``make_server`` as ``app.py`` does but never
start its Kafka writer: none of their requests gets as far as a write. The
one that checks ``add`` still succeeds next to an abusive client runs the
whole rpc server against Kafka.
"""

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.reflection.v1.reflection_grpc import ServerReflectionStub
from grpclib.reflection.v1.reflection_pb2 import ServerReflectionRequest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    Event,
    ResponseReceived,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes
from hyperframe.frame import Frame, SettingsFrame

from taskqueue.protobuf.service_grpc import TaskQueueStub
from taskqueue.server.config import RpcConfig
from taskqueue.server.errors import ConfigError
from taskqueue.server.guard import MAX_CLIENT_RESETS
from taskqueue.server.kafka import KafkaWriter
from taskqueue.server.rpc import TaskQueueService, make_server
from tests.conftest import make_config
from tests.support import rpc_server
from tests.test_add_errors import good_task

ADD = "/taskqueue.service.TaskQueue/add"
CHECK = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
SERVICE = "taskqueue.service.TaskQueue"
# Never contacted: the servers built here do not start their Kafka writer.
NO_KAFKA = "127.0.0.1:1"
READ_TIMEOUT_S = 0.5
IDLE_TIMEOUT_S = 0.5
# The idle timeout must be above add's own (none of these adds reach Kafka).
IDLE_LIMITS = {"idle_timeout_s": IDLE_TIMEOUT_S, "add_timeout_s": IDLE_TIMEOUT_S / 2}
# For a loaded machine: how much later than its limit an answer may come.
SLACK_S = 3.0
# asyncio may run a timer a clock tick early.
EARLY_S = 0.01


def framed(message: bytes) -> bytes:
    """``message`` as gRPC sends it: uncompressed, length-prefixed."""
    return struct.pack(">BI", 0, len(message)) + message


CHECK_REQUEST = framed(HealthCheckRequest().SerializeToString())


def request_headers(path: str) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "taskqueue"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


class RawClient:
    """An HTTP/2 client that sends exactly the frames a test asks for."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer
        self.h2 = H2Connection(
            H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.events: list[tuple[float, Event]] = []  # (time.monotonic(), event)
        self.closed_at: float | None = None
        self.last_sent_at: float | None = None
        self._arrived = asyncio.Event()
        self._reading: asyncio.Task[None] | None = None

    def start(self, settings: Mapping[SettingCodes, int] | None = None) -> None:
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings({code: value for code, value in settings.items()})
        self._flush()
        self._reading = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def _read(self) -> None:
        while data := await self._reader.read(65536):
            now = time.monotonic()
            self.events.extend((now, event) for event in self.h2.receive_data(data))
            self._flush()  # h2's acknowledgements (SETTINGS, PING)
            self._arrived.set()
        self.closed_at = time.monotonic()
        self._arrived.set()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)
            self.last_sent_at = time.monotonic()

    def never_acknowledge_settings(self) -> None:
        """Apply the server's SETTINGS but never say so, as a hostile client
        may: h2 (private API) returns the ACK frame from its handler."""
        receive = self.h2._frame_dispatch_table[SettingsFrame]

        def receive_silently(frame: SettingsFrame) -> tuple[list[Frame], list[Event]]:
            frames, events = receive(frame)
            return [f for f in frames if "ACK" not in f.flags], events

        self.h2._frame_dispatch_table[SettingsFrame] = receive_silently

    async def wait_until(
        self, condition: Callable[[], bool], timeout_s: float = SLACK_S
    ) -> None:
        async with asyncio.timeout(timeout_s):
            while not condition():
                self._arrived.clear()
                await self._arrived.wait()

    async def settled(self, limit: int) -> None:
        """Wait until the server's SETTINGS, its stream limit among them,
        arrived (and were acknowledged: they apply from then on)."""
        advertised = self.h2.remote_settings
        await self.wait_until(lambda: advertised.max_concurrent_streams == limit)

    def ignore_stream_limit(self) -> None:
        """Behave as a client that disregards the server's stream limit."""
        self.h2.remote_settings.update({SettingCodes.MAX_CONCURRENT_STREAMS: 2**31})
        self.h2.remote_settings.acknowledge()

    def open(
        self,
        path: str,
        data: bytes = b"",
        *,
        end: bool = False,
        timeout: str | None = None,
    ) -> int:
        """Start a request on a new stream; it stalls there unless ``end``."""
        stream_id = self.h2.get_next_available_stream_id()
        headers = request_headers(path)
        if timeout is not None:
            headers.append(("grpc-timeout", timeout))
        self.h2.send_headers(stream_id, headers, end_stream=end and not data)
        if data:
            self.h2.send_data(stream_id, data, end_stream=end)
        self._flush()
        return stream_id

    def cancel(self, stream_id: int) -> None:
        self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        self._flush()

    def rapid_reset(self, count: int) -> None:
        """Open ``count`` requests and reset each at once, in one write."""
        for _ in range(count):
            stream_id = self.h2.get_next_available_stream_id()
            self.h2.send_headers(stream_id, request_headers(ADD))
            self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        self._flush()

    def ping(self) -> None:
        self.h2.ping(b"still up")
        self._flush()

    def status(self, stream_id: int) -> tuple[int, str] | None:
        """The gRPC status and message the stream was answered with."""
        for _, event in self._answers(stream_id):
            return event
        return None

    def answered_at(self, stream_id: int) -> float | None:
        for at, _ in self._answers(stream_id):
            return at
        return None

    def _answers(self, stream_id: int) -> list[tuple[float, tuple[int, str]]]:
        answers = []
        for at, event in self.events:
            if isinstance(event, ResponseReceived | TrailersReceived):
                fields = {_text(k): _text(v) for k, v in event.headers or []}
                if event.stream_id == stream_id and "grpc-status" in fields:
                    status = int(fields["grpc-status"])
                    answers.append((at, (status, fields.get("grpc-message", ""))))
        return answers

    def refused(self, stream_id: int) -> bool:
        return any(
            isinstance(event, StreamReset)
            and event.stream_id == stream_id
            and event.error_code == ErrorCodes.REFUSED_STREAM
            for _, event in self.events
        )

    def goaway(self) -> tuple[float, ConnectionTerminated] | None:
        for at, event in self.events:
            if isinstance(event, ConnectionTerminated):
                return at, event
        return None


def _text(value: bytes | str) -> str:
    # h2 gives str with a header_encoding, though typed as bytes.
    return value.decode() if isinstance(value, bytes) else value


@contextlib.asynccontextmanager
async def raw_client(
    port: int,
    settings: Mapping[SettingCodes, int] | None = None,
    *,
    acknowledge_settings: bool = True,
) -> AsyncIterator[RawClient]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = RawClient(reader, writer)
    if not acknowledge_settings:
        client.never_acknowledge_settings()
    client.start(settings)
    try:
        yield client
    finally:
        await client.stop()


@dataclass
class Bare:
    port: int
    health: ServiceStatus


@contextlib.asynccontextmanager
async def bare_rpc(**rpc: object) -> AsyncIterator[Bare]:
    """The rpc server built as ``app.py`` builds it, with ``rpc`` settings,
    and no Kafka behind it."""
    config = make_config(NO_KAFKA, rpc=rpc)
    writer = KafkaWriter(config)
    service = TaskQueueService(config, writer)
    health = ServiceStatus()
    health.set(True)
    server = make_server(config.rpc, service, Health({service: [health]}))
    await server.start("127.0.0.1", 0)
    try:
        port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        yield Bare(port, health)
    finally:
        server.close()
        await server.wait_closed()
        await writer.stop()


async def check_health(port: int) -> int:
    """What a well-behaved client asking on a connection of its own gets."""
    async with Channel("127.0.0.1", port) as channel:
        reply = await HealthStub(channel).Check(HealthCheckRequest(), timeout=5)
    return int(reply.status)


STALLS = {
    "headers-only": b"",
    "cut-prefix": b"\x00\x00\x00",
    "cut-message": framed(b"x" * 100)[:40],
}


@pytest.mark.parametrize("sent", STALLS.values(), ids=STALLS.keys())
async def test_a_stalled_request_is_answered_at_the_read_timeout(sent: bytes) -> None:
    # One stream per connection: the stalled one must give its slot back.
    limits = {"request_read_timeout_s": READ_TIMEOUT_S, "max_concurrent_streams": 1}
    async with bare_rpc(**limits) as bare, raw_client(bare.port) as raw:
        await raw.settled(1)
        started = time.monotonic()
        stalled = raw.open(ADD, sent)
        other = await check_health(bare.port)
        other_done = time.monotonic()
        await raw.wait_until(lambda: raw.status(stalled) is not None)
        again = raw.open(CHECK, CHECK_REQUEST, end=True)
        await raw.wait_until(lambda: raw.status(again) is not None)

    status, message = raw.status(stalled) or (None, "")
    answered = (raw.answered_at(stalled) or 0) - started
    assert status == Status.DEADLINE_EXCEEDED.value, message
    assert "rpc.request_read_timeout_s" in message, message
    assert READ_TIMEOUT_S - EARLY_S <= answered <= READ_TIMEOUT_S + SLACK_S
    assert other == HealthCheckResponse.SERVING
    assert other_done < started + answered, "others were kept waiting"
    assert raw.status(again) == (Status.OK.value, "")
    assert not raw.refused(again)


async def test_streams_beyond_the_limit_are_refused_alone() -> None:
    limit = 3
    async with (
        bare_rpc(max_concurrent_streams=limit) as bare,
        raw_client(bare.port) as raw,
    ):
        await raw.settled(limit)
        raw.ignore_stream_limit()
        streams = [raw.open(ADD) for _ in range(limit + 2)]  # each one stalls
        await raw.wait_until(lambda: all(raw.refused(s) for s in streams[limit:]))
        other = await check_health(bare.port)
        raw.cancel(streams[0])
        again = raw.open(CHECK, CHECK_REQUEST, end=True)
        await raw.wait_until(lambda: raw.status(again) is not None)

    # The connection and the streams it was allowed went on.
    assert not any(raw.refused(s) or raw.status(s) for s in streams[:limit])
    assert raw.status(again) == (Status.OK.value, "")
    assert raw.goaway() is None
    assert other == HealthCheckResponse.SERVING


async def test_a_client_that_never_acknowledges_the_limit_is_held_to_it() -> None:
    limit = 3
    async with (
        bare_rpc(max_concurrent_streams=limit) as bare,
        raw_client(bare.port, acknowledge_settings=False) as raw,
    ):
        await raw.settled(limit)
        raw.ignore_stream_limit()
        streams = [raw.open(ADD) for _ in range(limit + 2)]  # each one stalls
        await raw.wait_until(lambda: all(raw.refused(s) for s in streams[limit:]))

    # Unacknowledged, the limit would be h2's default of 100.
    assert not any(raw.refused(s) or raw.status(s) for s in streams[:limit])
    assert raw.goaway() is None


async def test_a_grpclib_client_keeps_within_the_limit_next_to_an_abusive_one(
    kafka_bootstrap: str,
) -> None:
    limit = 2
    config = make_config(kafka_bootstrap, rpc={"max_concurrent_streams": limit})
    async with (
        rpc_server(config) as port,
        raw_client(port) as raw,
        Channel("127.0.0.1", port) as channel,
    ):
        await raw.settled(limit)
        raw.ignore_stream_limit()
        streams = [raw.open(ADD) for _ in range(limit + 1)]
        await raw.wait_until(lambda: raw.refused(streams[-1]))

        stub = TaskQueueStub(channel)
        # The first call connects and learns the limit; the others queue.
        first = await stub.add(good_task(), timeout=15)
        rest = await asyncio.gather(
            *(stub.add(good_task(), timeout=15) for _ in range(4 * limit))
        )

    assert first.id
    assert all(reply.id for reply in rest)
    assert not any(raw.refused(s) for s in streams[:limit])


async def add_with_timeout(header: str) -> tuple[int | None, str]:
    """The status and message of an add sent with ``grpc-timeout: header``."""
    async with bare_rpc() as bare, raw_client(bare.port) as raw:
        request = framed(good_task().SerializeToString())
        stream = raw.open(ADD, request, end=True, timeout=header)
        await raw.wait_until(lambda: raw.status(stream) is not None)
    return raw.status(stream) or (None, "")


@pytest.mark.parametrize("spent", ["1n", "0n", "1u"])
async def test_a_request_arriving_after_its_deadline_is_deadline_exceeded(
    spent: str,
) -> None:
    status, message = await add_with_timeout(spent)

    # Handled at all, the task would have waited for Kafka (there is none)
    # until add_timeout_s and got UNAVAILABLE.
    assert status == Status.DEADLINE_EXCEEDED.value, message
    assert "deadline (grpc-timeout) had passed" in message, message


MALFORMED_TIMEOUTS = {
    "negative": "-1S",
    "fraction": "1.5S",
    "letters": "abc",
    "empty": "",
    "overflowing": "1" * 400 + "S",
    "thousands-of-digits": "1" * 5000 + "n",
}


@pytest.mark.parametrize(
    "malformed", MALFORMED_TIMEOUTS.values(), ids=MALFORMED_TIMEOUTS.keys()
)
async def test_a_malformed_grpc_timeout_is_invalid_argument(malformed: str) -> None:
    status, message = await add_with_timeout(malformed)

    assert status == Status.INVALID_ARGUMENT.value, message
    assert "grpc-timeout header" in message, message


async def test_a_deadline_passing_while_the_request_arrives_is_deadline_exceeded() -> (
    None
):
    deadline_s = 0.3
    async with (
        bare_rpc(request_read_timeout_s=10) as bare,
        raw_client(bare.port) as raw,
    ):
        started = time.monotonic()
        stream = raw.open(ADD, b"\x00\x00", timeout=f"{int(deadline_s * 1000)}m")
        await raw.wait_until(lambda: raw.status(stream) is not None)

    status, message = raw.status(stream) or (None, "")
    answered = (raw.answered_at(stream) or 0) - started
    assert status == Status.DEADLINE_EXCEEDED.value, message
    assert "deadline (grpc-timeout) passed" in message, message
    assert deadline_s - EARLY_S <= answered <= deadline_s + SLACK_S


async def test_a_connection_without_requests_is_closed_with_goaway() -> None:
    async with bare_rpc(**IDLE_LIMITS) as bare, raw_client(bare.port) as raw:
        started = time.monotonic()
        await raw.wait_until(lambda: raw.closed_at is not None)

    goaway = raw.goaway()
    assert goaway is not None
    assert goaway[1].error_code == ErrorCodes.NO_ERROR
    assert IDLE_TIMEOUT_S - EARLY_S <= goaway[0] - started <= IDLE_TIMEOUT_S + SLACK_S


async def hold_silently(raw: RawClient) -> int:
    """A client-streaming request whose client never sends a message."""
    return raw.open(REFLECTION)


async def hold_unwritable(raw: RawClient) -> int:
    """A whole request whose answer cannot be written (its client opened a
    flow-control window of 0 bytes)."""
    return raw.open(CHECK, CHECK_REQUEST, end=True)


HOLDS = {"silent-stream": hold_silently, "window-zero": hold_unwritable}


@pytest.mark.parametrize("hold", HOLDS.values(), ids=HOLDS.keys())
async def test_a_silent_connection_is_closed_though_streams_are_open(
    hold: Callable[[RawClient], Awaitable[int]],
) -> None:
    no_window = {SettingCodes.INITIAL_WINDOW_SIZE: 0}
    async with (
        bare_rpc(**IDLE_LIMITS) as bare,
        raw_client(bare.port, no_window) as raw,
    ):
        held = await hold(raw)
        await raw.wait_until(lambda: raw.closed_at is not None)

    # Held: nothing answered it. Closed: from the client's last bytes on.
    goaway = raw.goaway()
    assert raw.status(held) is None
    assert goaway is not None
    assert goaway[1].error_code == ErrorCodes.NO_ERROR
    silent_s = goaway[0] - (raw.last_sent_at or 0)
    assert IDLE_TIMEOUT_S - EARLY_S <= silent_s <= IDLE_TIMEOUT_S + SLACK_S


async def test_any_frame_from_the_client_keeps_its_connection_open() -> None:
    async with bare_rpc(**IDLE_LIMITS) as bare, raw_client(bare.port) as raw:
        for _ in range(12):  # three idle timeouts long
            raw.ping()
            await asyncio.sleep(IDLE_TIMEOUT_S / 4)
        open_after_pings = raw.closed_at is None
        await raw.wait_until(lambda: raw.closed_at is not None)

    goaway = raw.goaway()
    assert open_after_pings
    assert goaway is not None
    assert goaway[0] - (raw.last_sent_at or 0) >= IDLE_TIMEOUT_S - EARLY_S


def test_the_idle_timeout_must_outlast_an_add() -> None:
    # Else a connection whose add waits for Kafka could be closed under it.
    with pytest.raises(ConfigError, match=r"rpc\.idle_timeout_s must be above"):
        make_config(NO_KAFKA, rpc={"idle_timeout_s": 5, "add_timeout_s": 5})
    assert RpcConfig().idle_timeout_s > RpcConfig().add_timeout_s


async def test_a_client_resetting_streams_in_bulk_is_told_to_calm_down() -> None:
    async with (
        bare_rpc() as bare,
        raw_client(bare.port) as raw,
        Channel("127.0.0.1", bare.port) as channel,
    ):
        health = HealthStub(channel)
        before = await health.Check(HealthCheckRequest(), timeout=5)
        # As many resets as a connection may make: it carries on...
        raw.rapid_reset(MAX_CLIENT_RESETS)
        within = raw.open(CHECK, CHECK_REQUEST, end=True)
        await raw.wait_until(lambda: raw.status(within) is not None)
        open_within_budget = raw.closed_at is None and raw.goaway() is None
        # ... and one more ends it.
        raw.rapid_reset(1)
        await raw.wait_until(lambda: raw.closed_at is not None)
        after = await health.Check(HealthCheckRequest(), timeout=5)

    goaway = raw.goaway()
    assert open_within_budget
    assert raw.status(within) == (Status.OK.value, "")
    assert goaway is not None
    assert goaway[1].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    # Another client's connection was not touched.
    assert before.status == after.status == HealthCheckResponse.SERVING


async def test_calls_whose_requests_arrived_outlive_the_read_timeout() -> None:
    async with (
        bare_rpc(request_read_timeout_s=0.2) as bare,
        Channel("127.0.0.1", bare.port) as channel,
    ):
        watch = HealthStub(channel).Watch.open()
        reflection = ServerReflectionStub(channel).ServerReflectionInfo.open()
        async with watch, reflection:
            # A server stream after a whole request...
            await watch.send_message(HealthCheckRequest(service=SERVICE), end=True)
            first = await watch.recv_message()
            # ... and a client stream, which has no whole request to wait for.
            await reflection.send_message(ServerReflectionRequest(list_services=""))
            listed = await reflection.recv_message()

            # Time beyond the read timeout, which must not end either stream.
            await asyncio.sleep(0.2 * 3)
            bare.health.set(False)
            second = await asyncio.wait_for(watch.recv_message(), SLACK_S)
            await reflection.send_message(ServerReflectionRequest(list_services=""))
            listed_again = await asyncio.wait_for(reflection.recv_message(), SLACK_S)
            await watch.cancel()
            await reflection.end()

    assert first is not None and first.status == HealthCheckResponse.SERVING
    assert second is not None and second.status == HealthCheckResponse.NOT_SERVING
    assert listed is not None and listed_again == listed
