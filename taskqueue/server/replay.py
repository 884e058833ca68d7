"""Replaying dead letters: each back on its queue, once (``taskqueue dlq replay``).

A replayed task gets a fresh delivery state: no attempts yet, due now (or after
``--delay``, riding the delay ladder as ``add`` would put it), its replay count
one higher. The dead letter itself is left as it is.

Ending. The end offsets of the dead-letter partitions are noted when a replay
starts and it reads no further, so replayed tasks that fail straight back into
the dead-letter topic are not read again: a replay never loops.

Remembering replays. After Kafka acknowledged a replayed task, a mark is
written to the compacted topic ``PREFIX.__replayed``; a replay skips the dead
letters marked, unless told ``again``. A mark's key names the dead letter by
its topic, task id, time added and replay count rather than by its offset, so
two copies of one dead letter (a worker killed between the dead-letter write
and its commit writes it twice) share a mark and the task is requeued once,
while the dead letter of a replayed task that failed again counts one replay
more and can be replayed on purpose. A consumer group per dead-letter topic
was the other choice; its committed offset remembers only how far a partition
was read, and with filters the set replayed is not a prefix of a partition.
The mark is written after the replayed task: a replay stopped between the two
writes requeues that task again next time, which at-least-once targets
tolerate (they de-duplicate by task id); the other order could lose it.
"""

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from aiokafka.errors import KafkaError

from taskqueue.protobuf.service_pb2 import Task
from taskqueue.server.allowlist import Allowlist
from taskqueue.server.config import Config
from taskqueue.server.dlq import (
    Clock,
    Filters,
    Letter,
    Mark,
    MarkWriter,
    Reader,
    Span,
    letters,
    load_marks,
)
from taskqueue.server.errors import AuthorityNotAllowed, BrokerUnavailable
from taskqueue.server.kafka import KafkaWriter
from taskqueue.server.ladder import Ladder
from taskqueue.server.record import State, in_range_ms, to_headers
from taskqueue.server.topics import Topics

log = logging.getLogger(__name__)

# Replayed tasks written at once; more buys little against one local broker.
REPLAY_IN_FLIGHT = 64


class Outcome(StrEnum):
    REPLAYED = "replayed"
    WOULD_REPLAY = "would replay"
    ALREADY_REPLAYED = "already replayed"
    DUPLICATE = "copy of one replayed"
    UNREADABLE = "unreadable"
    NOT_ALLOWED = "not allowed"  # by this configuration's allow
    FAILED = "failed"


# Outcomes that leave a dead letter the operator asked for not replayed.
FAILURES = frozenset({Outcome.UNREADABLE, Outcome.NOT_ALLOWED, Outcome.FAILED})


@dataclass(frozen=True, slots=True)
class Step:
    """What a replay did, or would do, with one matching dead letter."""

    letter: Letter
    outcome: Outcome
    # The topic it goes to; topic/partition/offset once written.
    destination: str | None = None
    detail: str | None = None


@dataclass(slots=True)
class Summary:
    scanned: int = 0
    outcomes: Counter[Outcome] = field(default_factory=Counter)
    interrupted: bool = False

    @property
    def failed(self) -> int:
        return sum(self.outcomes[o] for o in FAILURES)


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    dry_run: bool = False
    again: bool = False  # replay dead letters that were replayed before
    rate_per_s: float | None = None
    delay_s: float = 0.0  # replayed tasks are due this long from now
    limit: int | None = None  # at most this many replayed


@dataclass(slots=True)
class ReplayHooks:
    """How a replay reports as it goes (a progress bar, lines, nothing)."""

    started: Callable[[int], None] = lambda total: None  # records to scan
    scanned: Callable[[], None] = lambda: None
    step: Callable[[Step], None] = lambda step: None


@dataclass(frozen=True, slots=True)
class _Claimed:
    """A readable dead letter this run is going to replay."""

    letter: Letter
    task: Task
    state: State


class Replayer:
    """Puts matching dead letters back on their queue, each at most once."""

    def __init__(
        self,
        config: Config,
        filters: Filters,
        options: ReplayOptions,
        *,
        hooks: ReplayHooks | None = None,
        stop: asyncio.Event | None = None,
        clock: Clock = time.time,
    ) -> None:
        self._config = config
        self._filters = filters
        self._options = options
        self._hooks = hooks or ReplayHooks()
        self._stop = stop or asyncio.Event()
        self._clock = clock
        self._topics = Topics(config.topics.prefix)
        self._ladder = Ladder(config.topics.tiers)
        self._allowlist = Allowlist(config.allow)
        self._marks: set[str] = set()
        self._claimed: set[str] = set()  # mark keys replayed in this run
        self._summary = Summary()
        self._in_flight = asyncio.Semaphore(REPLAY_IN_FLIGHT)
        self._writes: set[asyncio.Task[None]] = set()
        self._started = False

    async def run(self) -> Summary:
        if self._started:
            raise RuntimeError("a Replayer runs once")
        self._started = True
        async with Reader(self._config) as reader:
            dlq_topics = await reader.dlq_topics(self._filters)
            spans = await reader.spans(dlq_topics)
            if not self._options.again:
                self._marks = await load_marks(reader, self._config, dlq_topics)
            self._hooks.started(sum(span.size for span in spans))
            if self._options.dry_run:
                await self._scan(reader, spans, None)
            else:
                async with _Writers(self._config) as writers:
                    await self._scan(reader, spans, writers)
        return self._summary

    async def _scan(
        self, reader: Reader, spans: list[Span], writers: "_Writers | None"
    ) -> None:
        pace = _Pace(self._options.rate_per_s, self._stop)
        chosen = 0
        try:
            async with contextlib.aclosing(letters(reader, spans)) as found:
                async for letter in found:
                    if self._stop.is_set() or chosen == self._options.limit:
                        break
                    self._summary.scanned += 1
                    self._hooks.scanned()
                    if not self._filters.matches(letter):
                        continue
                    claimed = self._claim(letter)
                    if isinstance(claimed, Step):
                        self._report(claimed)
                        continue
                    chosen += 1
                    await self._replay(claimed, writers, pace)
        finally:
            if self._writes:
                await asyncio.wait(self._writes)
            self._summary.interrupted = self._stop.is_set()

    async def _replay(
        self, claimed: "_Claimed", writers: "_Writers | None", pace: "_Pace"
    ) -> None:
        if writers is None:
            _, topic = self._route(claimed)
            self._report(Step(claimed.letter, Outcome.WOULD_REPLAY, topic))
        elif await pace.wait():
            await self._start_write(claimed, writers)

    def _claim(self, letter: Letter) -> "_Claimed | Step":
        """Whether this run replays ``letter``; a Step tells why not."""
        key = letter.mark_key
        if letter.task is None or letter.state is None or key is None:
            return Step(letter, Outcome.UNREADABLE, detail=letter.problem)
        if key in self._claimed:
            return Step(letter, Outcome.DUPLICATE)
        if key in self._marks:
            return Step(letter, Outcome.ALREADY_REPLAYED)
        try:
            self._allowlist.check(letter.task.authority, letter.task.method)
        except AuthorityNotAllowed as exc:
            return Step(letter, Outcome.NOT_ALLOWED, detail=str(exc))
        self._claimed.add(key)
        return _Claimed(letter, letter.task, letter.state)

    def _route(self, claimed: _Claimed) -> tuple[State, str]:
        """The replayed task's fresh state and the topic it is written to."""
        now_ms = int(self._clock() * 1000)
        due_ms = now_ms + int(self._options.delay_s * 1000)
        old = claimed.state
        if in_range_ms(old.due_ms):
            # Never earlier than the task was due: no task is called before
            # then. A due time out of range (another tool wrote it) is no
            # time at all; kept, it would park the task on the ladder for good.
            due_ms = max(due_ms, old.due_ms)
        state = State(
            id=old.id,
            due_ms=due_ms,
            # A replay starts the retry policy afresh: attempts and max age.
            added_ms=now_ms,
            origin=old.origin,
            replays=old.replays + 1,
        )
        wait_s = (state.due_ms - now_ms) / 1000
        task = claimed.task
        topic = self._ladder.topic_for(self._topics, task.authority, task.queue, wait_s)
        return state, topic

    async def _start_write(self, claimed: _Claimed, writers: "_Writers") -> None:
        await self._in_flight.acquire()
        job = asyncio.create_task(self._write(claimed, writers))
        self._writes.add(job)
        job.add_done_callback(self._writes.discard)
        job.add_done_callback(lambda _: self._in_flight.release())

    async def _write(self, claimed: _Claimed, writers: "_Writers") -> None:
        letter = claimed.letter
        state, topic = self._route(claimed)
        try:
            written = await writers.tasks.write(
                topic,
                key=state.id.encode(),
                value=letter.value,
                headers=to_headers(state),
                timestamp_ms=state.added_ms,
            )
        except BrokerUnavailable as exc:
            self._report(Step(letter, Outcome.FAILED, topic, str(exc)))
            return

        where = f"{written.topic}/{written.partition}/{written.offset}"
        mark = Mark(
            task_id=state.id,
            dead_letter=letter.where,
            replayed_to=where,
            replayed_ms=state.added_ms,
        )
        try:
            await writers.marks.write(letter.mark_key or "", mark)
        except BrokerUnavailable as exc:
            detail = f"replayed, but not marked so (a replay repeats it): {exc}"
            self._report(Step(letter, Outcome.FAILED, where, detail))
            return
        log.info("task %s replayed from %s to %s", state.id, letter.where, where)
        self._report(Step(letter, Outcome.REPLAYED, where))

    def _report(self, step: Step) -> None:
        self._summary.outcomes[step.outcome] += 1
        self._hooks.step(step)


class _Writers:
    """The writer of replayed tasks and the writer of marks, started together."""

    def __init__(self, config: Config) -> None:
        self.tasks = KafkaWriter(config)
        self.marks = MarkWriter(config)

    async def __aenter__(self) -> "_Writers":
        try:
            await self.tasks.start()
        except KafkaError as exc:
            await self.tasks.stop()
            raise BrokerUnavailable(f"cannot reach Kafka: {exc}") from exc
        try:
            await self.marks.__aenter__()
        except BrokerUnavailable:
            await self.tasks.stop()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.marks.__aexit__()
        await self.tasks.stop()


class _Pace:
    """At most ``rate_per_s`` a second, spread evenly; no limit when None."""

    def __init__(self, rate_per_s: float | None, stop: asyncio.Event) -> None:
        self._interval_s = 1 / rate_per_s if rate_per_s else 0.0
        self._stop = stop
        self._next = time.monotonic()

    async def wait(self) -> bool:
        """Wait for the next turn; False when stopped meanwhile."""
        now = time.monotonic()
        if self._interval_s and self._next > now:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._next - now):
                    await self._stop.wait()
        self._next = max(self._next, now) + self._interval_s
        return not self._stop.is_set()
