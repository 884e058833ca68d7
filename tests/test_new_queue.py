"""A queue first used while the worker already runs is read from its start."""

import sys
from pathlib import Path

from grpclib.client import Channel

from taskqueue.client.queue import QueueStub
from taskqueue.server.config import Config
from tests.support import rpc_server, target, worker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "cafe"))
import cafe_pb2

CoffeeMachineQueue = QueueStub.for_(cafe_pb2, "CoffeeMachine")


async def test_first_tasks_of_a_queue_created_under_a_running_worker_are_called(
    config: Config,
) -> None:
    async with (
        target() as cafe,
        rpc_server(config) as port,
        worker(config),
        Channel("127.0.0.1", port) as channel,
    ):
        queue = CoffeeMachineQueue(cafe.authority, channel)
        # The worker is up and consuming: a task on a first queue is called.
        warm_up = await queue.make_latte.add(
            cafe_pb2.LatteOrder(sugar=0), queue="first", timeout=10
        )
        await cafe.wait_calls(1)

        # Then a queue nobody used before; its topic is created by this add.
        orders = [cafe_pb2.LatteOrder(sugar=n) for n in range(1, 6)]
        new_ids = [
            await queue.make_latte.add(order, queue="brand-new", timeout=10)
            for order in orders
        ]
        calls = await cafe.wait_calls(1 + len(orders))

    assert calls[0].metadata["taskqueue-task-id"] == warm_up
    on_new = [c for c in calls if c.metadata["taskqueue-queue"] == "brand-new"]
    assert sorted(c.metadata["taskqueue-task-id"] for c in on_new) == sorted(new_ids)
    assert sorted(c.body for c in on_new) == sorted(
        o.SerializeToString() for o in orders
    )
