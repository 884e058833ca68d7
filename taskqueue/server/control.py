"""Pauses: calls to a queue or an authority stop while ``add`` keeps accepting.

A pause is a record on the compacted topic ``PREFIX.__control``, keyed by what
it covers (``<authority>/<queue>``, or ``<authority>/*`` for every queue of the
authority); a resume is a tombstone for that key, so compaction keeps the
topic about as small as the set of pauses in force. Every worker reads the
topic from its start before it consumes anything, then follows it: a paused
queue's partitions are paused like a partition whose head is not due, and a
record taken before the pause arrived waits before its call. Calls already
under way finish. Workers learn of a pause within a poll (a fraction of a
second) while the broker is up; while it is not, they keep the last state.
"""

import asyncio
import logging
import time
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from taskqueue.server.config import Config
from taskqueue.server.errors import BrokerUnavailable
from taskqueue.server.kafka import TOPIC_ALREADY_EXISTS
from taskqueue.server.topics import INTERNAL, Topics, decode_authority, encode_authority

log = logging.getLogger(__name__)

ALL_QUEUES = "*"
POLL_TIMEOUT_MS = 200
FOLLOW_BACKOFF_S = 1.0
MAX_REASON_CHARS = 1024


class Pause(msgspec.Struct, frozen=True, kw_only=True):
    authority: str  # normalised, as in topic names
    queue: str  # "" for every queue of the authority
    reason: str = ""
    since_ms: int

    @property
    def key(self) -> str:
        return pause_key(self.authority, self.queue)


def pause_key(authority: str, queue: str) -> str:
    return f"{authority}/{queue or ALL_QUEUES}"


def normalise(authority: str) -> str:
    """``host:port`` as topic names see it (host lower-cased)."""
    return decode_authority(encode_authority(authority))


def control_topic(config: Config) -> str:
    return f"{config.topics.prefix}.{INTERNAL}control"


def _common(config: Config) -> dict[str, Any]:
    return {
        "bootstrap_servers": config.kafka.bootstrap_servers,
        "client_id": f"{config.kafka.client_id}-control",
        "request_timeout_ms": int(config.kafka.request_timeout_s * 1000),
    }


async def _ensure_topic(config: Config) -> None:
    # One partition: the pauses are few, and one partition keeps them in order.
    topic = NewTopic(
        control_topic(config),
        1,
        config.kafka.replication_factor,
        topic_configs={"cleanup.policy": "compact"},
    )
    admin = AIOKafkaAdminClient(**_common(config))
    try:
        await admin.start()
        response = await admin.create_topics([topic])
    finally:
        await admin.close()
    for name, code, *message in response.topic_errors:
        if code not in (0, TOPIC_ALREADY_EXISTS):
            raise BrokerUnavailable(f"cannot create topic {name}: {code} {message}")


class PauseBoard:
    """The pauses in force: read from the control topic, then followed."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._topics = Topics(config.topics.prefix)
        self._tp = TopicPartition(control_topic(config), 0)
        self._consumer = AIOKafkaConsumer(
            **_common(config), enable_auto_commit=False, auto_offset_reset="earliest"
        )
        self._pauses: dict[str, Pause] = {}
        self._next_offset = 0
        self._advanced = asyncio.Event()  # set whenever _next_offset moves
        self._following: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read every pause in force; follow the topic from then on."""
        if self._following is not None:
            raise RuntimeError("PauseBoard already started")
        await _ensure_topic(self._config)
        await self._consumer.start()
        self._consumer.assign([self._tp])
        await self._consumer.seek_to_beginning(self._tp)
        end = (await self._consumer.end_offsets([self._tp]))[self._tp]
        # Caught up before anything is consumed: a worker that starts while a
        # queue is paused must not call it even once.
        while self._next_offset < end:
            await self._poll()
        self._following = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._following is not None:
            self._following.cancel()
            await asyncio.gather(self._following, return_exceptions=True)
        await self._consumer.stop()

    def pauses(self) -> list[Pause]:
        return sorted(self._pauses.values(), key=lambda p: p.key)

    def covers(self, authority: str, queue: str) -> bool:
        """Whether calls of ``queue`` on ``authority`` are paused."""
        if not self._pauses:
            return False
        authority = normalise(authority)
        return (
            pause_key(authority, queue) in self._pauses
            or pause_key(authority, "") in self._pauses
        )

    def covers_topic(self, topic: str) -> bool:
        return bool(self._pauses) and self.covers(
            *self._topics.authority_and_queue(topic)
        )

    async def reached(self, offset: int, timeout_s: float) -> None:
        """Wait until the record at ``offset`` was read (and applied)."""
        async with asyncio.timeout(timeout_s):
            while self._next_offset <= offset:
                self._advanced.clear()
                await self._advanced.wait()

    async def _follow(self) -> None:
        while True:
            try:
                await self._poll()
            except KafkaError as exc:
                log.warning("cannot read %s: %s", self._tp.topic, exc)
                await asyncio.sleep(FOLLOW_BACKOFF_S)

    async def _poll(self) -> None:
        batches = await self._consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
        for records in batches.values():
            for record in records:
                self._apply(record)
                self._next_offset = record.offset + 1
        if not batches:
            # Compaction may leave the end past the last record.
            self._next_offset = max(
                self._next_offset, await self._consumer.position(self._tp)
            )
        self._advanced.set()

    def _apply(self, record: ConsumerRecord) -> None:
        key = (record.key or b"").decode("utf-8", "replace")
        if record.value is None:
            if self._pauses.pop(key, None) is not None:
                log.info("calls of %s resumed", key)
            return
        try:
            pause = msgspec.json.decode(record.value, type=Pause)
        except msgspec.DecodeError:
            log.warning("control record %s/%d unreadable, ignored", key, record.offset)
            return
        self._pauses[key] = pause
        log.info("calls of %s paused: %s", key, pause.reason or "no reason given")


class PauseWriter:
    """Writes pauses and resumes to the control topic."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._topic = control_topic(config)
        self._producer = AIOKafkaProducer(
            **_common(config), acks="all", enable_idempotence=True
        )

    async def start(self) -> None:
        await _ensure_topic(self._config)
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def pause(self, authority: str, queue: str, reason: str) -> tuple[Pause, int]:
        """Write a pause; it and its offset."""
        pause = Pause(
            authority=normalise(authority),
            queue=queue,
            reason=reason[:MAX_REASON_CHARS],
            since_ms=int(time.time() * 1000),
        )
        return pause, await self._send(pause.key, msgspec.json.encode(pause))

    async def resume(self, authority: str, queue: str) -> int:
        """Write the tombstone of a pause; its offset."""
        return await self._send(pause_key(normalise(authority), queue), None)

    async def _send(self, key: str, value: bytes | None) -> int:
        try:
            sent = await self._producer.send(self._topic, value, key=key.encode())
            written = await sent
        except KafkaError as exc:
            raise BrokerUnavailable(f"Kafka did not take the write: {exc}") from exc
        return int(written.offset)
