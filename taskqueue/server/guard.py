"""Limits that keep slow and abusive clients from tying up the rpc server.

grpclib serves HTTP/2 through h2 and leaves these to its user:

- Concurrent streams. h2 advertises 100 and, when a client opens one more,
  ends the whole connection with every request on it; RFC 9113 §5.1.2 wants
  only that stream refused. The server advertises
  ``rpc.max_concurrent_streams`` and answers each stream beyond it with
  RST_STREAM REFUSED_STREAM, which tells the client it may safely retry.
- Stalled requests. A unary request that its caller does not finish sending
  within ``rpc.request_read_timeout_s`` is answered DEADLINE_EXCEEDED, and
  what it had sent is released with its stream.
- Idle connections. One with no request under way for ``rpc.idle_timeout_s``
  (none ever, or none since the last one ended) is closed with GOAWAY, so
  that silent sockets cannot pile up.
- The caller's deadline. grpclib answers UNKNOWN to a request whose
  ``grpc-timeout`` is spent when its handler starts (``1n``, ``0n``), so the
  deadline is taken from the headers before grpclib reads them and enforced
  here, as DEADLINE_EXCEEDED with a message that says so.

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
from taskqueue.server.errors import DeadlineExceeded, RequestTimedOut

log = logging.getLogger(__name__)

Headers = list[tuple[str, str]]
Deadlines = weakref.WeakKeyDictionary[RawStream, Deadline]
FrameResult = tuple[list[Frame], list[Event]]
TIMEOUT_HEADER = "grpc-timeout"


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
            # grpclib's Stream hands its h2 stream over only as ``_stream``.
            deadline = self._deadlines.pop(stream._stream, None)
            stream.deadline = deadline
            try:
                await _TimeLimits(stream, deadline, read_timeout_s).run(handle)
            except (DeadlineExceeded, RequestTimedOut) as exc:
                log.info("request refused: %s %s: %s", method, exc.status.name, exc)
                raise GRPCError(exc.status, str(exc)) from None

        event.method_func = guarded


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

    It takes each request's deadline out of its headers (for ``GuardedServer``
    to enforce) and notes when the connection last started or ended one.
    """

    def __init__(self, inner: AbstractHandler, deadlines: Deadlines) -> None:
        self._inner = inner
        self._deadlines = deadlines
        self.last_active_s = time.monotonic()

    def accept(
        self,
        stream: RawStream,
        headers: Headers,
        release_stream: Callable[[], None],
    ) -> None:
        self.last_active_s = time.monotonic()
        headers = self._take_deadline(stream, headers)

        def release() -> None:
            self.last_active_s = time.monotonic()
            release_stream()

        self._inner.accept(stream, headers, release)

    def cancel(self, stream: RawStream) -> None:
        self._inner.cancel(stream)

    def close(self) -> None:
        self._inner.close()

    def _take_deadline(self, stream: RawStream, headers: Headers) -> Headers:
        try:
            deadline = Deadline.from_headers(headers)
        except ValueError:
            return headers  # malformed: grpclib answers that one itself
        if deadline is None:
            return headers
        self._deadlines[stream] = deadline
        return [(name, value) for name, value in headers if name != TIMEOUT_HEADER]


class _Connection(H2Protocol):
    """One client's connection: its stream limit and its idle timer."""

    def __init__(
        self,
        requests: _Requests,
        config: Configuration,
        h2_config: H2Configuration,
        rpc: RpcConfig,
    ) -> None:
        super().__init__(requests, config, h2_config)
        self._requests = requests
        self._rpc = rpc
        self._idle_timer: asyncio.TimerHandle | None = None
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)

        # grpclib keeps its h2 connection private; its own SETTINGS went out
        # already, so the limit follows in one more (it applies once acked).
        h2 = self.connection._connection
        limit = self._rpc.max_concurrent_streams
        h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: limit})
        _refuse_excess_streams(h2)
        self.connection.flush()
        self._check_idle_in(self._rpc.idle_timeout_s)

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
        h2 = self.connection._connection
        timeout_s = self._rpc.idle_timeout_s
        idle_s = time.monotonic() - self._requests.last_active_s
        if h2.open_inbound_streams:
            self._check_idle_in(timeout_s)
        elif idle_s < timeout_s:
            self._check_idle_in(timeout_s - idle_s)
        else:
            log.debug("closing a connection idle for %.1fs", idle_s)
            # GOAWAY first: the client learns that none of its requests was lost.
            h2.close_connection()
            self.connection.flush()
            self.connection.close()


def _refuse_excess_streams(h2: H2Connection) -> None:
    """Make a stream beyond the limit a stream error, as RFC 9113 §5.1.2 says.

    h2 4 raises TooManyStreamsError, a connection error, from its private
    handler of HEADERS frames; this wraps that handler in the connection's
    private table of frame handlers.
    """
    receive_headers = h2._frame_dispatch_table[HeadersFrame]

    def receive(frame: HeadersFrame) -> FrameResult:
        try:
            result: FrameResult = receive_headers(frame)
        except TooManyStreamsError:
            return _refuse(h2, frame)
        return result

    h2._frame_dispatch_table[HeadersFrame] = receive


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
