"""Outgoing calls: make a task's gRPC call and say how it went.

The argument's bytes are sent as they are, so taskqueue needs none of the
target's proto modules. One channel (one HTTP/2 connection) per authority, kept
in a bounded cache; the least recently used idle channel is closed beyond it.
"""

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.rpc.error_details_pb2 import RetryInfo
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Status
from grpclib.encoding.base import CodecBase
from grpclib.encoding.proto import ProtoStatusDetailsCodec
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from taskqueue.server.policy import Failure

log = logging.getLogger(__name__)

MAX_FAILURE_MESSAGE = 1024


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


class Dispatcher:
    def __init__(self, cache_size: int = 64) -> None:
        self._cache_size = cache_size
        self._channels: OrderedDict[str, _Entry] = OrderedDict()
        self._codec = RawCodec()
        self._details_codec = ProtoStatusDetailsCodec()

    async def call(self, call: Call) -> Failure | None:
        """Make the call; None when it succeeded, else how it failed."""
        entry = self._checkout(call.authority)
        try:
            method = UnaryUnaryMethod[bytes, bytes](
                entry.channel, call.method, bytes, bytes
            )
            await method(call.body, timeout=call.deadline_s, metadata=call.metadata)
        except GRPCError as exc:
            return _from_grpc_error(exc)
        except TimeoutError:
            return Failure(
                Status.DEADLINE_EXCEEDED, f"no reply in {call.deadline_s:g}s"
            )
        except (StreamTerminatedError, ProtocolError, OSError) as exc:
            return Failure(Status.UNAVAILABLE, _text(exc) or type(exc).__name__)
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
            host, _, port = authority.rpartition(":")
            channel = Channel(
                host.removeprefix("[").removesuffix("]"),
                int(port),
                codec=self._codec,
                status_details_codec=self._details_codec,
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


def _from_grpc_error(exc: GRPCError) -> Failure:
    retry_after_s = None
    for detail in exc.details or ():
        if isinstance(detail, RetryInfo):
            retry_after_s = detail.retry_delay.ToNanoseconds() / 1e9
    return Failure(exc.status, _text(exc.message or ""), retry_after_s)


def _text(value: object) -> str:
    return str(value)[:MAX_FAILURE_MESSAGE]
