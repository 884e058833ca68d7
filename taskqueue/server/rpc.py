"""The rpc handler: ``/taskqueue.service.TaskQueue/add``.

A task is validated, written to Kafka (its main topic, or the delay ladder when
it is due later) and acknowledged only after Kafka acknowledged the write.
Errors become gRPC statuses here and nowhere else.
"""

import asyncio
import logging
import time
from collections.abc import Callable

from google.protobuf.message import DecodeError
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream

from taskqueue.protobuf.service_grpc import TaskQueueBase
from taskqueue.protobuf.service_pb2 import AddReply, Task
from taskqueue.server import validation
from taskqueue.server.allowlist import Allowlist
from taskqueue.server.config import Config
from taskqueue.server.errors import BrokerUnavailable, TaskQueueError
from taskqueue.server.kafka import KafkaWriter
from taskqueue.server.ladder import Ladder
from taskqueue.server.record import State, encode_task, to_headers
from taskqueue.server.topics import Topics

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class TaskQueueService(TaskQueueBase):
    def __init__(
        self, config: Config, writer: KafkaWriter, clock: Clock = time.time
    ) -> None:
        self._config = config
        self._writer = writer
        self._clock = clock
        self._topics = Topics(config.topics.prefix)
        self._ladder = Ladder(config.topics.tiers)
        self._allowlist = Allowlist(config.allow)

    async def add(self, stream: "Stream[Task, AddReply]") -> None:
        try:
            task = await stream.recv_message()
        except DecodeError:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                "the request body is not a taskqueue.service.Task protobuf",
            ) from None
        if task is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "no Task in the request")

        try:
            reply = await self._add(task, self._time_left_s(stream))
        except TaskQueueError as exc:
            log.info("add refused: %s: %s", exc.status.name, exc)
            raise GRPCError(exc.status, str(exc)) from None

        await stream.send_message(reply)

    def _time_left_s(self, stream: "Stream[Task, AddReply]") -> float:
        limit_s = self._config.rpc.add_timeout_s
        if stream.deadline is not None:
            # Leave a little of the caller's deadline for our reply to reach it.
            limit_s = min(limit_s, stream.deadline.time_remaining() * 0.9)
        return limit_s

    async def _add(self, task: Task, time_left_s: float) -> AddReply:
        now_ms = int(self._clock() * 1000)
        state = self._prepare(task, now_ms)
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
            raise BrokerUnavailable(
                f"Kafka did not acknowledge the task within {time_left_s:.1f}s; "
                "it may still be stored"
            ) from None

        log.info(
            "enqueued task %s authority=%s method=%s queue=%s due_in=%.3fs",
            state.id,
            task.authority,
            task.method,
            task.queue,
            (state.due_ms - now_ms) / 1000,
        )
        return AddReply(id=state.id)

    def _prepare(self, task: Task, now_ms: int) -> State:
        """Validate ``task`` and normalise it in place; return its first state."""
        rpc = self._config.rpc
        validation.check_authority(task.authority)
        self._allowlist.check(task.authority)
        validation.check_method(task.method)
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
        tier = self._ladder.tier_for((due_ms - now_ms) / 1000)
        if tier is None:
            return self._topics.main(task.authority, task.queue)
        return self._topics.tier(task.authority, task.queue, tier.name)


def make_server(service: TaskQueueService) -> Server:
    return Server([service])
