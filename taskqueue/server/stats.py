"""Queue statistics for ``taskqueue queues``, read from Kafka alone.

A queue is the family of topics ``PREFIX.<authority>.<queue>[.<tier>]``. For
each tier topic its depth is what the tier's consumer group has not finished
yet, summed over partitions: the end offset minus the group's committed
offset (the start of the log where nothing was committed yet): the group's
lag in records. A dead-letter topic has no consumer group; its depth is the
records it keeps. The oldest due time is the earliest ``tq-due-ms`` among
the records at the head of each partition with a depth, read one record per
partition. Within a tier partition due times need not be in order, so this
is the oldest head, not necessarily the oldest task.
"""

import asyncio
import contextlib
import re
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from rich.table import Table

from taskqueue.server.config import Config
from taskqueue.server.errors import BadRecord, BrokerUnavailable
from taskqueue.server.ladder import parse_delay_s
from taskqueue.server.metrics import MAIN
from taskqueue.server.record import from_headers, in_range_ms, iso_ms, read_headers
from taskqueue.server.topics import DLQ, INTERNAL, Topics, tier_of
from taskqueue.server.worker import TierName

# Committed offsets Kafka reports for a partition a group has none for.
NO_OFFSET = -1
RETRY_S = 0.2
HEAD_POLL_MS = 200


@dataclass(slots=True)
class TierStats:
    tier: str  # main, retry-5s... or dlq
    depth: int = 0
    oldest_due_ms: int | None = None

    def saw_due(self, due_ms: int) -> None:
        if self.oldest_due_ms is None or due_ms < self.oldest_due_ms:
            self.oldest_due_ms = due_ms


@dataclass(slots=True)
class QueueStats:
    authority: str
    queue: str
    tiers: dict[str, TierStats] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        """Tasks waiting or in progress, dead letters left out."""
        return sum(t.depth for t in self.tiers.values() if t.tier != DLQ)

    @property
    def oldest_due_ms(self) -> int | None:
        dues = [
            t.oldest_due_ms
            for t in self.tiers.values()
            if t.tier != DLQ and t.oldest_due_ms is not None
        ]
        return min(dues, default=None)

    def late_s(self, now_s: float) -> float:
        """How long the oldest head record is past its due time (0 if not)."""
        oldest = self.oldest_due_ms
        if oldest is None or not in_range_ms(oldest):
            # A due time out of range is no time to be late for: a worker
            # dead-letters such a record instead of calling it.
            return 0.0
        return max(0.0, now_s - oldest / 1000)


@dataclass(frozen=True, slots=True)
class _Span:
    """A partition's unfinished records: from ``start`` up to ``end``."""

    tp: TopicPartition
    start: int
    end: int


async def collect(config: Config, *, heads: bool = True) -> list[QueueStats]:
    """Every queue of the prefix, sorted by authority and queue."""
    topics = Topics(config.topics.prefix)
    async with _clients(config) as (admin, consumer):
        try:
            spans = await _spans(admin, consumer, topics, config)
        except KafkaError as exc:
            raise BrokerUnavailable(f"cannot read offsets: {exc}") from exc
        stats: dict[tuple[str, str], QueueStats] = {}
        for span in spans:
            _tier(stats, topics, span.tp.topic).depth += max(0, span.end - span.start)
        if heads:
            waiting = [s for s in spans if tier_of(s.tp.topic) != DLQ]
            await _read_heads(consumer, waiting, stats, topics, config)
    return [stats[key] for key in sorted(stats)]


@contextlib.asynccontextmanager
async def _clients(
    config: Config,
) -> AsyncIterator[tuple[AIOKafkaAdminClient, AIOKafkaConsumer]]:
    common: dict[str, Any] = {
        "bootstrap_servers": config.kafka.bootstrap_servers,
        "client_id": f"{config.kafka.client_id}-stats",
        "request_timeout_ms": int(config.kafka.request_timeout_s * 1000),
    }
    admin = AIOKafkaAdminClient(**common)
    consumer = AIOKafkaConsumer(**common, enable_auto_commit=False)
    try:
        await admin.start()
        await consumer.start()
        yield admin, consumer
    except KafkaError as exc:
        raise BrokerUnavailable(f"cannot reach Kafka: {exc}") from exc
    finally:
        await consumer.stop()
        with contextlib.suppress(KafkaError):
            await admin.close()


async def _spans(
    admin: AIOKafkaAdminClient,
    consumer: AIOKafkaConsumer,
    topics: Topics,
    config: Config,
) -> list[_Span]:
    """Every partition of the prefix's queues, from where its group reads next."""
    own = re.compile(rf"{re.escape(topics.prefix)}\.(?!{INTERNAL}).+\..+")
    tps = [
        TopicPartition(topic["topic"], partition["partition"])
        for topic in await admin.describe_topics()
        if topic["error_code"] == 0 and own.fullmatch(topic["topic"])
        for partition in topic["partitions"]
    ]
    if not tps:
        return []
    # Assigned partitions have known leaders: each offset lookup is then one
    # request, where unassigned ones wait for metadata topic by topic.
    consumer.assign(tps)
    starts = await consumer.beginning_offsets(tps)
    ends = await consumer.end_offsets(tps)
    committed = await _committed(admin, config)
    return [
        _Span(tp, _start(tp, starts[tp], committed), ends[tp]) for tp in sorted(tps)
    ]


def _tier(
    stats: dict[tuple[str, str], QueueStats], topics: Topics, topic: str
) -> TierStats:
    key = topics.authority_and_queue(topic)
    queue = stats.setdefault(key, QueueStats(*key))
    name = tier_of(topic) or MAIN
    return queue.tiers.setdefault(name, TierStats(name))


def _start(tp: TopicPartition, first: int, committed: dict[TopicPartition, int]) -> int:
    """Where the tier's group reads next (records before it are done)."""
    if tier_of(tp.topic) == DLQ:
        return first
    offset = committed.get(tp, NO_OFFSET)
    # Nothing committed, or committed before what retention kept: the group
    # starts at the earliest record it can still read.
    return first if offset == NO_OFFSET else max(offset, first)


async def _committed(
    admin: AIOKafkaAdminClient, config: Config
) -> dict[TopicPartition, int]:
    """Committed offsets of both worker groups (they cover distinct topics)."""
    offsets: dict[TopicPartition, int] = {}
    for tier in TierName:
        group = f"{config.worker.group_prefix}-{tier}"
        found = await _group_offsets(admin, group, config.kafka.request_timeout_s)
        offsets |= {tp: meta.offset for tp, meta in found.items()}
    return offsets


async def _group_offsets(
    admin: AIOKafkaAdminClient, group: str, limit_s: float
) -> dict[TopicPartition, Any]:
    # A cluster where no group ever committed has no coordinator yet; Kafka
    # says so with a retriable error while it sets one up.
    deadline = time.monotonic() + limit_s
    while True:
        try:
            found: dict[TopicPartition, Any]
            found = await admin.list_consumer_group_offsets(group)
            return found
        except KafkaError as exc:
            if not exc.retriable or time.monotonic() > deadline:
                raise
        await asyncio.sleep(RETRY_S)


async def _read_heads(
    consumer: AIOKafkaConsumer,
    spans: list[_Span],
    stats: dict[tuple[str, str], QueueStats],
    topics: Topics,
    config: Config,
) -> None:
    """The first unfinished record of each partition, all fetched together.

    A partition that does not answer within ``kafka.request_timeout_s`` is
    left out of the oldest due time rather than failing the whole listing.
    """
    left = {span.tp for span in spans if 0 <= span.start < span.end}
    consumer.pause(*(span.tp for span in spans if span.tp not in left))
    for span in spans:
        if span.tp in left:
            consumer.seek(span.tp, span.start)
    deadline = time.monotonic() + config.kafka.request_timeout_s
    try:
        while left and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=HEAD_POLL_MS)
            for tp, records in batches.items():
                if tp in left and records:
                    left.discard(tp)
                    consumer.pause(tp)
                    _saw_head(stats, topics, records[0])
    except KafkaError as exc:
        raise BrokerUnavailable(f"cannot read head records: {exc}") from exc


def _saw_head(
    stats: dict[tuple[str, str], QueueStats], topics: Topics, record: ConsumerRecord
) -> None:
    try:
        due_ms = from_headers(read_headers(record.headers)).due_ms
    except BadRecord:
        return  # goes to the dead-letter topic when a worker reads it
    _tier(stats, topics, record.topic).saw_due(due_ms)


# ------------------------------------------------------------- presentation


def to_builtins(queues: list[QueueStats], now_s: float) -> list[dict[str, Any]]:
    """The statistics as plain data, for ``--json``."""
    return [
        {
            "authority": q.authority,
            "queue": q.queue,
            "depth": q.depth,
            "oldest_due": _iso(q.oldest_due_ms),
            "late_s": round(q.late_s(now_s), 3),
            "tiers": {
                t.tier: {"depth": t.depth, "oldest_due": _iso(t.oldest_due_ms)}
                for t in _ordered(q.tiers.values())
            },
        }
        for q in queues
    ]


def to_json(queues: list[QueueStats], now_s: float | None = None) -> str:
    now_s = time.time() if now_s is None else now_s
    return msgspec.json.encode(to_builtins(queues, now_s)).decode()


def table(queues: list[QueueStats], now_s: float | None = None) -> Table:
    """One row per queue; a column per tier that holds anything anywhere."""
    now_s = time.time() if now_s is None else now_s
    shown = _tiers_shown(queues)
    view = Table(title="taskqueue queues", title_justify="left")
    view.add_column("authority")
    view.add_column("queue")
    for tier in shown:
        view.add_column(tier.removeprefix("retry-"), justify="right")
    view.add_column("oldest due (UTC)")
    view.add_column("late", justify="right")

    for q in queues:
        depths = [str(q.tiers[t].depth) if t in q.tiers else "" for t in shown]
        late_s = q.late_s(now_s)
        view.add_row(
            q.authority,
            q.queue,
            *depths,
            _iso(q.oldest_due_ms) or "",
            f"{late_s:.1f}s" if late_s else "",
        )
    return view


def _tiers_shown(queues: list[QueueStats]) -> list[str]:
    """main and dlq always; a ladder tier when some queue has records on it."""
    busy: dict[str, int] = defaultdict(int)
    for q in queues:
        for t in q.tiers.values():
            busy[t.tier] += t.depth
    tiers = [TierStats(name) for name, depth in busy.items() if depth]
    return [t.tier for t in _ordered([TierStats(MAIN), *tiers, TierStats(DLQ)])]


def _ordered(tiers: Iterable[TierStats]) -> list[TierStats]:
    """main, the ladder from the shortest delay up, dlq."""

    def key(t: TierStats) -> tuple[int, float]:
        if t.tier == MAIN:
            return (0, 0.0)
        if t.tier == DLQ:
            return (2, 0.0)
        return (1, parse_delay_s(t.tier))

    unique = {t.tier: t for t in tiers}
    return sorted(unique.values(), key=key)


def _iso(ms: int | None) -> str | None:
    return None if ms is None else iso_ms(ms, "seconds")
