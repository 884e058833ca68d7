"""The worker: consume task topics of one tier and hand records to the lifecycle.

``--tier main`` consumes every main topic, ``--tier retry`` every ladder tier
topic; each tier is one consumer group, so both scale out by starting more
workers. The fetch loop never blocks on calls: it keeps polling (so the
consumer stays in its group) and applies backpressure by pausing partitions,
both while too many records are pending and while a tier partition's head is
not due yet. Offsets are committed per partition up to the lowest unfinished
record; completions from before a rebalance are ignored.
"""

import asyncio
import logging
import time
from collections.abc import Iterable
from enum import StrEnum

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from taskqueue.server.config import Config
from taskqueue.server.dispatcher import Dispatcher
from taskqueue.server.kafka import KafkaWriter
from taskqueue.server.ladder import Ladder
from taskqueue.server.lifecycle import Job, Lifecycle, Taken
from taskqueue.server.topics import Topics, tier_of
from taskqueue.server.tracker import OffsetTracker

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 100
# A tier partition resumes this long before its head is eligible; the record
# then waits on a precise timer, so fetch latency never makes a call late.
PREFETCH_S = 0.5
REVOKE_WAIT_S = 5.0


class TierName(StrEnum):
    MAIN = "main"
    RETRY = "retry"


class _Partition:
    """What the worker holds for one assigned partition."""

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.tracker = OffsetTracker()
        self.committed: int | None = None
        self.jobs: dict[asyncio.Task[bool], Job] = {}
        self.resume_at: asyncio.TimerHandle | None = None
        self.lost = False


class Worker:
    def __init__(self, config: Config, tier: TierName) -> None:
        self._config = config
        self._tier = tier
        self._topics = Topics(config.topics.prefix)
        self._ladder = Ladder(config.topics.tiers)
        self._writer = KafkaWriter(config)
        self._dispatcher = Dispatcher(config.worker.channel_cache_size)
        self._lifecycle = Lifecycle(config, self._writer, self._dispatcher)
        self._consumer = self._make_consumer()
        self._parts: dict[TopicPartition, _Partition] = {}
        self._stopping = asyncio.Event()
        self._started = False

    def _make_consumer(self) -> AIOKafkaConsumer:
        kafka, worker = self._config.kafka, self._config.worker
        return AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap_servers,
            client_id=f"{kafka.client_id}-{self._tier}",
            group_id=f"{worker.group_prefix}-{self._tier}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            metadata_max_age_ms=int(kafka.metadata_max_age_s * 1000),
            max_poll_interval_ms=int(worker.max_poll_interval_s * 1000),
            request_timeout_ms=int(kafka.request_timeout_s * 1000) + 30_000,
        )

    def waiting_partitions(self) -> list[TopicPartition]:
        """Partitions paused until their head record is due."""
        return [p.tp for p in self._parts.values() if p.resume_at is not None]

    def stop(self) -> None:
        """Ask ``run`` to finish in-flight work, commit and return."""
        self._stopping.set()

    async def run(self) -> None:
        if self._started:
            raise RuntimeError("a Worker runs once")
        self._started = True

        await self._writer.start()
        try:
            await self._consumer.start()
            try:
                await self._consume()
            finally:
                await self._shut_down()
        finally:
            await self._dispatcher.close()
            await self._writer.stop()

    async def _consume(self) -> None:
        pattern = (
            self._topics.main_pattern()
            if self._tier is TierName.MAIN
            else self._topics.tier_pattern()
        )
        self._consumer.subscribe(pattern=pattern, listener=_Listener(self))
        log.info("worker for tier %s consuming topics matching %s", self._tier, pattern)
        commit_every_s = self._config.worker.commit_interval_s
        next_commit = time.monotonic() + commit_every_s

        while not self._stopping.is_set():
            self._apply_backpressure()
            batches = await self._consumer.getmany(
                timeout_ms=POLL_TIMEOUT_MS, max_records=max(1, self._room())
            )
            for tp, records in batches.items():
                self._take(tp, records)
            if time.monotonic() >= next_commit:
                await self._commit()
                next_commit = time.monotonic() + commit_every_s

    def _room(self) -> int:
        pending = sum(p.tracker.pending for p in self._parts.values())
        return self._config.worker.max_pending - pending

    def _apply_backpressure(self) -> None:
        """Pause what must wait; resume the rest."""
        full = self._room() <= 0
        assigned = self._consumer.assignment()
        for part in self._parts.values():
            if part.tp not in assigned:
                continue  # a rebalance is under way
            if full or part.resume_at is not None:
                self._consumer.pause(part.tp)
            else:
                self._consumer.resume(part.tp)

    def _take(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        part = self._parts.get(tp)
        if part is None:
            return  # revoked meanwhile; its new owner reads these again
        if part.resume_at is not None:
            self._consumer.seek(tp, records[0].offset)  # not ours to take yet
            return
        delay_s = self._ladder.delay_s(tier_of(tp.topic))
        now_s = time.time()

        for record in records:
            eligible_s = record.timestamp / 1000 + delay_s
            if eligible_s - now_s > PREFETCH_S:
                self._wait_for_head(
                    part, record.offset, eligible_s - PREFETCH_S - now_s
                )
                return
            self._start(part, record)

    def _wait_for_head(self, part: _Partition, offset: int, wait_s: float) -> None:
        self._consumer.seek(part.tp, offset)
        self._consumer.pause(part.tp)
        loop = asyncio.get_running_loop()
        part.resume_at = loop.call_later(wait_s, self._head_due, part)
        log.info(
            "partition %s paused %.1fs until offset %d is due", part.tp, wait_s, offset
        )

    def _head_due(self, part: _Partition) -> None:
        part.resume_at = None
        if not part.lost and part.tp in self._consumer.assignment():
            self._consumer.resume(part.tp)
            log.info("partition %s resumed", part.tp)

    def _start(self, part: _Partition, record: ConsumerRecord) -> None:
        log.debug("took %s/%d", part.tp, record.offset)
        part.tracker.take(record.offset)
        taken = Taken(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp,
            value=record.value,
            headers=list(record.headers),
        )

        async def claim() -> bool:
            return await self._claim(part, record.offset)

        job = Job(taken, claim)
        running = asyncio.create_task(self._lifecycle.process(job))
        part.jobs[running] = job
        running.add_done_callback(
            lambda done: self._finished(part, record.offset, done)
        )

    def _finished(
        self, part: _Partition, offset: int, done: asyncio.Task[bool]
    ) -> None:
        part.jobs.pop(done, None)
        if done.cancelled():
            return  # shutdown or revoke: left unfinished, read again later
        if done.exception() is not None:
            # A bug, not a task's failure: keep the record rather than lose it.
            log.error(
                "record %s/%d left unfinished: %r", part.tp, offset, done.exception()
            )
            return
        if done.result() and not part.lost:
            part.tracker.finish(offset)

    async def _claim(self, part: _Partition, offset: int) -> bool:
        """At-most-once: commit through ``offset`` before its call is made."""
        part.tracker.finish(offset)
        await part.tracker.reached(offset + 1)
        if part.lost:
            return False
        return await self._commit_partition(part)

    async def _commit(self) -> None:
        for part in list(self._parts.values()):
            await self._commit_partition(part)

    async def _commit_partition(self, part: _Partition) -> bool:
        offset = part.tracker.committable()
        if offset is None or (part.committed is not None and offset <= part.committed):
            return True
        try:
            await self._consumer.commit({part.tp: offset})
        except KafkaError as exc:
            log.warning("commit of %s at %d failed: %s", part.tp, offset, exc)
            return False
        part.committed = offset
        return True

    def _assigned(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._parts[tp] = _Partition(tp)
        log.info("assigned %s", sorted(str(tp) for tp in tps))

    async def _revoked(self, tps: Iterable[TopicPartition]) -> None:
        parts = [self._parts.pop(tp) for tp in tps if tp in self._parts]
        await self._release(parts, REVOKE_WAIT_S)
        log.info("revoked %s", sorted(str(p.tp) for p in parts))

    async def _release(self, parts: list[_Partition], wait_s: float) -> None:
        """Give partitions back: finish what can be finished, commit, forget."""
        for part in parts:
            if part.resume_at is not None:
                part.resume_at.cancel()
                part.resume_at = None
        running = [task for part in parts for task in part.jobs]
        for part in parts:
            for job in part.jobs.values():
                job.interrupt()  # those that only wait stop at once
        if running:
            await asyncio.wait(running, timeout=wait_s)
        for part in parts:
            await self._commit_partition(part)
            part.lost = True
            for task in part.jobs:
                task.cancel()

    async def _shut_down(self) -> None:
        parts = list(self._parts.values())
        self._parts.clear()
        self._consumer.pause(*self._consumer.assignment())
        await self._release(parts, self._config.worker.shutdown_grace_s)
        await self._consumer.stop()
        log.info("worker for tier %s stopped", self._tier)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._worker._revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._worker._assigned(assigned)
