"""The client builds the Task; no network is needed to look at it."""

import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import cafe_pb2  # on sys.path through conftest.py
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.empty_pb2 import Empty
from grpclib.client import Channel

from taskqueue.client.queue import QueueStub, TaskMethod
from taskqueue.protobuf.service_pb2 import AT_LEAST_ONCE, AT_MOST_ONCE, RetryPolicy

ROOT = Path(__file__).resolve().parent.parent

CoffeeMachineQueue = QueueStub.for_(cafe_pb2, "CoffeeMachine")
ORDER = cafe_pb2.LatteOrder(size=cafe_pb2.LARGE, temperature=87, sugar=2)


@pytest.fixture
async def queue() -> AsyncIterator[QueueStub]:
    channel = Channel("127.0.0.1", 1)  # never connected: nothing is sent
    try:
        yield CoffeeMachineQueue("cafe.srv.prod:50051", channel)
    finally:
        channel.close()


def make_latte(queue: QueueStub) -> TaskMethod:
    method = queue.make_latte
    assert isinstance(method, TaskMethod)
    return method


async def test_task_names_authority_method_and_packs_the_argument(
    queue: QueueStub,
) -> None:
    task = make_latte(queue).task(ORDER)

    assert task.authority == "cafe.srv.prod:50051"
    assert task.method == "/coffeemachine.CoffeeMachine/make_latte"
    assert task.argument.type_url == "type.googleapis.com/coffeemachine.LatteOrder"
    assert task.argument.value == ORDER.SerializeToString()
    unpacked = cafe_pb2.LatteOrder()
    assert task.argument.Unpack(unpacked)
    assert unpacked == ORDER


async def test_defaults(queue: QueueStub) -> None:
    task = make_latte(queue).task(ORDER)

    assert task.queue == "default"
    assert task.delivery == AT_LEAST_ONCE
    assert task.WhichOneof("due") is None
    assert not task.HasField("deadline")
    assert not task.HasField("retry")
    assert task.id == ""
    assert dict(task.metadata) == {}


@pytest.mark.parametrize(
    ("delay", "expected"),
    [
        (2.5, Duration(seconds=2, nanos=500_000_000)),
        (timedelta(minutes=5), Duration(seconds=300)),
        (0, Duration()),
    ],
)
async def test_delay(
    queue: QueueStub, delay: float | timedelta, expected: Duration
) -> None:
    task = make_latte(queue).task(ORDER, delay=delay)

    assert task.WhichOneof("due") == "delay"
    assert task.delay == expected


async def test_eta_is_stored_in_utc(queue: QueueStub) -> None:
    eta = datetime(2030, 1, 2, 12, 0, 0, 250_000, tzinfo=timezone(timedelta(hours=2)))

    task = make_latte(queue).task(ORDER, eta=eta)

    assert task.WhichOneof("due") == "eta"
    assert task.eta.ToDatetime(tzinfo=UTC) == eta
    assert task.eta.seconds == int(datetime(2030, 1, 2, 10, tzinfo=UTC).timestamp())
    assert task.eta.nanos == 250_000_000


async def test_deadline_delivery_metadata_queue_and_id(queue: QueueStub) -> None:
    task = make_latte(queue).task(
        ORDER,
        queue="orders",
        delivery="at-most-once",
        deadline=timedelta(seconds=10),
        metadata={"tenant": "acme"},
        task_id="order-42",
    )

    assert task.queue == "orders"
    assert task.delivery == AT_MOST_ONCE
    assert task.deadline == Duration(seconds=10)
    assert dict(task.metadata) == {"tenant": "acme"}
    assert task.id == "order-42"


async def test_a_retry_policy_of_its_own(queue: QueueStub) -> None:
    policy = RetryPolicy(max_attempts=3, backoff=[Duration(seconds=2)])

    task = make_latte(queue).task(ORDER, retry=policy)

    assert task.retry == policy
    assert not make_latte(queue).task(ORDER).HasField("retry")


async def test_a_float_deadline(queue: QueueStub) -> None:
    task = make_latte(queue).task(ORDER, deadline=1.5)

    assert task.deadline == Duration(seconds=1, nanos=500_000_000)


async def test_delay_and_eta_together_are_refused(queue: QueueStub) -> None:
    with pytest.raises(ValueError, match="delay or eta"):
        make_latte(queue).task(ORDER, delay=1, eta=datetime.now(UTC))


async def test_a_naive_eta_is_refused(queue: QueueStub) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        make_latte(queue).task(ORDER, eta=datetime(2030, 1, 1))


async def test_an_unknown_delivery_is_refused(queue: QueueStub) -> None:
    with pytest.raises(ValueError, match="at-least-once"):
        make_latte(queue).task(ORDER, delivery="exactly-once")


@pytest.mark.parametrize(
    ("message", "got"),
    [(Empty(), "Empty"), ({"size": 2}, "dict"), (ORDER.SerializeToString(), "bytes")],
)
async def test_a_message_of_the_wrong_type_is_refused(
    queue: QueueStub, message: object, got: str
) -> None:
    with pytest.raises(TypeError) as raised:
        make_latte(queue).task(message)  # type: ignore[arg-type]

    assert str(raised.value) == (
        f"/coffeemachine.CoffeeMachine/make_latte takes coffeemachine.LatteOrder, "
        f"not {got}"
    )


async def test_an_unknown_method_is_an_attribute_error(queue: QueueStub) -> None:
    with pytest.raises(AttributeError, match="'make_espresso'") as raised:
        _ = queue.make_espresso

    assert "coffeemachine.CoffeeMachine" in str(raised.value)
    assert not hasattr(queue, "make_espresso")


def test_for_an_unknown_service_is_refused() -> None:
    with pytest.raises(ValueError, match="'TeaMachine'"):
        QueueStub.for_(cafe_pb2, "TeaMachine")


def test_for_makes_a_queue_stub_class() -> None:
    assert issubclass(CoffeeMachineQueue, QueueStub)
    assert CoffeeMachineQueue.__name__ == "CoffeeMachineQueue"


def test_the_client_imports_nothing_of_the_server() -> None:
    script = (
        "import sys\n"
        "import taskqueue.client\n"
        "from taskqueue.client.queue import QueueStub\n"
        "banned = ('taskqueue.server', 'aiokafka', 'msgspec', 'yaml', 'typer')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in banned\n"
        "                or m.startswith('taskqueue.server'))\n"
        "assert 'taskqueue.client.queue' in sys.modules\n"
        "print(','.join(loaded))\n"
    )

    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        timeout=30,
    )

    assert done.stdout.strip() == ""
