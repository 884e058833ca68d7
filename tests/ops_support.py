"""Running the processes with their metrics endpoint, and reading it."""

import asyncio
import contextlib
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.any_pb2 import Any as AnyMessage
from grpclib.client import Channel
from prometheus_client.parser import text_string_to_metric_families

from taskqueue.protobuf.service_grpc import TaskQueueStub
from taskqueue.protobuf.service_pb2 import AddReply, Task
from taskqueue.server.app import run_rpc, run_worker
from taskqueue.server.config import Config
from taskqueue.server.worker import TierName, Worker
from tests.conftest import make_config

METHOD = "/coffeemachine.CoffeeMachine/make_latte"
START_TIMEOUT_S = 30.0


def ops_config(bootstrap: str, **sections: object) -> Config:
    """A test config with metrics on a free port and a fast health probe."""
    base: dict[str, object] = {
        "metrics": {"port": 0},
        "health": {"interval_s": 0.2, "timeout_s": 2},
    }
    return make_config(bootstrap, **(base | sections))


async def _bound(
    running: "asyncio.Task[Any]", *futures: "asyncio.Future[int]"
) -> list[int]:
    """The ports once all are bound; the task's error if it stops first."""
    async with asyncio.timeout(START_TIMEOUT_S):
        for future in futures:
            either: set[asyncio.Future[Any]] = {future, running}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not future.done():
                running.result()  # raises what stopped it
                raise RuntimeError("stopped before it was ready")
    return [future.result() for future in futures]


@contextlib.asynccontextmanager
async def rpc_with_metrics(config: Config) -> AsyncIterator[tuple[int, int]]:
    """The rpc server; yields its gRPC port and its metrics port."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    grpc_port: asyncio.Future[int] = loop.create_future()
    metrics_port: asyncio.Future[int] = loop.create_future()
    running = asyncio.create_task(
        run_rpc(
            config, stop, grpc_port.set_result, metrics_ready=metrics_port.set_result
        )
    )
    try:
        port, port_of_metrics = await _bound(running, grpc_port, metrics_port)
        yield port, port_of_metrics
    finally:
        stop.set()
        await running


@contextlib.asynccontextmanager
async def worker_with_metrics(
    config: Config, tier: TierName = TierName.MAIN
) -> AsyncIterator[tuple[Worker, int]]:
    """A worker; yields it and its metrics port."""
    worker = Worker(config, tier)
    metrics_port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    running = asyncio.create_task(run_worker(config, worker, metrics_port.set_result))
    try:
        [port] = await _bound(running, metrics_port)
        yield worker, port
    finally:
        worker.stop()
        await running


def task(authority: str, body: bytes = b"", **fields: object) -> Task:
    argument = AnyMessage(
        type_url="type.googleapis.com/coffeemachine.LatteOrder", value=body
    )
    fields.setdefault("method", METHOD)
    return Task(authority=authority, argument=argument, **fields)  # type: ignore[arg-type]


async def add(port: int, one: Task) -> AddReply:
    async with Channel("127.0.0.1", port) as channel:
        reply: AddReply = await TaskQueueStub(channel).add(one, timeout=10)
        return reply


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    return await asyncio.to_thread(_get, f"http://127.0.0.1:{port}{path}")


@dataclass(frozen=True)
class Samples:
    """One scrape: sample values by name and labels."""

    values: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def __call__(self, name: str, **labels: str) -> float:
        return self.values.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """Sum over every series of ``name`` carrying at least ``labels``."""
        wanted = set(labels.items())
        return sum(
            value
            for (sample, have), value in self.values.items()
            if sample == name and wanted <= have
        )


async def scrape(port: int) -> Samples:
    status, body = await http_get(port, "/metrics")
    assert status == 200, body
    values = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            values[key] = sample.value
    return Samples(values)


async def scrape_until(
    port: int, condition: Callable[[Samples], bool], timeout_s: float = 20.0
) -> Samples:
    """Scrape until ``condition`` holds; the last scrape either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = await scrape(port)
        if condition(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.1)
