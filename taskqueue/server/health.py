"""Health: whether a process can do its job, for probes and load balancers.

- rpc: a broker answers a metadata request, probed every
  ``health.interval_s``. Served over ``grpc.health.v1`` (for the whole server,
  ``""``, and for ``taskqueue.service.TaskQueue``) and on ``/healthz``.
  NOT_SERVING while the broker is unreachable, since every ``add`` would only
  answer UNAVAILABLE, and from the moment the server begins to shut down.
- worker: its consumer is not stuck. Stuck means a partition it may fetch
  (assigned, not waiting for its head to be due) has lag, and no record was
  taken or finished for ``health.stuck_after_s``. Measured with the lag
  metrics every ``health.interval_s``; served on ``/healthz``.

The probe runs in the event loop and ``/healthz`` answers from another
thread, from the probe's latest verdict. A verdict that has grown old means
the loop no longer runs the probe, and counts as unhealthy.
"""

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health

from taskqueue.server.config import HealthConfig
from taskqueue.server.kafka import KafkaWriter
from taskqueue.server.metrics import MAIN, Metrics, TierState, WorkerState
from taskqueue.server.rpc import TaskQueueService
from taskqueue.server.topics import tier_of
from taskqueue.server.worker import Worker

log = logging.getLogger(__name__)

# A verdict older than this many probe rounds means the probe stopped.
STALE_ROUNDS = 3


@dataclass(frozen=True, slots=True)
class Verdict:
    healthy: bool
    detail: str
    at_s: float  # time.monotonic() when it was reached


class Probe(abc.ABC):
    """A check run every ``interval_s`` in the event loop; read from any thread."""

    def __init__(self, config: HealthConfig) -> None:
        self._config = config
        self._verdict = Verdict(False, "not checked yet", time.monotonic())

    def verdict(self) -> tuple[bool, str]:
        """The latest verdict, unless it is too old to trust."""
        current = self._verdict  # one read: the probe swaps in a new object
        age_s = time.monotonic() - current.at_s
        stale_after_s = STALE_ROUNDS * (
            self._config.interval_s + self._config.timeout_s
        )
        if age_s > stale_after_s:
            return False, f"no health check for {age_s:.0f}s (event loop blocked?)"
        return current.healthy, current.detail

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the probe for the duration of the block."""
        task = asyncio.create_task(self._loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @abc.abstractmethod
    async def check(self) -> Verdict:
        """One round of the probe."""

    async def _loop(self) -> None:
        while True:
            try:
                verdict = await self.check()
            except Exception as exc:
                # A bug in a probe must not stop the process it watches.
                log.exception("health check failed")
                verdict = Verdict(
                    False, f"health check failed: {exc!r}", time.monotonic()
                )
            self._set(verdict)
            await asyncio.sleep(self._config.interval_s)

    def _set(self, verdict: Verdict, *, quiet: bool = False) -> None:
        if verdict.healthy != self._verdict.healthy and not quiet:
            level = logging.INFO if verdict.healthy else logging.WARNING
            state = "healthy" if verdict.healthy else "unhealthy"
            log.log(level, "now %s: %s", state, verdict.detail)
        self._verdict = verdict


class BrokerProbe(Probe):
    """The rpc server's health: can it reach the broker?"""

    def __init__(
        self, writer: KafkaWriter, config: HealthConfig, metrics: Metrics
    ) -> None:
        super().__init__(config)
        self._writer = writer
        self._metrics = metrics
        self._draining = False
        # What grpc.health.v1 reports; grpclib tells watchers of each change.
        self.status = ServiceStatus()

    def drain(self) -> None:
        """Report NOT_SERVING from now on: the server is shutting down."""
        self._draining = True
        log.info("shutting down: health is NOT_SERVING from now on")
        self._set(Verdict(False, "shutting down", time.monotonic()), quiet=True)

    async def check(self) -> Verdict:
        up = await self._writer.ping(self._config.timeout_s)
        self._metrics.broker_up(up)
        if self._draining:
            return Verdict(False, "shutting down", time.monotonic())
        detail = "broker reachable" if up else "broker unreachable"
        return Verdict(up, detail, time.monotonic())

    def _set(self, verdict: Verdict, *, quiet: bool = False) -> None:
        super()._set(verdict, quiet=quiet)
        self.status.set(verdict.healthy)


def grpc_health(service: TaskQueueService, probe: BrokerProbe) -> Health:
    """``grpc.health.v1.Health`` answering from the broker probe."""
    return Health({service: [probe.status]})


class WorkerProbe(Probe):
    """A worker's health (is its consumer stuck?) and its partition metrics."""

    def __init__(self, worker: Worker, config: HealthConfig) -> None:
        super().__init__(config)
        self._worker = worker
        self._lag: dict[TopicPartition, int] = {}
        self.gave_up = False

    async def check(self) -> Verdict:
        await self._measure_lag()
        assigned = self._worker.assigned_partitions()
        waiting = set(self._worker.waiting_partitions())
        idle_s = self._worker.idle_s()
        lag = {tp: self._lag.get(tp, 0) for tp in assigned}
        self._worker.metrics.worker_state(_state(lag, waiting, idle_s))

        resting = waiting | set(self._worker.held_partitions())
        behind = [tp for tp, records in lag.items() if records and tp not in resting]
        if behind and idle_s > self._config.stuck_after_s:
            detail = (
                f"stuck: {len(behind)} partition(s) have lag and no record was "
                f"taken or finished for {idle_s:.0f}s"
            )
            self._give_up(detail)
            return Verdict(False, detail, time.monotonic())
        detail = f"{len(assigned)} partition(s), {sum(lag.values())} record(s) behind"
        return Verdict(True, detail, time.monotonic())

    def _give_up(self, detail: str) -> None:
        if self._config.exit_when_stuck and not self.gave_up:
            # Nothing in this process has unstuck it for stuck_after_s; a
            # fresh process with a fresh consumer is the recovery left.
            log.error("worker stopping: %s", detail)
            self.gave_up = True
            self._worker.stop()

    async def _measure_lag(self) -> None:
        try:
            async with asyncio.timeout(self._config.timeout_s):
                self._lag = await self._worker.lag()
        except (KafkaError, OSError, TimeoutError) as exc:
            # Keep the lag measured last: a broker outage is no reason to
            # forget that there was work to do.
            log.debug("lag not measured: %r", exc)
            self._worker.metrics.broker_up(False)
            return
        self._worker.metrics.broker_up(True)


def _state(
    lag: dict[TopicPartition, int], waiting: Collection[TopicPartition], idle_s: float
) -> WorkerState:
    tiers: dict[str, TierState] = {}
    for tp, records in lag.items():
        tier = tier_of(tp.topic) or MAIN
        counts = tiers.get(tier, TierState())
        tiers[tier] = TierState(
            assigned=counts.assigned + 1,
            waiting=counts.waiting + (tp in waiting),
            lag=counts.lag + records,
        )
    return WorkerState(tiers=tiers, idle_s=idle_s)
