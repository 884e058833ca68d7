"""Health: grpc.health.v1 and /healthz follow the broker; a stuck worker says so.

The broker test runs a broker of its own, since it stops and restarts it.
"""

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from grpclib.client import Channel
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from taskqueue.server.app import run_worker
from taskqueue.server.config import HealthConfig
from taskqueue.server.health import Probe, Verdict
from taskqueue.server.worker import TierName, Worker
from tests.ops_support import (
    add,
    http_get,
    ops_config,
    rpc_with_metrics,
    task,
    worker_with_metrics,
)
from tests.support import Received, target

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "localkafka"))
from localbroker import LocalBroker

SERVICE = "taskqueue.service.TaskQueue"
SERVING = HealthCheckResponse.SERVING
NOT_SERVING = HealthCheckResponse.NOT_SERVING
FLIP_TIMEOUT_S = 30.0


async def check(channel: Channel, service: str) -> int:
    reply = await HealthStub(channel).Check(
        HealthCheckRequest(service=service), timeout=5
    )
    return int(reply.status)


async def wait_health(
    channel: Channel, metrics_port: int, status: int
) -> tuple[int, int, int, dict[str, object]]:
    """Poll until both services report ``status``; then what each said."""
    async with asyncio.timeout(FLIP_TIMEOUT_S):
        while True:
            overall, service = await check(channel, ""), await check(channel, SERVICE)
            code, body = await http_get(metrics_port, "/healthz")
            if overall == service == status:
                return overall, service, code, json.loads(body)
            await asyncio.sleep(0.1)


async def test_rpc_health_follows_the_broker(own_broker: LocalBroker) -> None:
    config = ops_config(own_broker.bootstrap)
    async with (
        rpc_with_metrics(config) as (port, metrics_port),
        Channel("127.0.0.1", port) as channel,
    ):
        watch = HealthStub(channel).Watch.open()
        async with watch:
            await watch.send_message(HealthCheckRequest(service=SERVICE), end=True)
            up = await wait_health(channel, metrics_port, SERVING)
            await asyncio.to_thread(own_broker.stop)
            down = await wait_health(channel, metrics_port, NOT_SERVING)
            watched = await watch_until(watch, NOT_SERVING)
            await asyncio.to_thread(own_broker.start)
            again = await wait_health(channel, metrics_port, SERVING)
            await watch.cancel()

    assert up[2:] == (200, {"healthy": True, "detail": "broker reachable"})
    assert down[2:] == (503, {"healthy": False, "detail": "broker unreachable"})
    assert again[2] == 200
    # Watchers are told of each change as it happens.
    assert watched[-2:] == [SERVING, NOT_SERVING]


async def watch_until(watch: Any, status: int) -> list[int]:
    """Statuses a Watch stream sent, up to and including ``status``."""
    seen: list[int] = []
    async with asyncio.timeout(FLIP_TIMEOUT_S):
        while not seen or seen[-1] != status:
            reply = await watch.recv_message()
            assert reply is not None
            seen.append(int(reply.status))
    return seen


async def test_worker_is_unhealthy_while_stuck_and_recovers(
    kafka_bootstrap: str,
) -> None:
    # One record at a time, and the target holds it: the partition has lag
    # and nothing moves.
    config = ops_config(
        kafka_bootstrap,
        kafka={"partitions": 1},
        worker={"concurrency": 1, "max_pending": 1},
        health={
            "interval_s": 0.2,
            "timeout_s": 2,
            "stuck_after_s": 1,
            "exit_when_stuck": False,
        },
    )
    release = asyncio.Event()

    async def hold(_: Received) -> None:
        await release.wait()

    async with (
        target(hold) as cafe,
        rpc_with_metrics(config) as (port, _),
        worker_with_metrics(config) as (_, metrics_port),
    ):
        healthy_at_start = await wait_healthz(metrics_port, 200)
        for _ in range(3):
            await add(port, task(cafe.authority))
        await cafe.wait_calls(1)
        stuck = await wait_healthz(metrics_port, 503)
        release.set()
        recovered = await wait_healthz(metrics_port, 200)

    assert healthy_at_start["healthy"] is True
    assert stuck["healthy"] is False
    assert str(stuck["detail"]).startswith("stuck: 1 partition(s) have lag")
    assert recovered["healthy"] is True


async def test_a_stuck_worker_stops_itself_for_its_supervisor(
    kafka_bootstrap: str,
) -> None:
    """With exit_when_stuck (the default) the worker gives up, and the CLI
    turns that into exit code 3."""
    config = ops_config(
        kafka_bootstrap,
        kafka={"partitions": 1},
        worker={"concurrency": 1, "max_pending": 1, "shutdown_grace_s": 1},
        health={"interval_s": 0.2, "timeout_s": 2, "stuck_after_s": 1},
    )
    release = asyncio.Event()

    async def hold(_: Received) -> None:
        await release.wait()

    async with target(hold) as cafe, rpc_with_metrics(config) as (port, _):
        worker = Worker(config, TierName.MAIN)
        running = asyncio.create_task(run_worker(config, worker))
        try:
            for _ in range(3):
                await add(port, task(cafe.authority))
            async with asyncio.timeout(FLIP_TIMEOUT_S):
                gave_up = await asyncio.shield(running)
        finally:
            release.set()
            worker.stop()
            await running

    assert gave_up is True


async def wait_healthz(port: int, code: int) -> dict[str, object]:
    async with asyncio.timeout(FLIP_TIMEOUT_S):
        while True:
            got, body = await http_get(port, "/healthz")
            if got == code:
                answer: dict[str, object] = json.loads(body)
                return answer
            await asyncio.sleep(0.1)


class Fixed(Probe):
    async def check(self) -> Verdict:
        return Verdict(True, "fine", time.monotonic())


def test_a_verdict_too_old_counts_as_unhealthy() -> None:
    probe = Fixed(HealthConfig(interval_s=1, timeout_s=1))
    probe._set(Verdict(True, "fine", time.monotonic()))
    assert probe.verdict() == (True, "fine")

    probe._set(Verdict(True, "fine", time.monotonic() - 7))
    healthy, detail = probe.verdict()
    assert not healthy
    assert "no health check for 7s" in detail
