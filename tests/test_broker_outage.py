"""While Kafka is down, ``add`` answers UNAVAILABLE in time; after, it works.

The test runs a broker of its own, since it stops and restarts it.
"""

import asyncio
import sys
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from taskqueue.client.queue import QueueStub
from taskqueue.server.config import Config
from tests.conftest import make_config
from tests.support import rpc_server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "localkafka"))
sys.path.insert(0, str(ROOT / "examples" / "cafe"))
import cafe_pb2
from localbroker import LocalBroker

CoffeeMachineQueue = QueueStub.for_(cafe_pb2, "CoffeeMachine")
TARGET = "127.0.0.1:50999"  # never called: no worker runs here
ADD_DEADLINE_S = 3.0
# grpclib's client gives up at the deadline on its own; this only keeps a
# broken client from hanging the test.
HANG_GUARD_S = ADD_DEADLINE_S + 2.0
RECOVERY_TIMEOUT_S = 60.0


@pytest.fixture
def outage_config(own_broker: LocalBroker) -> Config:
    return make_config(own_broker.bootstrap)


async def add_once(queue: QueueStub, sugar: int, name: str) -> str:
    async with asyncio.timeout(HANG_GUARD_S):
        task_id: str = await queue.make_latte.add(
            cafe_pb2.LatteOrder(sugar=sugar), queue=name, timeout=ADD_DEADLINE_S
        )
        return task_id


async def test_add_is_unavailable_while_kafka_is_down_and_works_after(
    own_broker: LocalBroker, outage_config: Config
) -> None:
    async with (
        rpc_server(outage_config) as port,
        Channel("127.0.0.1", port) as channel,
    ):
        queue = CoffeeMachineQueue(TARGET, channel)
        assert await add_once(queue, 1, "known")

        await asyncio.to_thread(own_broker.stop)
        # A queue whose topic the server already knows, and one it must create.
        statuses = []
        for name in ("known", "unknown"):
            with pytest.raises(GRPCError) as raised:
                await add_once(queue, 2, name)
            statuses.append((name, raised.value.status, raised.value.message))

        await asyncio.to_thread(own_broker.start)
        async with asyncio.timeout(RECOVERY_TIMEOUT_S):
            after = await add_until_ok(queue, "known")
            after_new = await add_until_ok(queue, "fresh")

    assert [(name, status) for name, status, _ in statuses] == [
        ("known", Status.UNAVAILABLE),
        ("unknown", Status.UNAVAILABLE),
    ], statuses
    assert all("Kafka" in (message or "") for _, _, message in statuses), statuses
    assert after
    assert after_new


async def add_until_ok(queue: QueueStub, name: str) -> str:
    while True:
        try:
            return await add_once(queue, 3, name)
        except GRPCError as exc:
            assert exc.status is Status.UNAVAILABLE, exc
