"""The rpc handler: ``/taskqueue.service.TaskQueue/add``.

A task is validated, written to Kafka (its main topic, or the delay ladder when
it is due later) and acknowledged only after Kafka acknowledged the write.
Errors become gRPC statuses here and nowhere else, but for the time limits
that ``guard.py`` applies around every handler.
"""

import asyncio
import logging
import struct
import time
from collections.abc import Callable

from google.protobuf.message import DecodeError
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.health.service import Health
from grpclib.reflection.service import ServerReflection
from grpclib.server import Stream

from taskqueue.protobuf.admin_grpc import AdminBase
from taskqueue.protobuf.service_grpc import TaskQueueBase
from taskqueue.protobuf.service_pb2 import AddReply, Task
from taskqueue.server import validation
from taskqueue.server.allowlist import Allowlist
from taskqueue.server.auth import Caller, Callers
from taskqueue.server.config import Config, RpcConfig
from taskqueue.server.errors import (
    BrokerUnavailable,
    DeadlineExceeded,
    InvalidTask,
    TaskQueueError,
)
from taskqueue.server.guard import GuardedServer
from taskqueue.server.kafka import KafkaWriter
from taskqueue.server.ladder import Ladder
from taskqueue.server.logs import TaskEvent, task_event
from taskqueue.server.metrics import MAIN, OK, Metrics
from taskqueue.server.record import State, encode_task, to_headers
from taskqueue.server.topics import Topics, tier_of

log = logging.getLogger(__name__)

Clock = Callable[[], float]
# A gRPC message: a compressed flag byte and a 4-byte big-endian length.
MESSAGE_PREFIX = struct.Struct(">BI")
# Load balancers and orchestrators probe health without credentials.
HEALTH_PATH = "/grpc.health.v1.Health/"
ADMIN_PATH = "/taskqueue.admin.Admin/"


class TaskQueueService(TaskQueueBase):
    def __init__(
        self,
        config: Config,
        writer: KafkaWriter,
        clock: Clock = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self._config = config
        self._metrics = metrics or Metrics()
        self._writer = writer
        self._clock = clock
        self._topics = Topics(config.topics.prefix)
        self._ladder = Ladder(config.topics.tiers)
        self._allowlist = Allowlist(config.allow)
        self._callers = Callers(config.security.callers)

    async def add(self, stream: "Stream[Task, AddReply]") -> None:
        try:
            # Before reading the body: an unknown caller costs us nothing more.
            caller = self._callers.identify(stream.metadata or {})
            task = await _receive(stream, self._config.rpc.max_message_bytes)
        except TaskQueueError as exc:
            log.info("add refused: %s: %s", exc.status.name, exc)
            self._metrics.added("", exc.status.name)
            raise GRPCError(exc.status, str(exc)) from None

        try:
            reply = await self._add(task, caller, self._time_left_s(stream))
        except TaskQueueError as exc:
            log.info("add refused: %s: %s", exc.status.name, exc)
            # Only a task Kafka refused got through validation; any other's
            # queue is a name its caller made up, no label value.
            queue = task.queue if isinstance(exc, BrokerUnavailable) else ""
            self._metrics.added(queue, exc.status.name)
            raise GRPCError(exc.status, str(exc)) from None

        self._metrics.added(task.queue, OK)
        await stream.send_message(reply)

    async def authenticate(self, event: RecvRequest) -> None:
        """Refuse any request but a health check from an unknown caller.

        Runs before every handler of the server, admin and reflection
        included; ``add`` identifies its caller again for its authorities.
        """
        if event.method_name.startswith(HEALTH_PATH):
            return
        try:
            caller = self._callers.identify(event.metadata)
            if event.method_name.startswith(ADMIN_PATH):
                caller.check_admin()
        except TaskQueueError as exc:
            log.info(
                "request refused: %s %s: %s", event.method_name, exc.status.name, exc
            )
            raise GRPCError(exc.status, str(exc)) from None

    def _time_left_s(self, stream: "Stream[Task, AddReply]") -> float:
        limit_s = self._config.rpc.add_timeout_s
        if stream.deadline is not None:
            remaining_s = stream.deadline.time_remaining()
            if not remaining_s:
                # A write started now could be stored and never answered.
                raise DeadlineExceeded(
                    "the call's deadline (grpc-timeout) passed before the task "
                    "was written"
                )
            # Leave a little of the caller's deadline for our reply to reach it.
            limit_s = min(limit_s, remaining_s * 0.9)
        return limit_s

    async def _add(self, task: Task, caller: Caller, time_left_s: float) -> AddReply:
        now_ms = int(self._clock() * 1000)
        state = self._prepare(task, caller, now_ms)
        topic = self._destination(task, state.due_ms, now_ms)

        try:
            async with asyncio.timeout(time_left_s):
                await self._writer.write(
                    topic,
                    key=state.id.encode(),
                    value=encode_task(task),
                    headers=to_headers(state),
                    timestamp_ms=now_ms,
                )
        except TimeoutError:
            # The record may still reach Kafka later: the producer cannot take
            # it back. Idempotent enqueue by task id would make a retry safe.
            # UNAVAILABLE even when the caller's deadline set the limit: it is
            # answered before that deadline and says what was slow.
            waited = f"{time_left_s:.3g}s"
            if time_left_s < self._config.rpc.add_timeout_s:
                waited += ", all that the call's deadline (grpc-timeout) left"
            raise BrokerUnavailable(
                f"Kafka did not acknowledge the task within {waited}; "
                "it may still be stored"
            ) from None

        tier = tier_of(topic) or MAIN
        event = TaskEvent(state.id, task.authority, task.method, 0, task.queue, tier)
        due_in_s = round((state.due_ms - now_ms) / 1000, 3)
        task_event(
            log, logging.INFO, "enqueued", event, due_in_s=due_in_s, caller=caller.name
        )
        return AddReply(id=state.id)

    def _prepare(self, task: Task, caller: Caller, now_ms: int) -> State:
        """Validate ``task`` and normalise it in place; return its first state."""
        rpc = self._config.rpc
        validation.check_authority(task.authority)
        validation.check_method(task.method)
        self._allowlist.check(task.authority, task.method)
        caller.check_authority(task.authority)
        task.queue = task.queue or validation.DEFAULT_QUEUE
        topic = self._topics.main(task.authority, task.queue)
        validation.check_queue(task.queue, len(topic))
        validation.check_argument(task, rpc.max_message_bytes)
        validation.check_delivery(task)
        validation.check_metadata(task)
        max_deadline_s = self._config.worker.max_poll_interval_s / 2
        validation.check_deadline(task, max_deadline_s)
        validation.check_retry(task)

        due_ms = validation.due_ms(task, now_ms)
        task.id = validation.task_id(task)
        task.eta.FromMilliseconds(due_ms)
        return State(id=task.id, due_ms=due_ms, added_ms=now_ms)

    def _destination(self, task: Task, due_ms: int, now_ms: int) -> str:
        wait_s = (due_ms - now_ms) / 1000
        return self._ladder.topic_for(self._topics, task.authority, task.queue, wait_s)


async def _receive(stream: "Stream[Task, AddReply]", limit_bytes: int) -> Task:
    """The request's Task; a larger one is refused before it is read.

    grpclib's recv_message takes a message of whatever length its prefix
    declares, all of it in memory, so any caller could make us hold gigabytes.
    This reads the prefix first, through grpclib's private ``_stream``
    (grpclib 0.4; test_security_fuzz.py sends oversized requests).
    """
    raw = stream._stream
    try:
        prefix = await raw.recv_data(MESSAGE_PREFIX.size)
        if not prefix:
            raise InvalidTask("no Task in the request")
        compressed, size = MESSAGE_PREFIX.unpack(prefix)
        if compressed:
            raise InvalidTask("the Task is compressed; send it uncompressed")
        if size > limit_bytes:
            raise InvalidTask(
                f"the request is {size} bytes; the limit is {limit_bytes} "
                "(rpc.max_message_bytes)"
            )
        body = await raw.recv_data(size)
    except AssertionError:  # grpclib's way of saying the stream ended early
        raise InvalidTask("the request ended inside its Task") from None
    try:
        return Task.FromString(body)
    except DecodeError:
        raise InvalidTask(
            "the request body is not a taskqueue.service.Task protobuf"
        ) from None


def make_server(
    rpc: RpcConfig,
    service: TaskQueueService,
    *others: TaskQueueBase | Health | AdminBase,
) -> GuardedServer:
    """``add`` and ``others`` (health, admin), all described by reflection,
    within the limits of ``rpc``."""
    server = GuardedServer(ServerReflection.extend([service, *others]), rpc)
    listen(server, RecvRequest, service.authenticate)
    return server
