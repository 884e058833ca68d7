"""Writing task records to Kafka, and creating the topics they go to.

Topics are created explicitly (not left to the broker's auto-creation) so that
each kind gets its partitions and retention: a tier topic keeps records at
least its delay plus a grace period, whatever the broker's default retention.
"""

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from taskqueue.server.config import Config
from taskqueue.server.errors import BrokerUnavailable, TopicRefused
from taskqueue.server.ladder import Ladder
from taskqueue.server.record import Headers
from taskqueue.server.topics import DLQ, base_of, tier_of

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36
INVALID_TOPIC = 17


@dataclass(frozen=True, slots=True)
class Written:
    topic: str
    partition: int
    offset: int


class KafkaWriter:
    """An idempotent, acks=all producer plus topic creation on first use."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._ladder = Ladder(config.topics.tiers)
        common: dict[str, Any] = {
            "bootstrap_servers": config.kafka.bootstrap_servers,
            "client_id": config.kafka.client_id,
            "request_timeout_ms": int(config.kafka.request_timeout_s * 1000),
        }
        self._producer = AIOKafkaProducer(
            **common,
            acks="all",
            enable_idempotence=True,
            # No added wait: concurrent adds still share batches, since records
            # pile up while the previous request to a partition is in flight.
            linger_ms=0,
            max_request_size=config.rpc.max_message_bytes + 64 * 1024,
        )
        self._admin = AIOKafkaAdminClient(**common)
        self._known: set[str] = set()
        self._creating: dict[str, asyncio.Future[None]] = {}
        self._started = False

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("KafkaWriter already started")
        self._started = True
        try:
            await self._producer.start()
            await self._admin.start()
        except BaseException:
            await self.stop()  # a half-started client still holds sockets
            raise

    async def stop(self) -> None:
        await self._producer.stop()
        await self._admin.close()

    async def ping(self, timeout_s: float) -> bool:
        """Whether a broker answers a metadata request within ``timeout_s``.

        Asked of a broker each time, never answered from cached metadata, so
        it fails as soon as the cluster is unreachable.
        """
        try:
            async with asyncio.timeout(timeout_s):
                await self._admin.describe_cluster()
        except (KafkaError, OSError, TimeoutError) as exc:
            log.debug("broker probe failed: %r", exc)
            return False
        return True

    async def write(
        self,
        topic: str,
        *,
        key: bytes,
        value: bytes,
        headers: Headers,
        timestamp_ms: int,
    ) -> Written:
        """Write one record and wait until Kafka acknowledged it."""
        try:
            await self.ensure_queue(base_of(topic))
            sent = await self._producer.send(
                topic, value, key=key, headers=headers, timestamp_ms=timestamp_ms
            )
            meta = await sent
        except KafkaError as exc:
            raise BrokerUnavailable(f"Kafka did not take the write: {exc}") from exc
        return Written(meta.topic, meta.partition, meta.offset)

    async def ensure_queue(self, main_topic: str) -> None:
        """Create a queue's main, tier and dead-letter topics in one request.

        Creating the tiers with the queue lets retry workers discover them
        before the first retry is written to one.
        """
        if main_topic in self._known:
            return
        pending = self._creating.get(main_topic)
        if pending is None:
            pending = asyncio.ensure_future(self._create(self._family(main_topic)))
            self._creating[main_topic] = pending
            pending.add_done_callback(lambda _: self._creating.pop(main_topic, None))
        await asyncio.shield(pending)
        self._known.add(main_topic)

    def _family(self, main_topic: str) -> list[str]:
        tiers = [f"{main_topic}.{tier.name}" for tier in self._ladder.tiers]
        return [main_topic, *tiers, f"{main_topic}.{DLQ}"]

    async def _create(self, topics: list[str]) -> None:
        partitions = self._config.kafka.partitions
        replication = self._config.kafka.replication_factor
        new = [
            NewTopic(t, partitions, replication, topic_configs=self._topic_configs(t))
            for t in topics
        ]
        response = await self._admin.create_topics(new)
        for name, code, *message in response.topic_errors:
            if code == INVALID_TOPIC:
                # Kafka's message names the topic it collides with.
                detail = message[0] if message else "invalid topic name"
                raise TopicRefused(f"Kafka refused topic {name}: {detail}")
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise BrokerUnavailable(f"cannot create topic {name}: {code} {message}")
        log.info("topics of %s are ready", topics[0])

    def _topic_configs(self, topic: str) -> dict[str, str]:
        tier = tier_of(topic)
        if tier is None:
            return {}
        if tier == DLQ:
            retention_s = self._config.topics.dlq_retention_s
            return {"retention.ms": str(int(retention_s * 1000))}
        retention_s = self._ladder.delay_s(tier) + self._config.topics.tier_grace_s
        return {
            "retention.ms": str(int(retention_s * 1000)),
            # The broker stamps each record as it appends it, so a writer's
            # clock (skewed, or set ahead on purpose) cannot hold a tier
            # partition paused behind one record; eligibility stays in order.
            "message.timestamp.type": "LogAppendTime",
        }
