"""What happens to one task record taken from Kafka.

Decode it; if it is due later, route it onward on the ladder or wait for it
with a timer; make the call; on failure retry (in place when the next attempt
is closer than the smallest tier, else through a tier topic) or dead-letter
it. The caller (the worker) marks the record finished when ``process``
returns; a write that Kafka refuses is retried, never skipped, so a record is
finished only once its successor is safely stored.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec

from taskqueue.protobuf.service_pb2 import AT_MOST_ONCE, Task
from taskqueue.server import validation
from taskqueue.server.allowlist import Allowlist
from taskqueue.server.config import Config
from taskqueue.server.control import PauseBoard
from taskqueue.server.dispatcher import Call, Dispatcher
from taskqueue.server.errors import BadRecord, BrokerUnavailable, InvalidTask
from taskqueue.server.flow import FlowControl
from taskqueue.server.kafka import KafkaWriter
from taskqueue.server.ladder import Ladder
from taskqueue.server.logs import TaskEvent, task_event
from taskqueue.server.metrics import IN_PLACE, MAIN, Metrics
from taskqueue.server.policy import Failure, GiveUp, Policy
from taskqueue.server.record import (
    Headers,
    State,
    decode_task,
    encode_task,
    from_headers,
    header_name,
    in_range_ms,
    to_headers,
)
from taskqueue.server.topics import DLQ, Topics, base_of, tier_of

log = logging.getLogger(__name__)

Clock = Callable[[], float]
# Commits through the record before an at-most-once call; False: not ours now.
Claim = Callable[[], Awaitable[bool]]


class Interrupted(Exception):
    """The worker took the job back (shutdown or rebalance) while it waited."""


WRITE_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
# How often a record held by an operator's pause looks again.
PAUSE_CHECK_S = 0.2
# Routes (authority, method, queue, topic) whose checks passed, kept at most.
MAX_ROUTES_KEPT = 4096


@dataclass(frozen=True, slots=True)
class Taken:
    """A record as the worker took it from Kafka."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    value: bytes | None
    headers: Headers
    key: bytes | None = None

    @property
    def where(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


@dataclass(eq=False, slots=True)
class Job:
    """One taken record on its way through the lifecycle.

    ``interrupt()`` stops the job wherever it only waits (for its due time, a
    call slot or a write retry), leaving its record unfinished so that it is
    read again; calls and writes under way are left to complete.
    """

    taken: Taken
    claim: Claim
    interrupted: asyncio.Event = field(default_factory=asyncio.Event)
    # An at-most-once record committed before its call: nothing would read it
    # again, so from then on it is not interrupted (only the grace ends it).
    claimed: bool = False

    def interrupt(self) -> None:
        self.interrupted.set()

    @property
    def stopping(self) -> bool:
        return self.interrupted.is_set() and not self.claimed

    async def wait(self, seconds: float) -> None:
        """Sleep, unless interrupted first."""
        if self.claimed:
            await asyncio.sleep(seconds)
            return
        if self.interrupted.is_set():
            raise Interrupted
        try:
            async with asyncio.timeout(seconds):
                await self.interrupted.wait()
        except TimeoutError:
            return
        raise Interrupted


class Lifecycle:
    def __init__(
        self,
        config: Config,
        writer: KafkaWriter,
        dispatcher: Dispatcher,
        clock: Clock = time.time,
        *,
        metrics: Metrics | None = None,
        pauses: PauseBoard | None = None,
    ) -> None:
        self._config = config
        self._metrics = metrics or Metrics()
        self._pauses = pauses
        self._writer = writer
        self._dispatcher = dispatcher
        self._clock = clock
        self._topics = Topics(config.topics.prefix)
        self._ladder = Ladder(config.topics.tiers)
        self._allowlist = Allowlist(config.allow)
        self._flow = FlowControl(config)
        self._routes_ok: set[tuple[str, str, str, str]] = set()

    async def process(self, job: Job) -> bool:
        """Take the job as far as it goes; True when its record is finished."""
        try:
            await self._process(job)
        except Interrupted:
            return False
        except Exception as exc:
            # A record that breaks the lifecycle would otherwise stay
            # unfinished and hold its partition's commit back for good.
            log.exception("record %s cannot be processed", job.taken.where)
            await self._dead_letter_raw(job, f"cannot be processed: {exc!r}"[:500])
        return True

    async def _process(self, job: Job) -> None:
        taken = job.taken
        try:
            task = decode_task(taken.value)
            state = from_headers(taken.headers)
            self._check_record(task, state, taken)
        except BadRecord as exc:
            await self._dead_letter_raw(job, str(exc))
            return

        if state.origin is None:
            state = _replace(state, origin=taken.where)
        await self._run(job, task, state)

    def _check_record(self, task: Task, state: State, taken: Taken) -> None:
        """What `add` checked, again: records can be written by anyone who may
        write to the topic, and a bad one must not reach a call or a topic
        name."""
        try:
            self._check_route(task, taken.topic)
            validation.check_metadata(task)
        except InvalidTask as exc:
            raise BadRecord(str(exc)) from None
        if not in_range_ms(state.due_ms):
            # Never due: it would ride the ladder for good, or fail to say
            # when it was due in the call's metadata.
            raise BadRecord(
                f"header {header_name('due_ms')} is out of range (years 1 to 9999)"
            )

    def _check_route(self, task: Task, topic: str) -> None:
        """The task's authority, method and queue, checked against its topic.

        A topic's tasks share these, so each verdict is kept (a bounded set of
        those that passed): the regexes would cost every record again.
        """
        route = (task.authority, task.method, task.queue, topic)
        if route in self._routes_ok:
            return
        validation.check_authority(task.authority)
        validation.check_method(task.method)
        if self._topics.main(task.authority, task.queue) != base_of(topic):
            raise InvalidTask("the task's authority and queue are not its topic's")
        if len(self._routes_ok) >= MAX_ROUTES_KEPT:
            self._routes_ok.clear()
        self._routes_ok.add(route)

    async def _run(self, job: Job, task: Task, state: State) -> None:
        # A retry picks its tier by the planned delay: recomputing it from the
        # clock a moment later would come out a hair short of the tier.
        wait_s = state.due_ms / 1000 - self._clock()
        while True:
            if await self._routed_onward(job, task, state, wait_s):
                return
            await self._sleep_until(job, state.due_ms)
            await self._while_paused(job, task)

            if not self._allowlist.allows(task.authority, task.method):
                reason = f"authority {task.authority} is not allowed"
                await self._dead_letter(job, task, state, reason)
                return
            if task.delivery == AT_MOST_ONCE:
                await self._call_once(job, task, state)
                return

            failure = await self._call(job, task, state)
            if failure is None:
                return
            state = self._after_attempt(state, failure)
            retry = await self._retry_or_give_up(job, task, state, failure)
            if retry is None:
                return
            state, wait_s = retry

    async def _routed_onward(
        self, job: Job, task: Task, state: State, wait_s: float
    ) -> bool:
        """Put the task on the ladder when its due time is a tier or more away."""
        tier = self._ladder.tier_for(wait_s)
        if tier is None:
            return False
        topic = self._topics.tier(task.authority, task.queue, tier.name)
        await self._write(job, topic, task, state)
        log.debug("task %s routed to %s", state.id, tier.name)
        return True

    async def _call_once(self, job: Job, task: Task, state: State) -> None:
        if not await job.claim():
            log.warning("task %s not called: its partition was taken away", state.id)
            return
        job.claimed = True
        failure = await self._call(job, task, state)
        if failure is not None:
            event = _event(job, task, state.id, state.attempt + 1)
            # At-most-once: never retried, whatever the status.
            task_event(
                log, logging.WARNING, "failed", event, status=failure.status.name
            )

    async def _call(self, job: Job, task: Task, state: State) -> Failure | None:
        attempt = state.attempt + 1
        call = Call(
            authority=task.authority,
            method=task.method,
            body=task.argument.value,
            metadata=self._metadata(task, state, attempt),
            deadline_s=self._deadline_s(task),
        )
        async with self._flow.call(task.authority, job) as gate:
            if job.stopping:
                raise Interrupted  # waited for a slot through a shutdown
            log.debug("calling task %s attempt=%d", state.id, attempt)
            failure = await self._metrics.timed_call(
                self._dispatcher.call(call),
                task.authority,
                task.method,
                tier=tier_of(job.taken.topic) or MAIN,
                late_s=self._clock() - state.due_ms / 1000,
            )
            gate.record(task.authority, failure.status if failure else None)

        if failure is None and log.isEnabledFor(logging.INFO):
            task_event(
                log, logging.INFO, "succeeded", _event(job, task, state.id, attempt)
            )
        return failure

    async def _retry_or_give_up(
        self, job: Job, task: Task, state: State, failure: Failure
    ) -> tuple[State, float] | None:
        """The next attempt and the wait before it; None when finished with."""
        policy = Policy.for_task(task, self._config.queue(task.queue))
        age_s = self._clock() - state.added_ms / 1000
        decision = policy.decide(failure, state.attempt, age_s)
        if isinstance(decision, GiveUp):
            await self._dead_letter(job, task, state, decision.reason)
            return None

        tier = self._ladder.tier_for(decision.delay_s)
        self._metrics.retried(tier.name if tier else IN_PLACE)
        due_ms = int((self._clock() + decision.delay_s) * 1000)
        task_event(
            log,
            logging.INFO,
            "retrying",
            _event(job, task, state.id, state.attempt),
            status=failure.status.name,
            delay_s=round(decision.delay_s, 3),
            next_tier=tier.name if tier else IN_PLACE,
        )
        return _replace(state, due_ms=due_ms), decision.delay_s

    def _after_attempt(self, state: State, failure: Failure) -> State:
        now_ms = int(self._clock() * 1000)
        return _replace(
            state,
            attempt=state.attempt + 1,
            first_attempt_ms=state.first_attempt_ms or now_ms,
            last_attempt_ms=now_ms,
            last_status=failure.status.name,
            last_message=failure.message,
        )

    async def _dead_letter(
        self, job: Job, task: Task, state: State, reason: str
    ) -> None:
        state = _replace(state, reason=reason)
        dlq = self._topics.dlq(task.authority, task.queue)
        await self._write(job, dlq, task, state)
        self._metrics.dead_lettered(task.authority, task.queue)
        event = _event(job, task, state.id, state.attempt)
        task_event(log, logging.WARNING, "dead-lettered", event, reason=reason)

    async def _dead_letter_raw(self, job: Job, reason: str) -> None:
        """Park a record we cannot use, byte for byte, with the reason.

        Its own key and headers are kept: the key is how the writer meant the
        record to be found and partitioned, and a task whose headers can be
        read (one refused for its due time or its authority, say) stays
        readable to ``taskqueue dlq show`` and can be replayed."""
        taken = job.taken
        ours = (header_name("reason"), header_name("origin"))
        headers = [h for h in taken.headers if h[0] not in ours]
        origin = dict(taken.headers).get(ours[1]) or taken.where.encode()
        headers.append((ours[0], reason.encode()))
        headers.append((ours[1], origin))
        topic = f"{base_of(taken.topic)}.{DLQ}"
        # Keyless (another client wrote it): the task id, when it has one.
        key = taken.key or dict(taken.headers).get(header_name("id")) or b""
        await self._write_raw(job, topic, taken.value or b"", headers, key=key)
        self._metrics.dead_lettered(*self._topics.authority_and_queue(taken.topic))
        log.warning("record %s dead-lettered: %s", taken.where, reason)

    async def _write(self, job: Job, topic: str, task: Task, state: State) -> None:
        await self._write_raw(
            job, topic, encode_task(task), to_headers(state), key=state.id.encode()
        )

    async def _write_raw(
        self, job: Job, topic: str, value: bytes, headers: Headers, key: bytes
    ) -> None:
        """Write until Kafka takes it; the source stays uncommitted meanwhile."""
        for attempt in range(1_000_000):
            try:
                await self._writer.write(
                    topic,
                    key=key,
                    value=value,
                    headers=headers,
                    timestamp_ms=int(self._clock() * 1000),
                )
                return
            except BrokerUnavailable as exc:
                delay_s = WRITE_BACKOFF_S[min(attempt, len(WRITE_BACKOFF_S) - 1)]
                log.warning("write to %s failed, again in %ss: %s", topic, delay_s, exc)
                await job.wait(delay_s)

    async def _while_paused(self, job: Job, task: Task) -> None:
        """Hold a taken record while an operator pauses its queue."""
        while self._pauses is not None and self._pauses.covers(
            task.authority, task.queue
        ):
            await job.wait(PAUSE_CHECK_S)

    async def _sleep_until(self, job: Job, due_ms: int) -> None:
        # Timers may fire a hair early against the wall clock: check again.
        while (left_s := due_ms / 1000 - self._clock()) > 0:
            await job.wait(left_s)

    def _deadline_s(self, task: Task) -> float:
        if task.HasField("deadline"):
            return task.deadline.ToNanoseconds() / 1e9
        return self._config.queue(task.queue).deadline_s

    def _metadata(self, task: Task, state: State, attempt: int) -> dict[str, str]:
        metadata = dict(task.metadata)
        metadata["taskqueue-task-id"] = state.id
        metadata["taskqueue-attempt"] = str(attempt)
        metadata["taskqueue-queue"] = task.queue
        scheduled = datetime.fromtimestamp(state.due_ms / 1000, UTC)
        metadata["taskqueue-scheduled-at"] = scheduled.isoformat(
            timespec="milliseconds"
        )
        if state.last_status:
            metadata["taskqueue-previous-status"] = state.last_status
        return metadata


def _event(job: Job, task: Task, task_id: str, attempt: int) -> TaskEvent:
    tier = tier_of(job.taken.topic) or MAIN
    return TaskEvent(task_id, task.authority, task.method, attempt, task.queue, tier)


def _replace(state: State, **changes: object) -> State:
    return msgspec.structs.replace(state, **changes)
