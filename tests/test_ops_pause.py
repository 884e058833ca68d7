"""Pause and resume over gRPC: a paused queue is not called, add still accepts."""

import asyncio

import pytest
from google.protobuf.duration_pb2 import Duration
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.reflection.v1.reflection_grpc import ServerReflectionStub
from grpclib.reflection.v1.reflection_pb2 import ServerReflectionRequest

from taskqueue.protobuf.admin_grpc import AdminStub
from taskqueue.protobuf.admin_pb2 import ListPausesRequest, PauseRequest, ResumeRequest
from taskqueue.server.config import Config
from tests.ops_support import add, ops_config, rpc_with_metrics, task
from tests.support import Received, target, worker

# Time enough for a call that was not held back to arrive.
QUIET_S = 2.5


def admin_config(bootstrap: str) -> Config:
    return ops_config(bootstrap, admin={"enabled": True}, kafka={"partitions": 1})


def bodies(calls: list[Received]) -> list[bytes]:
    return [c.body for c in calls]


async def test_a_paused_queue_waits_for_its_resume(kafka_bootstrap: str) -> None:
    config = admin_config(kafka_bootstrap)
    async with (
        target() as cafe,
        rpc_with_metrics(config) as (port, _),
        Channel("127.0.0.1", port) as channel,
        worker(config),
    ):
        admin = AdminStub(channel)
        paused = await admin.pause(
            PauseRequest(authority=cafe.authority, queue="orders", reason="upgrade")
        )
        await add(port, task(cafe.authority, b"held", queue="orders"))
        await add(port, task(cafe.authority, b"free", queue="other"))
        await cafe.wait_calls(1)
        await asyncio.sleep(QUIET_S)
        while_paused = bodies(cafe.calls)
        listed = await admin.list_pauses(ListPausesRequest())

        resumed = await admin.resume(
            ResumeRequest(authority=cafe.authority, queue="orders")
        )
        await cafe.wait_calls(2)
        after = await admin.list_pauses(ListPausesRequest())

    assert while_paused == [b"free"]
    assert (paused.authority, paused.queue, paused.reason) == (
        cafe.authority,
        "orders",
        "upgrade",
    )
    assert paused.since.seconds > 0
    assert list(listed.pauses) == [paused]
    assert resumed.was_paused
    assert bodies(cafe.calls) == [b"free", b"held"]
    assert not after.pauses


async def test_a_taken_task_is_held_and_a_new_worker_reads_the_pause(
    kafka_bootstrap: str,
) -> None:
    config = admin_config(kafka_bootstrap)
    async with (
        target() as cafe,
        rpc_with_metrics(config) as (port, _),
        Channel("127.0.0.1", port) as channel,
    ):
        admin = AdminStub(channel)
        async with worker(config):
            # Due in 2 s: below the smallest tier, the worker takes it now and
            # waits for it on a timer; the pause arrives meanwhile.
            await add(port, task(cafe.authority, b"taken", delay=Duration(seconds=2)))
            await asyncio.sleep(1)
            await admin.pause(PauseRequest(authority=cafe.authority))
            await asyncio.sleep(QUIET_S)
            held = bodies(cafe.calls)

        # A worker started during the pause must not call either.
        await add(port, task(cafe.authority, b"later", queue="another"))
        async with worker(config):
            await asyncio.sleep(QUIET_S)
            still_held = bodies(cafe.calls)
            await admin.resume(ResumeRequest(authority=cafe.authority))
            await cafe.wait_calls(2)

    assert held == []
    assert still_held == []
    assert sorted(bodies(cafe.calls)) == [b"later", b"taken"]


async def test_bad_requests_and_a_resume_of_nothing(kafka_bootstrap: str) -> None:
    config = admin_config(kafka_bootstrap)
    async with (
        rpc_with_metrics(config) as (port, _),
        Channel("127.0.0.1", port) as channel,
    ):
        admin = AdminStub(channel)
        with pytest.raises(GRPCError) as no_port:
            await admin.pause(PauseRequest(authority="cafe.example"))
        with pytest.raises(GRPCError) as bad_queue:
            await admin.pause(PauseRequest(authority="cafe:1", queue="dlq"))
        nothing = await admin.resume(ResumeRequest(authority="cafe:1", queue="q"))

    assert no_port.value.status is Status.INVALID_ARGUMENT
    assert bad_queue.value.status is Status.INVALID_ARGUMENT
    assert not nothing.was_paused


@pytest.mark.parametrize("enabled", [False, True])
async def test_admin_is_served_only_when_enabled(
    kafka_bootstrap: str, enabled: bool
) -> None:
    config = ops_config(kafka_bootstrap, admin={"enabled": enabled})
    async with (
        rpc_with_metrics(config) as (port, _),
        Channel("127.0.0.1", port) as channel,
    ):
        reflection = ServerReflectionStub(channel).ServerReflectionInfo
        [reply] = await reflection([ServerReflectionRequest(list_services="")])

    listed = {s.name for s in reply.list_services_response.service}
    assert ("taskqueue.admin.Admin" in listed) is enabled
