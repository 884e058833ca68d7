"""Limits that keep slow and abusive clients from tying up the rpc server.

grpclib serves HTTP/2 through h2 and leaves these to its user:

- Concurrent streams. h2 advertises 100 and, when a client opens one more,
  ends the whole connection with every request on it; RFC 9113 §5.1.2 wants
  only that stream refused. The server advertises
  ``rpc.max_concurrent_streams`` and answers each stream beyond it with
  RST_STREAM REFUSED_STREAM, which tells the client it may safely retry. h2
  applies an advertised limit only once the client acknowledged it, so the
  limit is also counted here, for clients that never do.
- Stalled requests. A unary request that its caller does not finish sending
  within ``rpc.request_read_timeout_s`` is answered DEADLINE_EXCEEDED, and
  what it had sent is released with its stream.
- Silent connections. One from which nothing at all (not even a PING) has
  arrived for ``rpc.idle_timeout_s`` is closed with GOAWAY, whether or not
  it has streams open: a stream whose client never sends, or never lets the
  answer be written (a flow-control window of 0), cannot hold its socket
  forever. ``rpc.idle_timeout_s`` is above ``rpc.add_timeout_s``, so an
  ``add`` waiting for Kafka is answered first.
- Rapid reset (CVE-2023-44487). A client that opens and resets streams in a
  loop makes grpclib keep state for each until the connection ends; one that
  resets more than ``MAX_CLIENT_RESETS`` streams within ``RESET_WINDOW_S``
  gets GOAWAY ENHANCE_YOUR_CALM and its connection is closed.
- The caller's deadline. grpclib answers UNKNOWN to a request whose
  ``grpc-timeout`` is spent when its handler starts (``1n``, ``0n``), and to
  one whose ``grpc-timeout`` is malformed. So the header is taken out before
  grpclib reads it: a spent deadline is answered DEADLINE_EXCEEDED, a
  malformed one INVALID_ARGUMENT, each with a message that says so.

These reach below the public APIs of grpclib 0.4 and h2 4; each such place
says so, and tests/test_security_slow_clients.py pins them.
"""

import asyncio
import logging
import time
import weakref
from collections.abc import Callable, Collection
from typing import Any

from grpclib._typing import IServable, IServerMethodFunc
from grpclib.config import Configuration
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.metadata import Deadline
from grpclib.protocol import AbstractHandler, H2Protocol
from grpclib.protocol import Stream as RawStream
from grpclib.server import Server, Stream
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import Event
from h2.exceptions import ProtocolError, StreamIDTooLowError, TooManyStreamsError
from h2.settings import SettingCodes
from h2.stream import StreamClosedBy
from hpack.exceptions import HPACKError
from hyperframe.frame import Frame, HeadersFrame, RstStreamFrame

from taskqueue.server.config import RpcConfig
from taskqueue.server.errors import (
    DeadlineExceeded,
    InvalidTimeout,
    RequestTimedOut,
    ResetFlood,
)

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "grpc-timeout"
# A client cancelling its calls resets their streams: 20 a second, sustained
# on one connection, is far more than that needs, while a rapid-reset attack
# sends thousands. A client whose calls time out in bulk could still reach
# it; it loses that connection as on any network error and opens another.
MAX_CLIENT_RESETS = 200
RESET_WINDOW_S = 10.0


Headers = list[tuple[str, str]]
Deadlines = weakref.WeakKeyDictionary[RawStream, Deadline | InvalidTimeout]
FrameResult = tuple[list[Frame], list[Event]]


class GuardedServer(Server):
    """grpclib's ``Server`` with the limits of ``rpc`` (see the module doc)."""

    def __init__(self, handlers: Collection[IServable], rpc: RpcConfig) -> None:
        super().__init__(handlers)
        self._rpc = rpc
        # Their callers stream requests: there is no one request to wait for.
        self._streamed_in = {
            path
            for handler in handlers
            for path, method in handler.__mapping__().items()
            if method.cardinality.client_streaming
        }
        self._deadlines: Deadlines = weakref.WeakKeyDictionary()
        listen(self, RecvRequest, self._guard)

    def _protocol_factory(self) -> H2Protocol:
        # grpclib builds each connection's protocol in this private method;
        # what it built is wrapped, not rebuilt, so its bookkeeping stays.
        made = super()._protocol_factory()
        requests = _Requests(made.handler, self._deadlines)
        return _Connection(requests, made.config, made.h2_config, self._rpc)

    async def _guard(self, event: RecvRequest) -> None:
        """Run the request's handler within its time limits."""
        method, handle = event.method_name, event.method_func
        read_timeout_s = None
        if method not in self._streamed_in:
            read_timeout_s = self._rpc.request_read_timeout_s

        async def guarded(stream: "Stream[Any, Any]") -> None:
            try:
                deadline = self._deadline_of(stream)
                stream.deadline = deadline
                await _TimeLimits(stream, deadline, read_timeout_s).run(handle)
            except (DeadlineExceeded, RequestTimedOut, InvalidTimeout) as exc:
                log.info("request refused: %s %s: %s", method, exc.status.name, exc)
                raise GRPCError(exc.status, str(exc)) from None

        event.method_func = guarded

    def _deadline_of(self, stream: "Stream[Any, Any]") -> Deadline | None:
        # grpclib's Stream hands its h2 stream over only as ``_stream``.
        deadline = self._deadlines.pop(stream._stream, None)
        if isinstance(deadline, InvalidTimeout):
            raise deadline
        return deadline


class _TimeLimits:
    """How long one call may take: until its caller's deadline and, while its
    request has not arrived in full, ``read_timeout_s``."""

    def __init__(
        self,
        stream: "Stream[Any, Any]",
        deadline: Deadline | None,
        read_timeout_s: float | None,
    ) -> None:
        self._stream = stream
        self._deadline = deadline
        self._read_timeout_s = read_timeout_s
        self._stalled = False

    async def run(self, handle: IServerMethodFunc) -> None:
        deadline = self._deadline
        if deadline is not None and not deadline.time_remaining():
            # Not even started: a task written now would be answered too late.
            raise DeadlineExceeded(
                "the call's deadline (grpc-timeout) had passed when it arrived"
            )
        loop = asyncio.get_running_loop()
        until = None if deadline is None else loop.time() + deadline.time_remaining()
        try:
            async with asyncio.timeout_at(until) as window:
                await self._run_watched(handle, window)
        except TimeoutError:
            if not window.expired():
                raise  # the handler's own, not a limit of ours
            raise self._overrun() from None

    async def _run_watched(
        self, handle: IServerMethodFunc, window: asyncio.Timeout
    ) -> None:
        timer = None
        if self._read_timeout_s is not None:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(self._read_timeout_s, self._cut_if_stalled, window)
        try:
            await handle(self._stream)
        finally:
            if timer is not None:
                timer.cancel()

    def _cut_if_stalled(self, window: asyncio.Timeout) -> None:
        if window.expired() or _request_ended(self._stream):
            return
        self._stalled = True
        window.reschedule(asyncio.get_running_loop().time())

    def _overrun(self) -> DeadlineExceeded | RequestTimedOut:
        if self._stalled:
            return RequestTimedOut(
                f"the request did not arrive in full within {self._read_timeout_s}s "
                "(rpc.request_read_timeout_s)"
            )
        return DeadlineExceeded(
            "the call's deadline (grpc-timeout) passed before it was answered"
        )


def _request_ended(stream: "Stream[Any, Any]") -> bool:
    # grpclib 0.4 records the caller's END_STREAM only on the private buffer
    # of its h2 stream.
    return bool(stream._stream.buffer._eof)


class _Requests(AbstractHandler):
    """grpclib's request handler of one connection, seen from that connection.

    It takes each request's deadline out of its headers, for ``GuardedServer``
    to enforce.
    """

    def __init__(self, inner: AbstractHandler, deadlines: Deadlines) -> None:
        self._inner = inner
        self._deadlines = deadlines

    def accept(
        self,
        stream: RawStream,
        headers: Headers,
        release_stream: Callable[[], None],
    ) -> None:
        headers = self._take_deadline(stream, headers)
        self._inner.accept(stream, headers, release_stream)

    def cancel(self, stream: RawStream) -> None:
        self._inner.cancel(stream)

    def close(self) -> None:
        self._inner.close()

    def _take_deadline(self, stream: RawStream, headers: Headers) -> Headers:
        try:
            deadline = Deadline.from_headers(headers)
        except (ValueError, OverflowError):
            # Overflow: hundreds of digits, more than a float holds.
            self._deadlines[stream] = InvalidTimeout(
                f"Invalid {TIMEOUT_HEADER} header: expected an integer and a "
                "unit (H, M, S, m, u or n), like 500m"
            )
        else:
            if deadline is None:
                return headers
            self._deadlines[stream] = deadline
        return [(name, value) for name, value in headers if name != TIMEOUT_HEADER]


class _Connection(H2Protocol):
    """One client's connection: its stream limit, its budget of stream resets
    and its idle timer."""

    def __init__(
        self,
        requests: _Requests,
        config: Configuration,
        h2_config: H2Configuration,
        rpc: RpcConfig,
    ) -> None:
        super().__init__(requests, config, h2_config)
        self._rpc = rpc
        self._idle_timer: asyncio.TimerHandle | None = None
        self._lost = False
        self._last_received_s = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)

        # grpclib keeps its h2 connection private; its own SETTINGS went out
        # already, so the limit follows in one more (it applies once acked).
        h2 = self.connection._connection
        limit = self._rpc.max_concurrent_streams
        h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: limit})
        _refuse_excess_streams(h2, limit)
        _limit_client_resets(h2, _ResetBudget())
        self.connection.flush()
        self._check_idle_in(self._rpc.idle_timeout_s)

    def data_received(self, data: bytes) -> None:
        self._last_received_s = time.monotonic()
        try:
            super().data_received(data)
        except ResetFlood as exc:
            peer = self.connection.get_peer().addr()
            log.info("closing the connection of %s: %s", peer, exc)
            self._go_away(ErrorCodes.ENHANCE_YOUR_CALM)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        super().connection_lost(exc)

    def _check_idle_in(self, delay_s: float) -> None:
        if not self._lost:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(delay_s, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self.connection.is_closing():
            return
        timeout_s = self._rpc.idle_timeout_s
        idle_s = time.monotonic() - self._last_received_s
        if idle_s < timeout_s:
            self._check_idle_in(timeout_s - idle_s)
        else:
            log.debug("closing a connection silent for %.1fs", idle_s)
            self._go_away(ErrorCodes.NO_ERROR)

    def _go_away(self, error_code: ErrorCodes) -> None:
        # GOAWAY first: it tells the client which of its requests were seen.
        self.connection._connection.close_connection(error_code)
        self.connection.flush()
        self.connection.close()


class _ResetBudget:
    """How many more streams a client may reset in the current window."""

    def __init__(self) -> None:
        self._window_ends_s = 0.0
        self._left = 0

    def spend(self) -> None:
        """Count one reset; raise ResetFlood beyond the budget."""
        now_s = time.monotonic()
        if now_s >= self._window_ends_s:
            self._window_ends_s = now_s + RESET_WINDOW_S
            self._left = MAX_CLIENT_RESETS
        if not self._left:
            raise ResetFlood(
                f"it reset more than {MAX_CLIENT_RESETS} streams within "
                f"{RESET_WINDOW_S:g}s"
            )
        self._left -= 1


def _refuse_excess_streams(h2: H2Connection, limit: int) -> None:
    """Make a stream beyond ``limit`` a stream error, as RFC 9113 §5.1.2 says.

    h2 4 raises TooManyStreamsError, a connection error, from its private
    handler of HEADERS frames; this wraps that handler in the connection's
    private table of frame handlers. h2 counts against the limit the client
    acknowledged (100 until it does), so until then the wrapper counts too.
    """
    receive_headers = h2._frame_dispatch_table[HeadersFrame]

    def receive(frame: HeadersFrame) -> FrameResult:
        if (
            h2.local_settings.max_concurrent_streams != limit
            and frame.stream_id not in h2.streams
            and h2.open_inbound_streams >= limit
        ):
            return _refuse(h2, frame)
        try:
            result: FrameResult = receive_headers(frame)
        except TooManyStreamsError:
            return _refuse(h2, frame)
        return result

    h2._frame_dispatch_table[HeadersFrame] = receive


def _limit_client_resets(h2: H2Connection, budget: _ResetBudget) -> None:
    """Count the streams the client resets against ``budget``.

    Wraps h2 4's private handler of RST_STREAM frames, in the same private
    table as ``_refuse_excess_streams``. ResetFlood leaves h2 halfway through
    the bytes it was given, which is fine: the connection is closed for it.
    """
    receive_reset = h2._frame_dispatch_table[RstStreamFrame]

    def receive(frame: RstStreamFrame) -> FrameResult:
        budget.spend()
        result: FrameResult = receive_reset(frame)
        return result

    h2._frame_dispatch_table[RstStreamFrame] = receive


def _refuse(h2: H2Connection, frame: HeadersFrame) -> FrameResult:
    """RST_STREAM REFUSED_STREAM for a new stream, leaving h2 as if it had
    opened the stream and reset it."""
    try:
        # The HPACK table is shared by the whole connection: a header block
        # left undecoded would garble every later one.
        h2.decoder.decode(frame.data, raw=True)
    except HPACKError as exc:
        raise ProtocolError(f"cannot decode a header block: {exc}") from exc
    if frame.stream_id <= h2.highest_inbound_stream_id:
        # Not a new stream: h2 applies its own rules for reused stream ids.
        raise StreamIDTooLowError(frame.stream_id, h2.highest_inbound_stream_id)
    if frame.stream_id % 2 == 0:
        raise ProtocolError("a client may not open an even-numbered stream")

    log.debug("refused stream %d: too many streams open", frame.stream_id)
    h2.highest_inbound_stream_id = frame.stream_id
    # Later frames on it (its DATA, say) are then answered as on any stream
    # reset by us, their bytes returned to the connection's flow window.
    h2._closed_streams[frame.stream_id] = StreamClosedBy.SEND_RST_STREAM
    refusal = RstStreamFrame(frame.stream_id)
    refusal.error_code = ErrorCodes.REFUSED_STREAM
    return [refusal], []
