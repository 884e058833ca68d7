"""The grpcio (sync) stub enqueues a task that the worker then calls."""

import asyncio
import sys
from pathlib import Path

import grpc

from taskqueue.protobuf.service_pb2 import AddReply, Task
from taskqueue.protobuf.service_pb2_grpc import TaskQueueStub
from taskqueue.server.config import Config
from tests.support import rpc_server, target, worker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "cafe"))
import cafe_pb2

METHOD = "/coffeemachine.CoffeeMachine/make_latte"


def add_blocking(port: int, task: Task) -> AddReply:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply: AddReply = TaskQueueStub(channel).add(task, timeout=10)
        return reply


async def test_sync_grpcio_client_enqueues_and_the_target_is_called(
    config: Config,
) -> None:
    order = cafe_pb2.LatteOrder(size=cafe_pb2.MEDIUM, temperature=70, sugar=1)

    async with target() as cafe, rpc_server(config) as port, worker(config):
        task = Task(authority=cafe.authority, method=METHOD, queue="sync")
        task.argument.Pack(order)
        # The rpc server runs in this event loop: block in a thread, not here.
        reply = await asyncio.to_thread(add_blocking, port, task)
        calls = await cafe.wait_calls(1)

    assert reply.id
    assert len(calls) == 1
    assert calls[0].method == METHOD
    assert calls[0].body == order.SerializeToString()
    assert calls[0].metadata["taskqueue-task-id"] == reply.id
    assert calls[0].metadata["taskqueue-queue"] == "sync"
