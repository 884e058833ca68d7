"""The Kafka record format of a task (documented for operators in docs/records.md).

- key: the task id (UTF-8), so that a task's copies share a partition key;
- value: the ``taskqueue.service.Task`` protobuf, as validated by ``add``
  (id and queue filled in; a relative delay turned into ``eta``);
- timestamp: when the record was written (CreateTime, milliseconds);
- headers: the task's delivery state, ASCII, each written once. Every hop
  writes a fresh set (replaced, never appended), so a record's size stays
  bounded however many hops it makes. Integers are ASCII decimal, as
  ``to_headers`` writes them: whoever may write to the topics can write
  anything there, and Python's ``int()`` would also take "1_000", " 2 " or
  digits of other scripts.
"""

import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Annotated

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

# Enough for any int64 ("-9223372036854775808"); a time beyond that is out of
# range anyway (see in_range_ms), and the bound keeps int() cheap.
MAX_INT_CHARS = 20
# Attempts and replays. No policy lets a task reach more attempts: the
# configuration's retry.max_attempts goes up to 1e9 (a task's own to 1000),
# and a replay is an operator's act each time. What a record claims beyond
# that, or below 0, would only skew the policy or the call's metadata.
MAX_COUNT = 1_000_000_000
# What a task id may be: in a record, and in ``add`` (validation.task_id).
TASK_ID_PATTERN = r"[A-Za-z0-9._:-]{1,128}"
_TASK_ID_RULE = "1-128 of A-Z a-z 0-9 . _ : -"

TaskId = Annotated[str, msgspec.Meta(pattern=rf"^{TASK_ID_PATTERN}\Z")]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]


class State(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A task's delivery state, carried in the record headers.

    The constraints bind what ``from_headers`` reads; a State built in code is
    not checked (msgspec checks on conversion only).
    """

    id: TaskId
    due_ms: int
    added_ms: int
    attempt: Count = 0  # calls made so far
    first_attempt_ms: int | None = None
    last_attempt_ms: int | None = None
    last_status: str | None = None  # gRPC status name of the last failure
    last_message: str | None = None
    # topic/partition/offset where the task was first read from Kafka
    origin: str | None = None
    reason: str | None = None  # why the task was dead-lettered
    replays: Count = 0


_FIELDS = frozenset(State.__struct_fields__)
_COUNT_FIELDS = frozenset({"attempt", "replays"})
_TIME_FIELDS = frozenset(name for name in _FIELDS if name.endswith("_ms"))
# Times may be negative (before 1970); counts never carry a sign.
_TIME_RE = re.compile(rb"-?[0-9]+")
_COUNT_RE = re.compile(rb"[0-9]+")
# What a header must hold, said in a refused record's reason instead of
# msgspec's wording of the constraint.
_RULES = {
    "id": _TASK_ID_RULE,
    "attempt": f"an integer from 0 to {MAX_COUNT}",
    "replays": f"an integer from 0 to {MAX_COUNT}",
}
_AT_FIELD = re.compile(r"(?P<problem>.*) - at `\$\.(?P<field>\w+)`")
_MISSING = re.compile(r"Object missing required field `(?P<field>\w+)`")


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
        if field in _TIME_FIELDS or field in _COUNT_FIELDS:
            fields[field] = _int(field, raw)
        else:
            fields[field] = raw.decode("utf-8", "replace")

    try:
        return msgspec.convert(fields, State)
    except msgspec.ValidationError as exc:
        raise BadRecord(_reason(str(exc))) from None


def _int(field: str, raw: bytes) -> int:
    """A header's integer, in the one form ``to_headers`` writes."""
    syntax = _COUNT_RE if field in _COUNT_FIELDS else _TIME_RE
    if len(raw) > MAX_INT_CHARS or not syntax.fullmatch(raw):
        sign = "no sign" if field in _COUNT_FIELDS else "an optional '-'"
        raise BadRecord(
            f"header {header_name(field)} is not an integer in ASCII digits "
            f"({sign}, at most {MAX_INT_CHARS} characters)"
        )
    return int(raw)


def _reason(problem: str) -> str:
    """msgspec's complaint about a State, told by header name."""
    if missing := _MISSING.fullmatch(problem):
        return f"header {header_name(missing['field'])} is missing"
    if (at := _AT_FIELD.fullmatch(problem)) is None:
        return f"bad task headers: {problem}"
    field = at["field"]
    rule = _RULES.get(field)
    if rule is None:
        return f"header {header_name(field)} is invalid: {at['problem']}"
    return f"header {header_name(field)} must be {rule}"


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
