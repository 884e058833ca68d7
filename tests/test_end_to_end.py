"""The main job on a real broker: add, then the target is called."""

import cafe_pb2
from grpclib.client import Channel

from taskqueue.client.queue import QueueStub
from taskqueue.server.config import Config
from tests.support import rpc_server, target, worker

CoffeeMachineQueue = QueueStub.for_(cafe_pb2, "CoffeeMachine")


async def test_added_task_is_called_with_identical_argument(config: Config) -> None:
    order = cafe_pb2.LatteOrder(size=cafe_pb2.LARGE, temperature=87, sugar=2)

    async with target() as cafe, rpc_server(config) as port, worker(config):
        async with Channel("127.0.0.1", port) as channel:
            queue = CoffeeMachineQueue(cafe.authority, channel)
            task_id = await queue.make_latte.add(order, timeout=10)
        calls = await cafe.wait_calls(1)

    assert len(calls) == 1
    assert calls[0].method == "/coffeemachine.CoffeeMachine/make_latte"
    assert calls[0].body == order.SerializeToString()
    assert calls[0].metadata["taskqueue-task-id"] == task_id
    assert calls[0].metadata["taskqueue-attempt"] == "1"
