"""``QueueStub.for_(pb2_module, 'Service')``: a queue for one of your services.

    CoffeeMachineQueue = QueueStub.for_(cafe_pb2, "CoffeeMachine")
    queue = CoffeeMachineQueue("cafe.srv.prod:50051", channel)
    task_id = await queue.make_latte.add(order, delay=timedelta(minutes=5))

``channel`` is a grpclib Channel to the taskqueue service; the authority is
where taskqueue will reach your service to make the call.
"""

from collections.abc import Mapping
from datetime import datetime, timedelta
from types import ModuleType
from typing import Any, ClassVar

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpclib.client import Channel

from taskqueue.protobuf.service_grpc import TaskQueueStub
from taskqueue.protobuf.service_pb2 import (
    AT_LEAST_ONCE,
    AT_MOST_ONCE,
    RetryPolicy,
    Task,
)

DELIVERY = {"at-least-once": AT_LEAST_ONCE, "at-most-once": AT_MOST_ONCE}


class TaskMethod:
    """One method of the service, to enqueue calls of: ``.add(message, ...)``."""

    def __init__(self, queue: "QueueStub", method: MethodDescriptor) -> None:
        self._queue = queue
        self._method = method
        self.path = f"/{method.containing_service.full_name}/{method.name}"

    async def add(
        self,
        message: Message,
        *,
        queue: str = "default",
        delay: timedelta | float | None = None,
        eta: datetime | None = None,
        delivery: str = "at-least-once",
        deadline: timedelta | float | None = None,
        metadata: Mapping[str, str] | None = None,
        task_id: str = "",
        retry: RetryPolicy | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - grpclib's own name
    ) -> str:
        """Enqueue a call of this method with ``message``; returns the task id.

        ``delay`` (seconds or timedelta) or ``eta`` (an aware datetime) set
        when the call is due; ``deadline`` bounds each attempt; ``task_id``
        names the task (taskqueue makes one up when empty); ``retry``
        overrides the queue's retry policy for this task.
        """
        task = self.task(
            message,
            queue=queue,
            delay=delay,
            eta=eta,
            delivery=delivery,
            deadline=deadline,
            metadata=metadata,
            task_id=task_id,
            retry=retry,
        )
        reply = await self._queue._stub.add(task, timeout=timeout)
        return reply.id

    def task(
        self,
        message: Message,
        *,
        queue: str = "default",
        delay: timedelta | float | None = None,
        eta: datetime | None = None,
        delivery: str = "at-least-once",
        deadline: timedelta | float | None = None,
        metadata: Mapping[str, str] | None = None,
        task_id: str = "",
        retry: RetryPolicy | None = None,
    ) -> Task:
        """The Task that ``add`` sends, for callers that batch or inspect it."""
        self._check_type(message)
        if delay is not None and eta is not None:
            raise ValueError("give delay or eta, not both")
        if delivery not in DELIVERY:
            raise ValueError(f"delivery must be one of {sorted(DELIVERY)}")

        task = Task(
            authority=self._queue.authority,
            method=self.path,
            queue=queue,
            delivery=DELIVERY[delivery],
            metadata=dict(metadata or {}),
            id=task_id,
        )
        task.argument.Pack(message)
        if delay is not None:
            task.delay.FromTimedelta(_timedelta(delay))
        if eta is not None:
            if eta.tzinfo is None:
                raise ValueError("eta must be timezone-aware")
            task.eta.FromDatetime(eta)
        if deadline is not None:
            task.deadline.FromTimedelta(_timedelta(deadline))
        if retry is not None:
            task.retry.CopyFrom(retry)
        return task

    def _check_type(self, message: Any) -> None:
        expected = self._method.input_type
        if not isinstance(message, Message) or message.DESCRIPTOR is not expected:
            got = type(message).__name__
            raise TypeError(f"{self.path} takes {expected.full_name}, not {got}")


class QueueStub:
    """Base of the classes ``for_`` makes; one instance per authority."""

    _service: ClassVar[ServiceDescriptor]

    def __init__(self, authority: str, channel: Channel) -> None:
        self.authority = authority
        self._stub = TaskQueueStub(channel)
        self._methods = {
            m.name: TaskMethod(self, m) for m in type(self)._service.methods
        }

    @classmethod
    def for_(cls, pb2_module: ModuleType, service_name: str) -> type["QueueStub"]:
        """A QueueStub class for ``service_name`` defined in ``pb2_module``."""
        try:
            service = pb2_module.DESCRIPTOR.services_by_name[service_name]
        except KeyError:
            raise ValueError(
                f"{pb2_module.__name__} defines no service {service_name!r}"
            ) from None
        return type(f"{service_name}Queue", (cls,), {"_service": service})

    def __getattr__(self, name: str) -> TaskMethod:
        methods = self.__dict__.get("_methods", {})
        if name not in methods:
            raise AttributeError(
                f"{type(self)._service.full_name} has no method {name!r}"
            )
        return methods[name]  # type: ignore[no-any-return]


def _timedelta(value: timedelta | float) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=value)
