"""Outgoing calls against real gRPC servers on loopback (C04 to C07) and flow control.

Every target is a grpclib server in this process that counts the connections
it accepted and still holds, so the tests see what the dispatcher does on the
wire: how many connections it opens, which it closes, and how its calls end
when the target limits streams, restarts, says GOAWAY or goes silent.
"""

import asyncio
import gc
import itertools
import random
import socket
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from grpclib.const import Status
from grpclib.encoding.proto import ProtoStatusDetailsCodec
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol
from grpclib.server import Server
from h2.settings import SettingCodes

from taskqueue.protobuf.service_pb2 import Task
from taskqueue.server.config import Config, QueueConfig, from_dict
from taskqueue.server.dispatcher import Call, Dispatcher, RawCodec
from taskqueue.server.flow import FlowControl
from taskqueue.server.policy import Failure, Policy, Retry
from tests.support import Received, Target, succeed

HOST = "127.0.0.1"
METHOD = Target.methods[0]
SETTLE_S = 5.0  # how long a closed socket may take to reach the other side
CLOCK_S = 0.001  # between the bucket reading the clock and the test reading it


# -- targets that count their connections ------------------------------------


class _Tracked(H2Protocol):
    """The server side of one connection, reporting to its target."""

    def __init__(self, base: H2Protocol, target: "CountingTarget") -> None:
        super().__init__(base.handler, base.config, base.h2_config)
        self.target = target
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.target.accepted += 1
        self.target.connections.add(self)
        if self.target.max_streams is not None:
            self._limit_streams(self.target.max_streams)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.target.connections.discard(self)

    def _limit_streams(self, count: int) -> None:
        # grpclib has no setting for this. The limit is enforced at once, as
        # by servers that announce it in their first SETTINGS frame: a client
        # that opens more streams before reading it loses the connection.
        h2 = self.connection._connection
        h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: count})
        h2.local_settings.acknowledge()
        self.connection.flush()

    def go_away(self) -> None:
        h2 = self.connection._connection
        h2.close_connection()
        self.connection.flush()


class _CountingServer(Server):
    def __init__(self, target: "CountingTarget") -> None:
        super().__init__(
            [target], codec=RawCodec(), status_details_codec=ProtoStatusDetailsCodec()
        )
        self._target = target

    def _protocol_factory(self) -> H2Protocol:
        return _Tracked(super()._protocol_factory(), self._target)


@dataclass
class CountingTarget(Target):
    """A recording target that also knows its connections."""

    max_streams: int | None = None
    accepted: int = 0
    connections: set[_Tracked] = field(default_factory=set)

    async def start(self, port: int = 0) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, port))
        self.port = listener.getsockname()[1]
        self._server = _CountingServer(self)
        await self._server.start(sock=listener)

    async def crash(self) -> None:
        """Stop as a killed process would: every connection dropped at once."""
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        await self.stop()

    def go_away(self) -> None:
        for connection in list(self.connections):
            connection.go_away()

    def stop_reading(self) -> None:
        """Black-hole the open connections; new ones are still served."""
        for connection in self.connections:
            if connection.transport is not None:
                connection.transport.pause_reading()


class SlowLink:
    """A loopback TCP relay to ``port`` that delays each byte by ``delay_s``.

    On bare loopback a new connection has its server's SETTINGS before the
    first request goes out; a real network makes no such promise.
    """

    def __init__(self, port: int, delay_s: float) -> None:
        self._port = port
        self._delay_s = delay_s
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._relays: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def authority(self) -> str:
        return f"{HOST}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in self._writers:
            writer.transport.abort()
        async with asyncio.timeout(SETTLE_S):
            await asyncio.gather(*self._relays)

    async def _relay(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        relay = asyncio.current_task()
        assert relay is not None
        self._relays.add(relay)
        relay.add_done_callback(self._relays.discard)
        self._writers.append(client_w)
        target_r, target_w = await asyncio.open_connection(HOST, self._port)
        self._writers.append(target_w)
        await asyncio.gather(
            self._carry(client_r, target_w), self._carry(target_r, client_w)
        )

    async def _carry(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        """Forward until end of stream, every chunk ``delay_s`` after it came."""
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._send_later(chunks, sink))
        try:
            while data := await source.read(65536):
                chunks.put_nowait((time.monotonic() + self._delay_s, data))
        except OSError:
            pass  # reset by the other side: pass on the end
        chunks.put_nowait((time.monotonic() + self._delay_s, b""))
        await sender

    @staticmethod
    async def _send_later(
        chunks: "asyncio.Queue[tuple[float, bytes]]", sink: asyncio.StreamWriter
    ) -> None:
        while True:
            due, data = await chunks.get()
            await asyncio.sleep(due - time.monotonic())
            if not data:
                sink.close()
                return
            if not sink.is_closing():
                sink.write(data)


class Gauge:
    """Target behaviour: count the calls running at once, each taking a while."""

    def __init__(self, hold_s: float = 0.0) -> None:
        self.hold_s = hold_s
        self.running = 0
        self.peak = 0

    async def __call__(self, _: Received) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(self.hold_s)
        finally:
            self.running -= 1


class Hold:
    """Target behaviour: every call waits until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, _: Received) -> None:
        await self.release.wait()


Behaviour = Callable[[Received], Awaitable[None]]


async def started(
    behaviour: Behaviour = succeed, max_streams: int | None = None
) -> CountingTarget:
    server = CountingTarget(behaviour, max_streams=max_streams)
    await server.start()
    return server


def call_to(server: Target | SlowLink, deadline_s: float = 10.0) -> Call:
    return Call(server.authority, METHOD, b"\x08\x01", {}, deadline_s)


async def eventually(check: Callable[[], bool], timeout_s: float = SETTLE_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.01)


def retried(failure: Failure | None) -> bool:
    """Whether the default retry policy tries this failure again."""
    assert failure is not None
    policy = Policy.for_task(Task(authority="x:1", method=METHOD), QueueConfig())
    return isinstance(policy.decide(failure, attempt=1, age_s=0.0), Retry)


# -- C04: a cold channel -----------------------------------------------------


@pytest.mark.parametrize("delay_s", [0.0, 0.05], ids=["loopback", "50ms-link"])
async def test_cold_channel_opens_one_connection_for_concurrent_first_calls(
    delay_s: float,
) -> None:
    # grpclib's server allows 100 streams: the 200 calls must share them.
    server = await started(Gauge(hold_s=0.2))
    link = SlowLink(server.port, delay_s)
    await link.start()
    dispatcher = Dispatcher()
    try:
        results = await asyncio.gather(
            *(dispatcher.call(call_to(link)) for _ in range(200))
        )
    finally:
        await dispatcher.close()
        await link.stop()
        await server.crash()

    assert results == [None] * 200
    assert len(server.calls) == 200
    assert server.accepted == 1


# -- C05: many authorities, a small cache ------------------------------------

CACHE = 8
AUTHORITIES = 100
ROUND = 10  # calls in flight at once


def open_connections(servers: list[CountingTarget]) -> int:
    return sum(len(server.connections) for server in servers)


@pytest.mark.filterwarnings("error::ResourceWarning")
async def test_channel_cache_stays_bounded_and_closes_what_it_evicts() -> None:
    # Unclosed channels and transports warn from __del__, where an error
    # filter cannot fail the test: record the warnings instead, and grpclib's
    # reports to the loop's exception handler.
    loop = asyncio.get_running_loop()
    loop_errors: list[str] = []
    loop.set_exception_handler(lambda _, context: loop_errors.append(str(context)))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            await _many_authorities()
            gc.collect()
    finally:
        loop.set_exception_handler(None)

    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
    assert loop_errors == []


async def _many_authorities() -> None:
    peak = 0
    servers: list[CountingTarget] = []

    async def note_peak(_: Received) -> None:
        nonlocal peak
        peak = max(peak, open_connections(servers))

    servers += await asyncio.gather(*(started(note_peak) for _ in range(AUTHORITIES)))
    dispatcher = Dispatcher(cache_size=CACHE)
    order = random.Random(5).choices(servers, k=3 * AUTHORITIES)
    try:
        for start in range(0, len(order), ROUND):
            batch = order[start : start + ROUND]
            results = await asyncio.gather(
                *(dispatcher.call(call_to(s)) for s in batch)
            )
            assert results == [None] * len(batch)
            # Evicted channels are closed: the targets see the disconnects.
            await eventually(lambda: open_connections(servers) <= CACHE)

        assert peak <= CACHE + ROUND
        assert sum(s.accepted for s in servers) > AUTHORITIES  # evicted, reopened
        await dispatcher.close()
        await eventually(lambda: open_connections(servers) == 0)
    finally:
        await dispatcher.close()
        await asyncio.gather(*(server.stop() for server in servers))


async def test_cache_keeps_the_most_recently_used_channels() -> None:
    servers = [await started() for _ in range(5)]
    dispatcher = Dispatcher(cache_size=2)
    try:
        for server in [*servers, servers[3], servers[4], servers[3]]:
            assert await dispatcher.call(call_to(server)) is None

        await eventually(lambda: open_connections(servers) == 2)
        assert [len(s.connections) for s in servers] == [0, 0, 0, 1, 1]
        assert [s.accepted for s in servers] == [1, 1, 1, 1, 1]
    finally:
        await dispatcher.close()
        for server in servers:
            await server.stop()


async def test_a_channel_in_use_is_not_evicted() -> None:
    hold = Hold()
    slow = await started(hold)
    others = [await started() for _ in range(3)]
    dispatcher = Dispatcher(cache_size=1)
    try:
        pending = asyncio.create_task(dispatcher.call(call_to(slow)))
        await slow.wait_calls(1)
        for server in others:
            assert await dispatcher.call(call_to(server)) is None

        hold.release.set()
        assert await pending is None
        assert slow.accepted == 1
    finally:
        await dispatcher.close()
        for server in [slow, *others]:
            await server.stop()


# -- C06: a target that allows few streams -----------------------------------


async def test_stream_limit_queues_calls_without_failures_or_spinning() -> None:
    gauge = Gauge(hold_s=1.0)
    server = await started(gauge, max_streams=5)
    link = SlowLink(server.port, delay_s=0.02)
    await link.start()
    dispatcher = Dispatcher()
    try:
        cpu_before_s = time.process_time()
        results = await asyncio.gather(
            *(dispatcher.call(call_to(link, deadline_s=60)) for _ in range(100))
        )
        cpu_s = time.process_time() - cpu_before_s
    finally:
        await dispatcher.close()
        await link.stop()
        await server.crash()

    assert results == [None] * 100
    assert gauge.peak <= 5
    assert server.accepted == 1
    # About 20 s spent waiting for streams; a busy loop would burn all of it.
    assert cpu_s < 1.0


# -- C07: restarts, GOAWAY, black holes --------------------------------------

IN_FLIGHT = 50


async def test_calls_in_flight_when_the_target_crashes_are_retried() -> None:
    hold = Hold()
    server = await started(hold)
    port = server.port
    dispatcher = Dispatcher()
    try:
        calls = [
            asyncio.create_task(dispatcher.call(call_to(server)))
            for _ in range(IN_FLIGHT)
        ]
        await server.wait_calls(IN_FLIGHT)
        await server.crash()
        hold.release.set()
        failures = await asyncio.gather(*calls)
        while_down = await dispatcher.call(call_to(server))

        await server.start(port)
        after = await dispatcher.call(call_to(server))
    finally:
        await dispatcher.close()
        await server.stop()

    assert all(retried(failure) for failure in failures), failures
    assert while_down is not None and while_down.status == Status.UNAVAILABLE
    assert after is None
    assert server.port == port


async def test_calls_queued_for_a_stream_when_the_target_crashes_are_retried() -> None:
    hold = Hold()
    server = await started(hold, max_streams=5)
    dispatcher = Dispatcher()
    try:
        calls = [
            asyncio.create_task(dispatcher.call(call_to(server, deadline_s=60)))
            for _ in range(20)
        ]
        await server.wait_calls(5)
        await server.crash()
        hold.release.set()
        # The 15 queued for a stream end with the connection, not at their
        # deadline a minute later.
        async with asyncio.timeout(5):
            failures = await asyncio.gather(*calls)

        await server.start(server.port)
        after = await dispatcher.call(call_to(server))
    finally:
        await dispatcher.close()
        await server.stop()

    assert all(retried(failure) for failure in failures), failures
    # Those queued fail as not sent: the connection lost before their call,
    # or no connection to be had while the target is down.
    assert all(f and f.status == Status.UNAVAILABLE for f in failures), failures
    assert after is None


async def test_calls_in_flight_at_goaway_succeed_or_are_retried() -> None:
    hold = Hold()
    server = await started(hold)
    dispatcher = Dispatcher()
    try:
        calls = [
            asyncio.create_task(dispatcher.call(call_to(server)))
            for _ in range(IN_FLIGHT)
        ]
        await server.wait_calls(IN_FLIGHT)
        server.go_away()
        outcomes = await asyncio.gather(*calls)
        hold.release.set()
        after = await dispatcher.call(call_to(server))
    finally:
        await dispatcher.close()
        await server.stop()

    assert all(outcome is None or retried(outcome) for outcome in outcomes), outcomes
    assert after is None
    assert server.accepted == 2


class _Silent(asyncio.Protocol):
    """Accepts a connection and never says anything."""


def assert_deadline_exceeded(
    failure: Failure | None, took_s: float, deadline_s: float
) -> None:
    assert failure is not None and failure.status == Status.DEADLINE_EXCEEDED, failure
    assert retried(failure)
    assert deadline_s - 0.01 <= took_s <= deadline_s + 0.5


async def test_a_black_hole_fails_the_call_at_its_deadline() -> None:
    loop = asyncio.get_running_loop()
    hole = await loop.create_server(_Silent, HOST, 0)
    port = hole.sockets[0].getsockname()[1]
    dispatcher = Dispatcher()
    try:
        began = time.monotonic()
        failure = await dispatcher.call(Call(f"{HOST}:{port}", METHOD, b"", {}, 1.0))
        took_s = time.monotonic() - began
    finally:
        await dispatcher.close()
        hole.close()
        await hole.wait_closed()

    assert_deadline_exceeded(failure, took_s, 1.0)


async def test_a_connection_gone_silent_fails_calls_at_their_deadline() -> None:
    server = await started()
    dispatcher = Dispatcher()
    try:
        assert await dispatcher.call(call_to(server)) is None
        server.stop_reading()

        began = time.monotonic()
        failure = await dispatcher.call(call_to(server, deadline_s=1.0))
        took_s = time.monotonic() - began
    finally:
        await dispatcher.close()
        await server.crash()

    assert_deadline_exceeded(failure, took_s, 1.0)
    assert len(server.calls) == 1


async def test_calls_go_through_again_once_a_silent_connection_is_dropped() -> None:
    server = await started()
    dispatcher = Dispatcher(keepalive_s=0.2)
    outcomes: list[Failure | None] = []
    try:
        assert await dispatcher.call(call_to(server)) is None
        server.stop_reading()

        async with asyncio.timeout(10):
            while not outcomes or outcomes[-1] is not None:
                outcomes.append(await dispatcher.call(call_to(server, deadline_s=1.0)))
    finally:
        await dispatcher.close()
        await server.crash()

    assert all(retried(failure) for failure in outcomes[:-1]), outcomes
    assert server.accepted == 2


# -- flow control ------------------------------------------------------------


class Interrupted(Exception):
    pass


class Waiter:
    """Like a worker's job: sleeps when told, raises once interrupted."""

    def __init__(self) -> None:
        self.interrupted = asyncio.Event()
        self.waits_s: list[float] = []

    async def wait(self, seconds: float) -> None:
        self.waits_s.append(seconds)
        if self.interrupted.is_set():
            raise Interrupted
        try:
            async with asyncio.timeout(seconds):
                await self.interrupted.wait()
        except TimeoutError:
            return
        raise Interrupted


def flow_config(**sections: object) -> Config:
    return from_dict({"worker": {"concurrency": 100}, **sections})


@dataclass
class Attempt:
    began: float  # when flow control let the call through
    noted: float  # just before its outcome was recorded
    failure: Failure | None
    waiter: Waiter


async def call_through(
    flow: FlowControl, dispatcher: Dispatcher, server: Target, waiter: Waiter
) -> Attempt:
    """One call as the worker makes it."""
    async with flow.call(server.authority, waiter) as gate:
        began = time.monotonic()
        failure = await dispatcher.call(call_to(server))
        noted = time.monotonic()
        gate.record(server.authority, failure.status if failure else None)
    return Attempt(began, noted, failure, waiter)


async def test_concurrency_caps_hold_per_authority_and_overall() -> None:
    gauges = [Gauge(hold_s=0.05), Gauge(hold_s=0.05)]
    servers = [await started(gauge) for gauge in gauges]
    flow = FlowControl(
        flow_config(
            worker={"concurrency": 4, "max_pending": 4},
            authority_limits=[{"authority": servers[0].authority, "concurrency": 2}],
        )
    )
    running = peak = 0
    dispatcher = Dispatcher()

    async def counted(server: Target) -> None:
        nonlocal running, peak
        async with flow.call(server.authority, Waiter()):
            running += 1
            peak = max(peak, running)
            assert await dispatcher.call(call_to(server)) is None
            running -= 1

    try:
        await asyncio.gather(*(counted(s) for s in servers for _ in range(20)))
    finally:
        await dispatcher.close()
        for server in servers:
            await server.stop()

    assert gauges[0].peak == 2
    assert gauges[1].peak <= 4
    assert peak == 4
    assert [len(s.calls) for s in servers] == [20, 20]


async def test_rate_limit_spaces_calls_even_when_call_slots_are_scarce() -> None:
    rate_per_s, burst = 20.0, 2
    busy, server = await started(Gauge(hold_s=0.3)), await started()
    flow = FlowControl(
        flow_config(
            worker={"concurrency": 2, "max_pending": 2},
            authority_limits=[
                {
                    "authority": server.authority,
                    "rate_per_s": rate_per_s,
                    "burst": burst,
                }
            ],
        )
    )
    dispatcher = Dispatcher()
    try:
        # Both call slots taken first, so the limited calls queue up behind them.
        hogs = [call_through(flow, dispatcher, busy, Waiter()) for _ in range(2)]
        limited = [call_through(flow, dispatcher, server, Waiter()) for _ in range(12)]
        outcomes = await asyncio.gather(*hogs, *limited)
    finally:
        await dispatcher.close()
        await busy.stop()
        await server.stop()

    assert [attempt.failure for attempt in outcomes] == [None] * 14
    began = sorted(attempt.began for attempt in outcomes[2:])
    # The bucket never lets more through in a window than it holds plus refills.
    for first in range(len(began)):
        for last in range(first, len(began)):
            window_s = began[last] - began[first]
            assert last - first + 1 <= burst + rate_per_s * (window_s + CLOCK_S)


OVERLOAD = {"threshold": 3, "backoff_s": 0.3, "max_backoff_s": 0.6}


class Switch:
    """Target behaviour: answer with ``status``, or succeed when it is None."""

    def __init__(self, status: Status | None = None) -> None:
        self.status = status

    async def __call__(self, _: Received) -> None:
        if self.status is not None:
            raise GRPCError(self.status, "switched")


async def test_overload_answers_back_off_the_authority_until_a_success() -> None:
    unavailable = Status.UNAVAILABLE
    answers = [unavailable] * 4 + [None] * 2 + [unavailable] * 3 + [None]
    switch = Switch()
    server = await started(switch)
    flow = FlowControl(flow_config(overload=OVERLOAD))
    dispatcher = Dispatcher()
    attempts: list[Attempt] = []
    try:
        for status in answers:
            switch.status = status
            attempts.append(await call_through(flow, dispatcher, server, Waiter()))
    finally:
        await dispatcher.close()
        await server.stop()

    assert [a.failure.status if a.failure else None for a in attempts] == answers
    paused = [bool(a.waiter.waits_s) for a in attempts]
    assert paused == [False] * 3 + [True, True] + [False] * 4 + [True]
    pauses_s = [b.began - a.noted for a, b in itertools.pairwise(attempts)]
    # Never early: after the 3rd overload answer, after a 4th (doubled), and
    # after the 3rd of a new run (reset by the successes in between).
    assert pauses_s[2] >= 0.3
    assert pauses_s[3] >= 0.6
    assert pauses_s[8] >= 0.3
    assert attempts[4].waiter.waits_s[0] > 0.3 >= attempts[9].waiter.waits_s[0]


async def test_waiting_out_a_backoff_or_a_rate_limit_is_interruptible() -> None:
    down, limited, other = [
        await started(Switch(Status.UNAVAILABLE)),
        await started(),
        await started(),
    ]
    flow = FlowControl(
        flow_config(
            worker={"concurrency": 1, "max_pending": 1},
            overload={"threshold": 1, "backoff_s": 60, "max_backoff_s": 60},
            authority_limits=[
                {"authority": limited.authority, "rate_per_s": 0.01, "burst": 1}
            ],
        )
    )
    dispatcher = Dispatcher()
    try:
        await call_through(flow, dispatcher, down, Waiter())  # now backed off
        await call_through(flow, dispatcher, limited, Waiter())  # took the token
        for server in (down, limited):
            waiter = Waiter()
            waiting = asyncio.create_task(
                call_through(flow, dispatcher, server, waiter)
            )
            await eventually(lambda: bool(waiter.waits_s))  # noqa: B023
            waiter.interrupted.set()
            with pytest.raises(Interrupted):
                await waiting

        # Nothing held on: the only call slot is free for another authority.
        async with asyncio.timeout(SETTLE_S):
            attempt = await call_through(flow, dispatcher, other, Waiter())
    finally:
        await dispatcher.close()
        for server in (down, limited, other):
            await server.stop()

    assert attempt.failure is None
    assert [len(s.calls) for s in (down, limited, other)] == [1, 1, 1]


async def test_a_rate_limited_authority_holds_no_call_slot_while_it_waits() -> None:
    limited, other = await started(), await started()
    flow = FlowControl(
        flow_config(
            worker={"concurrency": 2, "max_pending": 2},
            authority_limits=[
                {"authority": limited.authority, "rate_per_s": 0.01, "burst": 1}
            ],
        )
    )
    dispatcher = Dispatcher()
    waiters = [Waiter() for _ in range(2)]
    waiting = []
    try:
        await call_through(flow, dispatcher, limited, Waiter())  # took the token
        waiting = [
            asyncio.create_task(call_through(flow, dispatcher, limited, waiter))
            for waiter in waiters
        ]
        await eventually(lambda: bool(waiters[0].waits_s))

        async with asyncio.timeout(SETTLE_S):  # not the 100 s to the next token
            attempt = await call_through(flow, dispatcher, other, Waiter())
    finally:
        for waiter in waiters:
            waiter.interrupted.set()
        await asyncio.gather(*waiting, return_exceptions=True)
        await dispatcher.close()
        for server in (limited, other):
            await server.stop()

    assert attempt.failure is None


async def test_a_method_the_target_lacks_is_unimplemented_not_unknown() -> None:
    """grpclib answers an unknown method without a content-type; the status
    is still UNIMPLEMENTED, which dead-letters at once."""
    server = Target()
    await server.start()
    dispatcher = Dispatcher()
    try:
        failure = await dispatcher.call(
            Call(
                authority=server.authority,
                method="/coffeemachine.CoffeeMachine/make_espresso",
                body=b"",
                metadata={},
                deadline_s=5,
            )
        )
    finally:
        await dispatcher.close()
        await server.stop()

    assert failure is not None
    assert failure.status is Status.UNIMPLEMENTED
    assert failure.message == "Method not found"
    assert server.calls == []


async def test_after_a_back_off_one_call_probes_while_the_others_wait() -> None:
    """Half-open: when the back-off ends, one call goes first; the others
    follow only once it succeeded, instead of all failing at once."""
    switch = Switch(Status.UNAVAILABLE)
    server = await started(switch)
    flow = FlowControl(flow_config(overload=OVERLOAD))
    dispatcher = Dispatcher()
    try:
        for _ in range(3):  # now backed off for 0.3 s
            await call_through(flow, dispatcher, server, Waiter())
        switch.status = None  # the authority is back
        attempts = await asyncio.gather(
            *(call_through(flow, dispatcher, server, Waiter()) for _ in range(5))
        )
    finally:
        await dispatcher.close()
        await server.stop()

    assert all(a.failure is None for a in attempts)
    first = min(attempts, key=lambda a: a.began)
    followers = [a for a in attempts if a is not first]
    assert all(a.began >= first.noted for a in followers)
