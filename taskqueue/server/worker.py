"""The worker: consume task topics of one tier and hand records to the lifecycle.

``--tier main`` consumes every main topic, ``--tier retry`` every ladder tier
topic; each tier is one consumer group, so both scale out by starting more
workers. The fetch loop never blocks on calls. While too many records are
pending, it asks Kafka only for the partitions whose queue has room, or waits
for room, so what aiokafka prefetched stays in its buffer (bounded per
partition) instead of being dropped and fetched again; it still polls now and
then so that the consumer stays in its group. A tier partition whose head is
not due yet, or whose queue an operator paused, is paused. Offsets are
committed per partition up to the lowest unfinished record; completions from
before a rebalance are ignored.
"""

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterable
from enum import StrEnum

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.coordinator.assignors.sticky.sticky_assignor import (
    StickyPartitionAssignor,
)
from aiokafka.errors import IllegalStateError, KafkaError

from taskqueue.server.config import Config
from taskqueue.server.control import PauseBoard
from taskqueue.server.dispatcher import Dispatcher
from taskqueue.server.kafka import KafkaWriter
from taskqueue.server.ladder import Ladder
from taskqueue.server.lifecycle import Job, Lifecycle, Taken
from taskqueue.server.metrics import Metrics
from taskqueue.server.record import read_headers
from taskqueue.server.topics import Topics, tier_of
from taskqueue.server.tracker import OffsetTracker

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 100
# A tier partition resumes this long before its head is eligible; the record
# then waits on a precise timer, so fetch latency never makes a call late.
PREFETCH_S = 0.5
# While nothing can be taken, the loop still polls (everything paused) at
# least this often, and never less often than a tenth of max.poll.interval.
KEEPALIVE_POLL_S = 1.0
# A full worker wakes again once this share of a limit is free: taking
# records one by one would cost a loop turn per record.
REFILL_SHARE = 10
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
    def __init__(
        self, config: Config, tier: TierName, metrics: Metrics | None = None
    ) -> None:
        self._config = config
        self._tier = tier
        self._topics = Topics(config.topics.prefix)
        self._ladder = Ladder(config.topics.tiers)
        self._writer = KafkaWriter(config)
        self._dispatcher = Dispatcher.from_config(config)
        self.metrics = metrics or Metrics()
        # Queues and authorities an operator paused (taskqueue.admin.Admin).
        self._pauses = PauseBoard(config)
        self._lifecycle = Lifecycle(
            config,
            self._writer,
            self._dispatcher,
            metrics=self.metrics,
            pauses=self._pauses,
        )
        self._consumer = self._make_consumer()
        self._parts: dict[TopicPartition, _Partition] = {}
        # Revoked partitions, until the next assignment says if they return.
        self._set_aside: dict[TopicPartition, _Partition] = {}
        self._dropping: set[asyncio.Task[None]] = set()
        # Jobs alive per topic: what the worker holds in memory.
        self._live: Counter[str] = Counter()
        self._live_bytes = 0
        self._live_bytes_of: Counter[str] = Counter()
        self._room_freed = asyncio.Event()
        self._last_poll_s = time.monotonic()
        self._stopping = asyncio.Event()
        self._started = False
        # Rebalances this worker went through (assignments received).
        self.assignments = 0
        # When a record was last taken or finished: the health probe's measure
        # of a stuck consumer.
        self._progress_s = time.monotonic()

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
            session_timeout_ms=int(worker.session_timeout_s * 1000),
            # Partitions stay where they were across rebalances when they can,
            # so a new queue does not move every other queue's work around.
            partition_assignment_strategy=(StickyPartitionAssignor,),
            heartbeat_interval_ms=int(worker.session_timeout_s * 1000 / 3),
            request_timeout_ms=int(kafka.request_timeout_s * 1000) + 30_000,
        )

    def pending(self) -> int:
        """Records taken from Kafka whose job is still alive."""
        return self._live.total()

    def waiting_partitions(self) -> list[TopicPartition]:
        """Partitions paused until their head record is due."""
        return [p.tp for p in self._parts.values() if p.resume_at is not None]

    def assigned_partitions(self) -> list[TopicPartition]:
        return list(self._parts)

    def held_partitions(self) -> list[TopicPartition]:
        """Partitions of queues an operator paused."""
        return [tp for tp in self._parts if self._pauses.covers_topic(tp.topic)]

    def idle_s(self) -> float:
        """Seconds since a record was taken or finished, or partitions assigned."""
        return time.monotonic() - self._progress_s

    async def lag(self) -> dict[TopicPartition, int]:
        """Records not finished yet per assigned partition (asks the broker)."""
        tps = [tp for tp in self._parts if tp in self._consumer.assignment()]
        if not tps:
            return {}
        ends = await self._consumer.end_offsets(tps)
        lag = {}
        for tp, end in ends.items():
            part = self._parts.get(tp)
            start = part.tracker.committable() if part is not None else None
            try:
                if start is None:  # nothing taken since it was assigned
                    start = await self._consumer.position(tp)
            except IllegalStateError:
                continue  # revoked meanwhile
            lag[tp] = max(0, end - start)
        return lag

    def stop(self) -> None:
        """Ask ``run`` to finish in-flight work, commit and return."""
        self._stopping.set()

    async def run(self) -> None:
        if self._started:
            raise RuntimeError("a Worker runs once")
        self._started = True

        try:
            await self._writer.start()
            await self._pauses.start()  # before any record is taken
            await self._consumer.start()
            try:
                await self._consume()
            finally:
                await self._shut_down()
        finally:
            await self._consumer.stop()  # again after _shut_down: a no-op then
            await self._pauses.stop()
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
            for tp, records in (await self._poll()).items():
                self._take(tp, records)
            if time.monotonic() >= next_commit:
                await self._commit()
                next_commit = time.monotonic() + commit_every_s

    async def _poll(self) -> dict[TopicPartition, list[ConsumerRecord]]:
        batches: dict[TopicPartition, list[ConsumerRecord]]
        takeable = self._takeable()
        if takeable or not self._parts:
            self._last_poll_s = time.monotonic()
            batches = await self._consumer.getmany(
                *takeable,
                timeout_ms=POLL_TIMEOUT_MS,
                max_records=self._batch_size(takeable),
            )
            return batches

        self._room_freed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room_freed.wait(), POLL_TIMEOUT_MS / 1000)
        if time.monotonic() - self._last_poll_s < self._keepalive_s():
            return {}

        # Still full: poll with everything paused, so that the group does not
        # take this worker for dead. Only a partition assigned meanwhile can
        # hand over records; ``_take`` seeks back what it has no room for. The
        # next turn resumes the rest (their prefetched data is dropped, which
        # is fine this seldom).
        self._consumer.pause(*self._consumer.assignment())
        self._last_poll_s = time.monotonic()
        batches = await self._consumer.getmany(timeout_ms=0)
        return batches

    def _keepalive_s(self) -> float:
        return min(KEEPALIVE_POLL_S, self._config.worker.max_poll_interval_s / 10)

    def _takeable(self) -> list[TopicPartition]:
        """Assigned partitions that may hand over records now."""
        if self._full():
            return []
        assigned = self._consumer.assignment()
        return [
            part.tp
            for part in self._parts.values()
            if part.tp in assigned
            and part.resume_at is None
            and not self._pauses.covers_topic(part.tp.topic)
            and not self._queue_full(part.tp.topic)
        ]

    def _room(self) -> int:
        return self._config.worker.max_pending - self._live.total()

    def _batch_size(self, takeable: list[TopicPartition]) -> int:
        """Records to ask for: no more than there is room for, so that few
        are handed back (a seek back drops the partition's prefetched data).
        The roomiest queue sets it: sized by the fullest, a queue hovering at
        its limit would have every poll bring a record or two, for all queues
        alike (measured by bench/isolation.py)."""
        per_queue = self._config.worker.max_pending_per_queue
        topics = {tp.topic for tp in takeable}
        queue_room = max((per_queue - self._live[t] for t in topics), default=per_queue)
        return max(1, min(self._room(), queue_room))

    def _refill(self, topic: str, was_full: bool) -> None:
        """Wake a full poll loop once enough room is free to take a batch:
        in ``topic``'s queue, or anywhere when the worker itself was full."""
        worker = self._config.worker
        if self._room() < max(1, worker.max_pending // REFILL_SHARE):
            return
        if self._bytes_full():
            return
        queue_room = worker.max_pending_per_queue - self._live[topic]
        if was_full or (
            queue_room >= max(1, worker.max_pending_per_queue // REFILL_SHARE)
            and not self._queue_bytes_full(topic)
        ):
            self._room_freed.set()

    def _full(self) -> bool:
        return self._room() <= 0 or self._bytes_full()

    def _bytes_full(self) -> bool:
        return self._live_bytes >= self._config.worker.max_pending_bytes

    def _queue_bytes_full(self, topic: str) -> bool:
        limit = self._config.worker.max_pending_bytes_per_queue
        return self._live_bytes_of[topic] >= limit

    def _queue_full(self, topic: str) -> bool:
        full = self._live[topic] >= self._config.worker.max_pending_per_queue
        return full or self._queue_bytes_full(topic)

    def _apply_backpressure(self) -> None:
        """Pause what must wait for its head's due time or for an operator;
        resume the rest. A full queue is not paused: ``_poll`` leaves it out."""
        assigned = self._consumer.assignment()
        for part in self._parts.values():
            if part.tp not in assigned:
                continue  # a rebalance is under way
            waiting = part.resume_at is not None
            if waiting or self._pauses.covers_topic(part.tp.topic):
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
            if (
                self._bytes_full()
                or self._queue_full(tp.topic)
                or (self._pauses.covers_topic(tp.topic))
            ):
                # Taken when there is room, or when an operator resumes it.
                self._consumer.seek(tp, record.offset)
                return
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
        self._room_freed.set()  # a poll loop waiting for room can take it now
        if not part.lost and part.tp in self._consumer.assignment():
            self._consumer.resume(part.tp)
            log.info("partition %s resumed", part.tp)

    def _start(self, part: _Partition, record: ConsumerRecord) -> None:
        log.debug("took %s/%d", part.tp, record.offset)
        part.tracker.take(record.offset)
        self._progress_s = time.monotonic()
        taken = Taken(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp,
            value=record.value,
            headers=read_headers(record.headers),
            key=record.key,
        )

        async def claim() -> bool:
            return await self._claim(part, record.offset)

        job = Job(taken, claim)
        running = asyncio.create_task(self._lifecycle.process(job))
        part.jobs[running] = job
        size = len(record.value or b"")
        self._live[part.tp.topic] += 1
        self._live_bytes += size
        self._live_bytes_of[part.tp.topic] += size
        running.add_done_callback(
            lambda done: self._finished(part, record.offset, done)
        )

    def _finished(
        self, part: _Partition, offset: int, done: asyncio.Task[bool]
    ) -> None:
        job = part.jobs.pop(done)
        was_full = self._full()
        size = len(job.taken.value or b"")
        self._live[part.tp.topic] -= 1
        self._live_bytes -= size
        self._live_bytes_of[part.tp.topic] -= size
        self._refill(part.tp.topic, was_full)
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
            self._progress_s = time.monotonic()

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
        if part.lost or part.tp not in self._consumer.assignment():
            return False
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

    async def _revoked(self, tps: Iterable[TopicPartition]) -> None:
        """Commit what is finished and set the partitions aside.

        Jobs go on meanwhile: with eager rebalancing every new queue revokes
        everything, and most partitions come straight back to the same worker,
        which then carries on where it was instead of calling again.
        """
        for tp in tps:
            part = self._parts.pop(tp, None)
            if part is None:
                continue
            self._stop_waiting_for_head(part)
            await self._commit_partition(part)
            self._set_aside[tp] = part
        log.info("revoked %s", sorted(str(tp) for tp in tps))

    def _assigned(self, tps: Iterable[TopicPartition]) -> None:
        self.assignments += 1
        self._progress_s = time.monotonic()  # new partitions get time to start
        for tp in tps:
            part = self._set_aside.pop(tp, None)
            if part is None:
                part = _Partition(tp)
            elif (resume_from := part.tracker.next_offset) is not None:
                self._consumer.seek(tp, resume_from)
            self._parts[tp] = part

        gone = list(self._set_aside.values())
        self._set_aside.clear()
        if gone:
            dropping = asyncio.create_task(self._drop(gone))
            self._dropping.add(dropping)
            dropping.add_done_callback(self._dropping.discard)
        log.info("assigned %s", sorted(str(tp) for tp in tps))

    async def _drop(self, parts: list[_Partition]) -> None:
        """Partitions another worker now owns: their new owner reads again
        whatever is unfinished here, so stop it (calls under way may finish)."""
        for part in parts:
            part.lost = True
        await self._stop_jobs(parts, REVOKE_WAIT_S)

    def _stop_waiting_for_head(self, part: _Partition) -> None:
        if part.resume_at is not None:
            part.resume_at.cancel()
            part.resume_at = None

    async def _stop_jobs(self, parts: list[_Partition], wait_s: float) -> None:
        """Interrupt what only waits, give calls ``wait_s``, cancel the rest."""
        running = [task for part in parts for task in part.jobs]
        for part in parts:
            for job in part.jobs.values():
                job.interrupt()
        if running:
            await asyncio.wait(running, timeout=wait_s)
        for task in running:
            task.cancel()

    async def _shut_down(self) -> None:
        parts = list(self._parts.values())
        self._consumer.pause(*self._consumer.assignment())
        for part in parts:
            self._stop_waiting_for_head(part)
        await self._stop_jobs(
            [*parts, *self._set_aside.values()], self._config.worker.shutdown_grace_s
        )
        await self._commit()
        self._parts.clear()
        await asyncio.gather(*self._dropping)
        await self._consumer.stop()
        log.info("worker for tier %s stopped", self._tier)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._worker._revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._worker._assigned(assigned)
