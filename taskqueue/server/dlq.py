"""Dead letters: read, filter, count and show them (``taskqueue dlq``).

Nothing here or in ``replay.py`` writes to or deletes from a dead-letter topic:
dead letters stay as the worker wrote them until their topic's retention drops
them.

Reading. A command notes the end offset of every dead-letter partition in
scope when it starts and reads each partition up to there, in the order topic,
partition, offset. Whatever arrives meanwhile, such as replayed tasks failing
straight back, lies past those offsets, so every command ends.

Replay marks. ``replay.py`` remembers each dead letter it replayed with a mark
on the compacted topic ``PREFIX.__replayed``, keyed by :attr:`Letter.mark_key`;
``list`` and ``show`` read the marks to tell which letters were replayed.
"""

import contextlib
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from grpclib.const import Status

from taskqueue.protobuf.service_pb2 import Task
from taskqueue.server.config import Config
from taskqueue.server.errors import BadArgument, BadRecord, BrokerUnavailable
from taskqueue.server.kafka import TOPIC_ALREADY_EXISTS
from taskqueue.server.record import (
    Headers,
    State,
    decode_task,
    from_headers,
    header_name,
    read_headers,
)
from taskqueue.server.topics import Topics
from taskqueue.server.validation import MAX_DELAY_S

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 200
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd])")
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}

Clock = Callable[[], float]


# ---------------------------------------------------------------- dead letters


@dataclass(frozen=True, slots=True)
class Letter:
    """One dead letter; ``task`` and ``state`` are None when it is unreadable."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int  # when it was dead-lettered
    value: bytes
    headers: Headers
    task: Task | None
    state: State | None
    problem: str | None = None  # why it is unreadable

    @property
    def where(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"

    @property
    def task_id(self) -> str | None:
        return self.state.id if self.state else None

    @property
    def mark_key(self) -> str | None:
        """What a replay mark calls this dead letter; copies of it share it."""
        if self.state is None:
            return None
        state = self.state
        return f"{self.topic}/{state.id}/{state.added_ms}/{state.replays}"

    def header(self, field_name: str) -> str | None:
        """A ``tq-`` header as text, read even from an unreadable letter."""
        wanted = header_name(field_name)
        for name, raw in self.headers:
            if name == wanted:
                return raw.decode("utf-8", "replace")
        return None


def read_letter(record: ConsumerRecord) -> Letter:
    headers = read_headers(record.headers)
    common: dict[str, Any] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp_ms": record.timestamp,
        "value": record.value or b"",
        "headers": headers,
    }
    try:
        task = decode_task(record.value)
        state = from_headers(headers)
    except BadRecord as exc:
        return Letter(**common, task=None, state=None, problem=str(exc))
    return Letter(**common, task=task, state=state)


# --------------------------------------------------------------------- filters


@dataclass(frozen=True, slots=True)
class Filters:
    """Which dead letters a command acts on; each option given must match.

    Several values of one option match any of them. Authorities and methods
    are patterns where ``*`` and ``?`` are wildcards (``*.prod:*``,
    ``[::1]:*``, ``/cafe.*``); an authority matches in its normalised form
    (host lower-cased, IPv6 compressed). Times are milliseconds since the
    epoch and compare with when a letter was dead-lettered.
    """

    authorities: tuple[str, ...] = ()
    queues: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    task_ids: tuple[str, ...] = ()
    since_ms: int | None = None
    until_ms: int | None = None

    def covers_topic(self, authority: str, queue: str) -> bool:
        """Whether a dead-letter topic (of a normalised authority) can match."""
        return _any_match(self.authorities, authority, str.lower) and (
            not self.queues or queue in self.queues
        )

    def matches(self, letter: Letter) -> bool:
        if self.since_ms is not None and letter.timestamp_ms < self.since_ms:
            return False
        if self.until_ms is not None and letter.timestamp_ms >= self.until_ms:
            return False
        needs_task = self.methods or self.statuses or self.task_ids
        if letter.task is None or letter.state is None:
            return not needs_task
        return (
            _any_match(self.methods, letter.task.method)
            and (not self.statuses or letter.state.last_status in self.statuses)
            and (not self.task_ids or letter.state.id in self.task_ids)
        )


def _any_match(
    patterns: Iterable[str], text: str, fold: Callable[[str], str] = str
) -> bool:
    patterns = list(patterns)
    return not patterns or any(_glob(fold(p)).fullmatch(text) for p in patterns)


def _glob(pattern: str) -> re.Pattern[str]:
    """``*`` any run of characters, ``?`` one, all else literal: unlike fnmatch,
    ``[`` is no character class, for an IPv6 authority holds one."""
    wild = {"*": ".*", "?": "."}
    return re.compile("".join(wild.get(c) or re.escape(c) for c in pattern), re.S)


def make_filters(
    *,
    authorities: Iterable[str] = (),
    queues: Iterable[str] = (),
    methods: Iterable[str] = (),
    statuses: Iterable[str] = (),
    task_ids: Iterable[str] = (),
    since: str | None = None,
    until: str | None = None,
    now_s: float | None = None,
) -> Filters:
    """Filters from command-line text; BadArgument names a wrong value."""
    now_s = time.time() if now_s is None else now_s
    names = tuple(s.upper() for s in statuses)
    for name in names:
        if name not in Status.__members__:
            raise BadArgument(f"--status {name!r} is not a gRPC status name")
    return Filters(
        authorities=tuple(authorities),
        queues=tuple(queues),
        methods=tuple(methods),
        statuses=names,
        task_ids=tuple(task_ids),
        since_ms=None if since is None else parse_time_ms(since, now_s, "--since"),
        until_ms=None if until is None else parse_time_ms(until, now_s, "--until"),
    )


def parse_duration_s(text: str, option: str) -> float:
    """``90s``, ``15m``, ``2h``, ``7d`` (a decimal number and a unit)."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise BadArgument(f"{option} {text!r} is not a duration like 30s, 15m, 2h, 7d")
    seconds = float(match[1]) * _UNITS_S[match[2]]
    # The bound `add` sets on a delay: beyond it a time leaves the calendar
    # (and a float of enough digits is infinite).
    if seconds > MAX_DELAY_S:
        raise BadArgument(f"{option} {text!r} is longer than {MAX_DELAY_S} seconds")
    return seconds


def parse_time_ms(text: str, now_s: float, option: str) -> int:
    """An ISO 8601 time (UTC unless it says otherwise) or a duration ago."""
    if _DURATION_RE.fullmatch(text.strip()):
        return int((now_s - parse_duration_s(text, option)) * 1000)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadArgument(
            f"{option} {text!r} is neither a time like 2025-06-01T12:00 "
            "nor a duration like 2h (ago)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


# --------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class Span:
    """A partition's records to read: from ``start`` up to ``end`` (excluded)."""

    tp: TopicPartition
    start: int
    end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


class Reader:
    """Reads topics without a consumer group: nothing is committed anywhere."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._topics = Topics(config.topics.prefix)
        common: dict[str, Any] = {
            "bootstrap_servers": config.kafka.bootstrap_servers,
            "client_id": f"{config.kafka.client_id}-dlq",
            "request_timeout_ms": int(config.kafka.request_timeout_s * 1000),
        }
        self._consumer = AIOKafkaConsumer(
            **common,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # A dead letter can be as large as anything the main topic took.
            max_partition_fetch_bytes=config.rpc.max_message_bytes + 256 * 1024,
        )
        # The consumer only knows the partitions of topics it was given; the
        # admin client describes every topic in one request.
        self._admin = AIOKafkaAdminClient(**common)
        self._partitions: dict[str, list[int]] = {}

    async def __aenter__(self) -> "Reader":
        try:
            await self._consumer.start()
            await self._admin.start()
        except KafkaError as exc:
            await self.__aexit__()
            raise BrokerUnavailable(f"cannot reach Kafka: {exc}") from exc
        return self

    async def __aexit__(self, *_: object) -> None:
        with contextlib.suppress(KafkaError):
            await self._admin.close()
        await self._consumer.stop()

    async def dlq_topics(self, filters: Filters = Filters()) -> list[str]:
        """Every dead-letter topic of this prefix that ``filters`` cover, sorted."""
        pattern = re.compile(self._topics.dlq_pattern())
        found = []
        for topic in await self.all_topics():
            if pattern.fullmatch(topic) and filters.covers_topic(
                *self._topics.authority_and_queue(topic)
            ):
                found.append(topic)
        return sorted(found)

    async def all_topics(self) -> set[str]:
        """Every topic and, kept for :meth:`spans`, its partitions."""
        try:
            described = await self._admin.describe_topics()
        except KafkaError as exc:
            raise BrokerUnavailable(f"cannot list topics: {exc}") from exc
        self._partitions = {
            topic["topic"]: sorted(p["partition"] for p in topic["partitions"])
            for topic in described
            if topic["error_code"] == 0
        }
        return set(self._partitions)

    async def spans(self, topics: Iterable[str]) -> list[Span]:
        """Each partition of ``topics`` from its start to its end as of now."""
        tps = [
            TopicPartition(topic, partition)
            for topic in topics
            for partition in self._partitions.get(topic, ())
        ]
        if not tps:
            return []
        try:
            starts = await self._consumer.beginning_offsets(tps)
            ends = await self._consumer.end_offsets(tps)
        except KafkaError as exc:
            raise BrokerUnavailable(f"cannot read offsets: {exc}") from exc
        spans = [Span(tp, starts[tp], ends[tp]) for tp in tps]
        log.debug(
            "reading %d records of %d partitions up to their ends as of now",
            sum(span.size for span in spans),
            len(spans),
        )
        return spans

    async def records(
        self, spans: Iterable[Span]
    ) -> AsyncGenerator[ConsumerRecord, None]:
        """The records of each span in order, one partition after the other."""
        for span in spans:
            if span.size == 0:
                continue
            self._consumer.assign([span.tp])
            self._consumer.seek(span.tp, span.start)
            async for record in self._partition(span):
                yield record

    async def _partition(self, span: Span) -> AsyncGenerator[ConsumerRecord, None]:
        stalled_since = time.monotonic()
        limit_s = self._config.kafka.request_timeout_s
        while await self._consumer.position(span.tp) < span.end:
            try:
                batch = await self._consumer.getmany(
                    span.tp, timeout_ms=POLL_TIMEOUT_MS
                )
            except KafkaError as exc:
                raise BrokerUnavailable(f"cannot read {span.tp}: {exc}") from exc
            records = batch.get(span.tp, [])
            if records:
                stalled_since = time.monotonic()
            elif time.monotonic() - stalled_since > limit_s:
                raise BrokerUnavailable(
                    f"no records from {span.tp.topic}/{span.tp.partition} "
                    f"for {limit_s:g}s"
                )
            for record in records:
                if record.offset >= span.end:
                    return
                yield record


async def letters(
    reader: Reader, spans: Iterable[Span]
) -> AsyncGenerator[Letter, None]:
    async for record in reader.records(spans):
        yield read_letter(record)


# ----------------------------------------------------------------------- marks


class Mark(msgspec.Struct, frozen=True, kw_only=True):
    """The value of a replay mark (its key is :attr:`Letter.mark_key`)."""

    task_id: str
    dead_letter: str  # topic/partition/offset of the copy that was replayed
    replayed_to: str  # topic/partition/offset of the replayed task
    replayed_ms: int


async def load_marks(reader: Reader, config: Config, topics: Iterable[str]) -> set[str]:
    """Keys of the replay marks of dead letters on ``topics``."""
    wanted = set(topics)
    marks_topic = Topics(config.topics.prefix).replayed()
    if marks_topic not in await reader.all_topics():
        return set()
    keys: set[str] = set()
    async for record in reader.records(await reader.spans([marks_topic])):
        key = (record.key or b"").decode("utf-8", "replace")
        if key.partition("/")[0] not in wanted:
            continue
        if record.value is None:
            keys.discard(key)  # a tombstone: the mark was withdrawn
        else:
            keys.add(key)
    return keys


class MarkWriter:
    """Writes replay marks to their compacted topic, created on first use."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._topic = Topics(config.topics.prefix).replayed()
        common: dict[str, Any] = {
            "bootstrap_servers": config.kafka.bootstrap_servers,
            "client_id": f"{config.kafka.client_id}-dlq",
            "request_timeout_ms": int(config.kafka.request_timeout_s * 1000),
        }
        self._producer = AIOKafkaProducer(**common, acks="all", enable_idempotence=True)
        self._admin = AIOKafkaAdminClient(**common)

    async def __aenter__(self) -> "MarkWriter":
        try:
            await self._producer.start()
            await self._admin.start()
            await self._create_topic()
        except KafkaError as exc:
            await self.__aexit__()
            raise BrokerUnavailable(f"cannot prepare {self._topic}: {exc}") from exc
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._producer.stop()
        await self._admin.close()

    async def _create_topic(self) -> None:
        # A mark is useless once its dead letter is gone: keep it as long.
        retention_ms = int(self._config.topics.dlq_retention_s * 1000)
        configs = {
            "cleanup.policy": "compact,delete",
            "retention.ms": str(retention_ms),
        }
        topic = NewTopic(
            self._topic, 1, self._config.kafka.replication_factor, topic_configs=configs
        )
        response = await self._admin.create_topics([topic])
        for name, code, *message in response.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise BrokerUnavailable(f"cannot create topic {name}: {code} {message}")

    async def write(self, key: str, mark: Mark) -> None:
        try:
            sent = await self._producer.send(
                self._topic, msgspec.json.encode(mark), key=key.encode()
            )
            await sent
        except KafkaError as exc:
            raise BrokerUnavailable(f"Kafka did not take the mark: {exc}") from exc


# ------------------------------------------------------------------------ list


@dataclass(slots=True)
class QueueStats:
    """The dead letters of one queue (one dead-letter topic)."""

    topic: str
    authority: str
    queue: str
    count: int = 0
    oldest_ms: int | None = None
    newest_ms: int | None = None
    statuses: Counter[str] = field(default_factory=Counter)
    replayed: int = 0  # dead letters with a replay mark

    def add(self, letter: Letter, replayed: bool) -> None:
        self.count += 1
        stamp = letter.timestamp_ms
        self.oldest_ms = stamp if self.oldest_ms is None else min(self.oldest_ms, stamp)
        self.newest_ms = stamp if self.newest_ms is None else max(self.newest_ms, stamp)
        self.statuses[status_of(letter)] += 1
        self.replayed += int(replayed)


def status_of(letter: Letter) -> str:
    if letter.state is None:
        return "(unreadable)"
    return letter.state.last_status or "(none)"


async def queue_stats(config: Config) -> list[QueueStats]:
    """Counts of every dead-letter topic of the prefix, empty ones included."""
    topics = Topics(config.topics.prefix)
    async with Reader(config) as reader:
        dlq_topics = await reader.dlq_topics()
        marks = await load_marks(reader, config, dlq_topics)
        stats = {
            topic: QueueStats(topic, *topics.authority_and_queue(topic))
            for topic in dlq_topics
        }
        async for letter in letters(reader, await reader.spans(dlq_topics)):
            stats[letter.topic].add(letter, letter.mark_key in marks)
    return list(stats.values())


# ------------------------------------------------------------------------ show


@dataclass(frozen=True, slots=True)
class Shown:
    letter: Letter
    replayed: bool


async def find(
    config: Config, filters: Filters, limit: int | None = None
) -> AsyncGenerator[Shown, None]:
    """Matching dead letters in topic, partition, offset order."""
    if limit is not None and limit <= 0:
        return
    async with Reader(config) as reader:
        dlq_topics = await reader.dlq_topics(filters)
        marks = await load_marks(reader, config, dlq_topics)
        found = 0
        async for letter in letters(reader, await reader.spans(dlq_topics)):
            if not filters.matches(letter):
                continue
            yield Shown(letter, letter.mark_key in marks)
            found += 1
            if found == limit:
                return
