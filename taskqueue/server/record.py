"""The Kafka record format of a task (documented for operators in docs/records.md).

- key: the task id (UTF-8), so that a task's copies share a partition key;
- value: the ``taskqueue.service.Task`` protobuf, as validated by ``add``
  (id and queue filled in; a relative delay turned into ``eta``);
- timestamp: when the record was written (CreateTime, milliseconds);
- headers: the task's delivery state, ASCII, each written once. Every hop
  writes a fresh set (replaced, never appended), so a record's size stays
  bounded however many hops it makes.
"""

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import msgspec
from google.protobuf.message import DecodeError

from taskqueue.protobuf.service_pb2 import Task
from taskqueue.server.errors import BadRecord

HEADER_PREFIX = "tq-"
MAX_MESSAGE_CHARS = 1024

Headers = list[tuple[str, bytes]]

# The times in the headers are milliseconds since the epoch. Whoever may write
# to the topics can put any integer there, but only those from the year 1 to
# 9999 are times a calendar (ISO 8601, Python's datetime) can show.
EARLIEST_MS = -62_135_596_800_000  # 0001-01-01T00:00:00.000Z
LATEST_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class State(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A task's delivery state, carried in the record headers."""

    id: str
    due_ms: int
    added_ms: int
    attempt: int = 0  # calls made so far
    first_attempt_ms: int | None = None
    last_attempt_ms: int | None = None
    last_status: str | None = None  # gRPC status name of the last failure
    last_message: str | None = None
    # topic/partition/offset where the task was first read from Kafka
    origin: str | None = None
    reason: str | None = None  # why the task was dead-lettered
    replays: int = 0


_FIELDS = frozenset(State.__struct_fields__)
_INT_FIELDS = {
    name
    for name in State.__struct_fields__
    if name.endswith("_ms") or name in ("attempt", "replays")
}


def header_name(field: str) -> str:
    return HEADER_PREFIX + field.replace("_", "-")


def read_headers(headers: Iterable[tuple[str, bytes | None]]) -> Headers:
    """A consumed record's headers. Kafka allows a header without a value
    (null); it is read as empty, which is all our headers could mean by it."""
    return [(name, b"" if raw is None else bytes(raw)) for name, raw in headers]


def to_headers(state: State) -> Headers:
    headers = []
    for field in state.__struct_fields__:
        value = getattr(state, field)
        if value is None:
            continue
        text = str(value)
        if field in ("last_message", "reason"):
            text = text[:MAX_MESSAGE_CHARS]
        headers.append((header_name(field), text.encode("utf-8", "replace")))
    return headers


def from_headers(headers: Headers) -> State:
    fields: dict[str, object] = {}
    for name, raw in headers:
        if not name.startswith(HEADER_PREFIX):
            continue
        field = name.removeprefix(HEADER_PREFIX).replace("-", "_")
        if field not in _FIELDS:
            continue  # written by a newer version; not ours to judge
        text = raw.decode("utf-8", "replace")
        fields[field] = _int(field, text) if field in _INT_FIELDS else text

    try:
        return msgspec.convert(fields, State)
    except msgspec.ValidationError as exc:
        raise BadRecord(f"bad task headers: {exc}") from None


def _int(field: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BadRecord(f"header {header_name(field)} is not an integer") from None


def in_range_ms(ms: int) -> bool:
    """Whether a header's time is one a calendar holds (see EARLIEST_MS)."""
    return EARLIEST_MS <= ms <= LATEST_MS


def iso_ms(ms: int, timespec: str = "milliseconds") -> str:
    """A header's time as ISO 8601 in UTC (``...Z``); one out of range as its
    number, said to be so: failing would hide all that is shown with it."""
    if not in_range_ms(ms):
        return f"out of range ({ms} ms)"
    # Integer arithmetic: a float of seconds loses the last millisecond.
    moment = _EPOCH + timedelta(milliseconds=ms)
    return moment.isoformat(timespec=timespec).replace("+00:00", "Z")


def encode_task(task: Task) -> bytes:
    return task.SerializeToString(deterministic=True)


def decode_task(value: bytes | None) -> Task:
    if value is None:
        raise BadRecord("record has no value")
    task = Task()
    try:
        task.ParseFromString(value)
    except DecodeError as exc:
        raise BadRecord(f"value is not a taskqueue.service.Task: {exc}") from None
    return task
