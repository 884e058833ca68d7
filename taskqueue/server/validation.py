"""Validation of a Task sent to ``add``; every message names the field."""

import ipaddress
import math
import re
import uuid

from google.protobuf.duration_pb2 import Duration

from taskqueue.protobuf.service_pb2 import Delivery, Task
from taskqueue.server.errors import InvalidTask
from taskqueue.server.record import TASK_ID_PATTERN
from taskqueue.server.topics import MAX_TOPIC_LENGTH, QUEUE_RE, is_reserved_queue

DEFAULT_QUEUE = "default"
# Room kept for the record's key, headers and the rest of the Task.
HEADER_ROOM_BYTES = 16 * 1024
MAX_METHOD_CHARS = 512
MAX_TYPE_URL_CHARS = 512
# Counted as HTTP/2 counts a header list (key + value + 32 per entry), so that
# with taskqueue's own headers a call stays under the 8 KiB of metadata that
# gRPC servers accept by default.
MAX_METADATA_BYTES = 6 * 1024
METADATA_ENTRY_OVERHEAD = 32
MAX_BACKOFF_STEPS = 100
MAX_ATTEMPTS = 1000
# No horizon of our own; this only keeps times inside int64 milliseconds.
MAX_DELAY_S = 1000 * 365 * 86400
# Headroom left in a topic name for the longest tier suffix.
TIER_SUFFIX_ROOM = len(".retry-99999d")

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_PORT = re.compile(r"[0-9]{1,5}")
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
# /package.Service/Method: a dotted protobuf full name, then a method name.
_METHOD = re.compile(rf"/(?:{_IDENTIFIER}\.)*{_IDENTIFIER}/{_IDENTIFIER}")
_METADATA_KEY = re.compile(r"[a-z0-9_.-]{1,128}")
_TASK_ID = re.compile(TASK_ID_PATTERN)
_RESERVED_METADATA = ("grpc-", "taskqueue-", ":")
# Headers of the HTTP/2 request itself: sent as metadata they would break the
# call (connection-specific ones are a protocol error) or change how proxies
# in front of the target route it (host).
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-type",
        "content-length",
        "te",
        "user-agent",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    }
)


def check_authority(authority: str) -> None:
    host, sep, port = authority.rpartition(":")
    if not sep or not host:
        raise InvalidTask(f"authority {authority[:300]!r} is not host:port")
    # ASCII digits only: str.isdigit() also takes "²" or "٨", which int()
    # refuses or Kafka topic names cannot hold; at most 5 of them, since int()
    # refuses thousands.
    if not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise InvalidTask(f"authority {authority[:300]!r} has no valid port (1-65535)")
    if host.startswith("["):
        _check_ipv6(authority, host)
    elif not _is_hostname(host):
        raise InvalidTask(f"authority {authority[:300]!r} has an invalid host name")


def _check_ipv6(authority: str, host: str) -> None:
    try:
        # A zone ("%eth0") means nothing away from the caller's own host, and
        # topic names cannot hold it.
        if not host.endswith("]") or "%" in host:
            raise ValueError(host)
        ipaddress.IPv6Address(host[1:-1])
    except ValueError:
        raise InvalidTask(
            f"authority {authority!r} has an invalid IPv6 address"
        ) from None


def _is_hostname(host: str) -> bool:
    labels = host.removesuffix(".").split(".")
    return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def check_method(method: str) -> None:
    if len(method) > MAX_METHOD_CHARS or not _METHOD.fullmatch(method):
        raise InvalidTask(
            f"method {method[:80]!r} is not a gRPC path like /package.Service/Method"
        )


def check_queue(queue: str, topic_length: int) -> None:
    if not QUEUE_RE.fullmatch(queue) or is_reserved_queue(queue):
        raise InvalidTask(
            f"queue {queue[:80]!r} must be 1-64 of A-Z a-z 0-9 - "
            "and not 'dlq' or 'retry-<delay>'"
        )
    if topic_length + TIER_SUFFIX_ROOM > MAX_TOPIC_LENGTH:
        raise InvalidTask(
            f"authority and queue make a topic name longer than {MAX_TOPIC_LENGTH}"
        )


def check_argument(task: Task, max_message_bytes: int) -> None:
    if not task.HasField("argument") or not task.argument.type_url:
        raise InvalidTask("argument is required (a google.protobuf.Any with type_url)")
    type_url = task.argument.type_url
    if len(type_url) > MAX_TYPE_URL_CHARS or not type_url.isprintable():
        raise InvalidTask(
            f"argument.type_url must be at most {MAX_TYPE_URL_CHARS} printable "
            "characters"
        )
    limit = max_message_bytes - HEADER_ROOM_BYTES
    if len(task.argument.value) > limit:
        raise InvalidTask(
            f"argument is {len(task.argument.value)} bytes; the limit is {limit} "
            f"({max_message_bytes} less {HEADER_ROOM_BYTES} kept for taskqueue's "
            "headers)"
        )


def check_metadata(task: Task) -> None:
    size = 0
    for key, value in task.metadata.items():
        if not _METADATA_KEY.fullmatch(key) or key.endswith("-bin"):
            raise InvalidTask(
                f"metadata key {key[:80]!r} must be 1-128 of lowercase a-z 0-9 _ . -"
            )
        if key.startswith(_RESERVED_METADATA) or key in _RESERVED_HEADERS:
            raise InvalidTask(f"metadata key {key!r} is reserved")
        # Never the value itself in the message: it may be a credential.
        if not value.isascii() or not value.isprintable() or value != value.strip():
            raise InvalidTask(
                f"metadata value of {key!r} must be printable ASCII without "
                "leading or trailing spaces"
            )
        size += len(key) + len(value) + METADATA_ENTRY_OVERHEAD
    if size > MAX_METADATA_BYTES:
        raise InvalidTask(
            f"metadata is {size} bytes (with {METADATA_ENTRY_OVERHEAD} per entry); "
            f"the limit is {MAX_METADATA_BYTES}"
        )


def due_ms(task: Task, now_ms: int) -> int:
    """When the first call is due, in milliseconds since the epoch."""
    which = task.WhichOneof("due")
    if which == "delay":
        delay_s = _seconds(task.delay, "delay")
        if delay_s < 0:
            raise InvalidTask("delay must not be negative")
        if delay_s > MAX_DELAY_S:
            raise InvalidTask(f"delay is longer than {MAX_DELAY_S} seconds")
        return now_ms + round(delay_s * 1000)
    if which == "eta":
        eta_ms = task.eta.seconds * 1000 + task.eta.nanos // 1_000_000
        if not 0 <= task.eta.nanos < 1_000_000_000:
            raise InvalidTask("eta.nanos must be in [0, 1e9)")
        if eta_ms > now_ms + MAX_DELAY_S * 1000:
            raise InvalidTask(f"eta is more than {MAX_DELAY_S} seconds away")
        return max(eta_ms, now_ms)
    return now_ms


def check_deadline(task: Task, max_deadline_s: float) -> None:
    if not task.HasField("deadline"):
        return
    deadline_s = _seconds(task.deadline, "deadline")
    if not 0 < deadline_s <= max_deadline_s:
        raise InvalidTask(f"deadline must be in (0, {max_deadline_s:g}] seconds")


def check_retry(task: Task) -> None:
    if not task.HasField("retry"):
        return
    retry = task.retry
    if retry.max_attempts > MAX_ATTEMPTS:
        raise InvalidTask(f"retry.max_attempts is above {MAX_ATTEMPTS}")
    if len(retry.backoff) > MAX_BACKOFF_STEPS:
        raise InvalidTask(f"retry.backoff has more than {MAX_BACKOFF_STEPS} delays")
    for delay in retry.backoff:
        _check_delay(delay, "retry.backoff")
    # 0 is proto3's "unset" (the policy then doubles); NaN and inf are refused:
    # an infinite multiplier times a zero backoff is no delay at all.
    multiplier = retry.multiplier
    bad = not 1 <= multiplier < math.inf
    if retry.HasField("initial_backoff") and multiplier != 0 and bad:
        raise InvalidTask("retry.multiplier must be a finite number of at least 1")
    for name in ("initial_backoff", "max_backoff", "max_age"):
        if retry.HasField(name):
            _check_delay(getattr(retry, name), f"retry.{name}")


def _check_delay(duration: Duration, field: str) -> None:
    if not 0 <= _seconds(duration, field) <= MAX_DELAY_S:
        raise InvalidTask(f"{field} must be in [0, {MAX_DELAY_S}] seconds")


def task_id(task: Task) -> str:
    if not task.id:
        return uuid.uuid4().hex
    if not _TASK_ID.fullmatch(task.id):
        raise InvalidTask("id must be 1-128 of A-Z a-z 0-9 . _ : -")
    return task.id


def check_delivery(task: Task) -> None:
    if task.delivery not in Delivery.values():
        raise InvalidTask(f"delivery {task.delivery} is not a known Delivery value")


def _seconds(duration: Duration, field: str) -> float:
    if abs(duration.nanos) >= 1_000_000_000:
        raise InvalidTask(f"{field}.nanos must be in (-1e9, 1e9)")
    return duration.seconds + duration.nanos / 1e9
