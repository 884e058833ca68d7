"""Outgoing calls: make a task's gRPC call and say how it went.

The argument's bytes are sent as they are, so taskqueue needs none of the
target's proto modules. One channel (one HTTP/2 connection) per authority, kept
in a bounded cache; the least recently used idle channel is closed beyond it.

Every call is checked against the allowlist (authority and method) first, and
every connection a channel makes goes only to addresses the allowlist checked
right then: the host is resolved with the event loop's getaddrinfo, a name
with any forbidden address is refused, and the socket is opened to the checked
address itself, so that a name answering differently a moment later (DNS
rebinding) cannot redirect it. Requests still carry the authority's name as
``:authority``, and TLS verifies the certificate against that name (or the
configured ``server_name``), not against the address.
"""

import asyncio
import contextlib
import logging
import ssl
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.rpc.error_details_pb2 import RetryInfo
from grpclib.client import Channel, Stream
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import CodecBase
from grpclib.encoding.proto import ProtoStatusDetailsCodec
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.metadata import decode_grpc_message
from grpclib.protocol import H2Protocol
from h2.events import RemoteSettingsChanged
from h2.exceptions import ProtocolError as H2ProtocolError

from taskqueue.server.allowlist import Allowlist, Resolver, parse
from taskqueue.server.config import Config
from taskqueue.server.errors import AuthorityNotAllowed
from taskqueue.server.policy import Failure
from taskqueue.server.tls import OutgoingTls, Tls

log = logging.getLogger(__name__)

# grpclib's words when an answer has no content-type; see _trailers_only_status.
MISSING_CONTENT_TYPE = "Missing content-type header"
STATUS_CODES = frozenset(status.value for status in Status)

MAX_FAILURE_MESSAGE = 1024
# A connection with calls open is pinged this often, and dropped when a ping
# goes unanswered (for this long at most): else a connection that went
# silent (a black hole) would take every later call to its authority until
# the operating system gives up on it. Servers refuse pings more frequent
# than every 5 minutes by default (gRPC keepalive enforcement).
KEEPALIVE_S = 300.0
KEEPALIVE_TIMEOUT_S = 20.0


class RawCodec(CodecBase):
    """Passes message bytes through untouched."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> bytes:
        return data


@dataclass(frozen=True, slots=True)
class Call:
    authority: str
    method: str
    body: bytes
    metadata: Mapping[str, str]
    deadline_s: float


class _Entry:
    __slots__ = ("channel", "users")

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.users = 0


class _SettledProtocol(H2Protocol):
    """A connection that knows when the server's first SETTINGS frame came.

    Until then the server's stream limit is unknown: requests sent meanwhile
    can exceed it, and a server that enforces it from the start drops the
    connection with every call on it (a cold channel given many calls at once).
    """

    def __init__(self, base: H2Protocol) -> None:
        super().__init__(base.handler, base.config, base.h2_config)
        self.settled = asyncio.Event()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # grpclib has no hook for received settings; wrap its handler of them.
        handle = self.processor.process_remote_settings_changed

        def settings_changed(event: RemoteSettingsChanged) -> None:
            handle(event)
            self.settled.set()

        self.processor.processors[RemoteSettingsChanged] = settings_changed

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.lost = True
        self.settled.set()
        self._fail_stream_waiters()

    def _fail_stream_waiters(self) -> None:
        """End the calls queued for a stream slot now, not at their deadline.

        grpclib wakes them only when a stream closes, which never happens on a
        lost connection. With the h2 state closed and its streams forgotten
        (grpclib has ended their calls already), their next attempt to open a
        stream raises h2's ProtocolError: an UNAVAILABLE failure, retried like
        any call the connection took down. (grpclib 0.4 and h2 4 internals:
        the waiters' events, the h2 connection and its streams;
        tests/test_dispatcher.py C07 fails should they change.)
        """
        connection = self.connection
        h2 = connection._connection
        with contextlib.suppress(H2ProtocolError):
            h2.close_connection()
        h2.streams.clear()
        connection.write_ready.set()
        connection.stream_close_waiter.set()


class _GuardedChannel(Channel):
    """A channel that connects only to addresses checked at connection time.

    grpclib has no hook for this, so the subclass replaces its private
    ``_create_connection`` (grpclib 0.4); tests/test_security_outgoing.py
    fails should a grpclib release change it.
    """

    def __init__(
        self,
        authority: str,
        guard: Allowlist,
        tls: Tls | None,
        resolver: Resolver | None,
        codecs: tuple[CodecBase, ProtoStatusDetailsCodec],
        *,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        target = parse(authority)
        host = target.host.removeprefix("[").removesuffix("]")
        super().__init__(
            host,
            target.port,
            codec=codecs[0],
            status_details_codec=codecs[1],
            ssl=tls.context if tls else None,
            config=Configuration(
                _keepalive_time=keepalive_s,
                _keepalive_timeout=min(keepalive_s, KEEPALIVE_TIMEOUT_S),
                _http2_min_sent_ping_interval_without_data=keepalive_s,
            ),
        )
        self._checked_authority = authority
        self._checked_port = target.port
        self._guard = guard
        self._resolver = resolver
        self._tls_context: ssl.SSLContext | None = tls.context if tls else None
        self._server_name = (tls.server_name or host) if tls else None

    def _protocol_factory(self) -> H2Protocol:
        return _SettledProtocol(super()._protocol_factory())

    async def __connect__(self) -> H2Protocol:
        """The connection, once the server's settings have come."""
        protocol = await super().__connect__()
        if isinstance(protocol, _SettledProtocol):
            await protocol.settled.wait()  # the call's deadline bounds this
            if protocol.lost:
                raise ConnectionResetError(
                    f"{self._checked_authority} closed the connection at once"
                )
        return protocol

    async def _create_connection(self) -> H2Protocol:
        loop = asyncio.get_running_loop()
        addresses = await self._guard.resolve(
            self._checked_authority, self._resolver or loop.getaddrinfo
        )
        error = OSError(f"no address of {self._checked_authority} answered")
        # In order, as create_connection would, but only to checked addresses.
        for address in addresses:
            try:
                _, protocol = await loop.create_connection(
                    self._protocol_factory,
                    address,
                    self._checked_port,
                    ssl=self._tls_context,
                    server_hostname=self._server_name,
                )
            except OSError as exc:
                error = exc
            else:
                return protocol
        raise error


class Dispatcher:
    def __init__(
        self,
        cache_size: int = 64,
        *,
        allowlist: Allowlist | None = None,
        tls: OutgoingTls | None = None,
        resolver: Resolver | None = None,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        """``allowlist`` None: no allowlist check, but forbidden addresses
        (link-local, cloud metadata) are still never connected to.
        ``resolver``: a stand-in for the event loop's getaddrinfo.
        ``keepalive_s``: see KEEPALIVE_S."""
        self._cache_size = cache_size
        self._keepalive_s = keepalive_s
        self._channels: OrderedDict[str, _Entry] = OrderedDict()
        self._codecs = (RawCodec(), ProtoStatusDetailsCodec())
        self._allowlist = allowlist
        self._guard = allowlist or Allowlist([])
        self._tls = tls or OutgoingTls([])
        self._resolver = resolver

    @classmethod
    def from_config(cls, config: Config) -> "Dispatcher":
        return cls(
            config.worker.channel_cache_size,
            allowlist=Allowlist(config.allow),
            tls=OutgoingTls(config.security.outgoing_tls),
        )

    async def call(self, call: Call) -> Failure | None:
        """Make the call; None when it succeeded, else how it failed."""
        try:
            if self._allowlist is not None:
                self._allowlist.check(call.authority, call.method)
            entry = self._checkout(call.authority)
        except AuthorityNotAllowed as exc:
            return Failure(Status.PERMISSION_DENIED, _text(exc))
        try:
            await _unary(entry.channel, call)
        except Exception as exc:
            return _failure_of(exc, call)
        finally:
            entry.users -= 1
            self._evict()
        return None

    async def close(self) -> None:
        for entry in self._channels.values():
            entry.channel.close()
        self._channels.clear()

    def _checkout(self, authority: str) -> _Entry:
        entry = self._channels.get(authority)
        if entry is None:
            channel = _GuardedChannel(
                authority,
                self._guard,
                self._tls.for_authority(authority),
                self._resolver,
                self._codecs,
                keepalive_s=self._keepalive_s,
            )
            entry = self._channels[authority] = _Entry(channel)
        self._channels.move_to_end(authority)
        entry.users += 1
        return entry

    def _evict(self) -> None:
        """Close idle channels beyond the cache size, oldest first."""
        excess = len(self._channels) - self._cache_size
        for authority, entry in list(self._channels.items()):
            if excess <= 0:
                break
            if entry.users == 0:
                entry.channel.close()
                del self._channels[authority]
                excess -= 1
                log.debug("closed idle channel to %s", authority)


def _failure_of(exc: Exception, call: Call) -> Failure:
    """How a call that raised ``exc`` failed, as a gRPC status."""
    if isinstance(exc, AuthorityNotAllowed):  # the connection's address check
        return Failure(Status.PERMISSION_DENIED, _text(exc))
    if isinstance(exc, GRPCError):
        return _from_grpc_error(exc)
    if isinstance(exc, TimeoutError):
        return Failure(Status.DEADLINE_EXCEEDED, f"no reply in {call.deadline_s:g}s")
    if isinstance(exc, H2ProtocolError):  # see _SettledProtocol._fail_stream_waiters
        return Failure(Status.UNAVAILABLE, "the connection was lost before the call")
    if isinstance(exc, StreamTerminatedError | ProtocolError | OSError):
        return Failure(Status.UNAVAILABLE, _text(exc) or type(exc).__name__)
    # An answer grpclib cannot read (say, status details that do not decode)
    # is the target's failure, not ours: retried like UNKNOWN.
    log.debug("call to %s failed oddly: %r", call.authority, exc)
    return Failure(Status.UNKNOWN, _text(f"{type(exc).__name__}: {exc}"))


async def _unary(channel: Channel, call: Call) -> None:
    async with channel.request(
        call.method,
        Cardinality.UNARY_UNARY,
        bytes,
        bytes,
        timeout=call.deadline_s,
        metadata=call.metadata,
    ) as stream:
        try:
            await stream.send_message(call.body, end=True)
            await stream.recv_message()
        except GRPCError as exc:
            raise _trailers_only_status(stream, exc) from None


def _trailers_only_status(stream: Stream[bytes, bytes], exc: GRPCError) -> GRPCError:
    """The status of a trailers-only answer that has no content-type.

    grpclib's client refuses such an answer as UNKNOWN before reading its
    grpc-status, but servers send one, grpclib's own among them for a method
    it does not have (UNIMPLEMENTED, which must dead-letter at once rather
    than be retried). Like grpcio, trust the grpc-status. The headers are read
    from grpclib's stream internals, for want of a public way.
    """
    if exc.status is not Status.UNKNOWN or exc.message != MISSING_CONTENT_TYPE:
        return exc
    headers = dict(getattr(stream._stream, "headers", None) or ())
    code = headers.get("grpc-status", "")
    if not code.isdigit() or int(code) not in STATUS_CODES:
        return exc
    message = decode_grpc_message(headers.get("grpc-message", ""))
    return GRPCError(Status(int(code)), message)


def _from_grpc_error(exc: GRPCError) -> Failure:
    retry_after_s = None
    for detail in exc.details or ():
        if isinstance(detail, RetryInfo):
            retry_after_s = detail.retry_delay.ToNanoseconds() / 1e9
    return Failure(exc.status, _text(exc.message or ""), retry_after_s)


def _text(value: object) -> str:
    return str(value)[:MAX_FAILURE_MESSAGE]
