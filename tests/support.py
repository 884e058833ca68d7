"""Test doubles that are real: a recording gRPC target and running services."""

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.proto import ProtoStatusDetailsCodec
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream

from taskqueue.server.app import run_rpc
from taskqueue.server.config import Config
from taskqueue.server.dispatcher import RawCodec
from taskqueue.server.worker import TierName, Worker

EMPTY = b""


@dataclass
class Received:
    method: str
    body: bytes
    metadata: dict[str, str]
    at: float  # wall-clock seconds


# Called for every request; raise GRPCError to fail it.
Behaviour = Callable[[Received], Awaitable[None]]


async def succeed(_: Received) -> None:
    return None


@dataclass
class Target:
    """A gRPC server on loopback that records every call it receives."""

    behaviour: Behaviour = succeed
    methods: tuple[str, ...] = ("/coffeemachine.CoffeeMachine/make_latte",)
    calls: list[Received] = field(default_factory=list)
    port: int = 0
    _server: Server | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __mapping__(self) -> dict[str, Handler]:
        return {
            path: Handler(
                functools.partial(self._handle, path),
                Cardinality.UNARY_UNARY,
                bytes,
                bytes,
            )
            for path in self.methods
        }

    async def _handle(self, method: str, stream: Stream[bytes, bytes]) -> None:
        body = await stream.recv_message()
        received = Received(
            method=method,
            body=body or b"",
            metadata={k: str(v) for k, v in (stream.metadata or {}).items()},
            at=time.time(),
        )
        self.calls.append(received)
        self._arrived.set()
        await self.behaviour(received)
        await stream.send_message(EMPTY)

    async def start(self, port: int = 0) -> None:
        self._server = Server(
            [self], codec=RawCodec(), status_details_codec=ProtoStatusDetailsCodec()
        )
        await self._server.start("127.0.0.1", port)
        self.port = self._server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def wait_calls(self, count: int, timeout_s: float = 20.0) -> list[Received]:
        """Wait until at least ``count`` calls arrived."""
        async with asyncio.timeout(timeout_s):
            while len(self.calls) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.calls


def fail_with(status: Status, message: str = "target failed") -> Behaviour:
    async def behaviour(_: Received) -> None:
        raise GRPCError(status, message)

    return behaviour


@contextlib.asynccontextmanager
async def target(behaviour: Behaviour = succeed) -> AsyncIterator[Target]:
    server = Target(behaviour)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def rpc_server(config: Config) -> AsyncIterator[int]:
    """Run the rpc server in this loop; yields its port."""
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_rpc(config, stop, bound.set_result))
    try:
        async with asyncio.timeout(30):
            port = await asyncio.shield(bound)
        yield port
    finally:
        stop.set()
        await task


@contextlib.asynccontextmanager
async def worker(
    config: Config, tier: TierName = TierName.MAIN
) -> AsyncIterator[Worker]:
    running = Worker(config, tier)
    task = asyncio.create_task(running.run())
    try:
        yield running
    finally:
        running.stop()
        await task


async def read_topic(
    bootstrap: str, topic: str, count: int, timeout_s: float = 20.0
) -> list[ConsumerRecord]:
    """Read the first ``count`` records of ``topic`` (all partitions), no group."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        metadata_max_age_ms=500,
    )
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        async with asyncio.timeout(timeout_s):
            while not (partitions := consumer.partitions_for_topic(topic)):
                await consumer.topics()  # refreshes the metadata
                await asyncio.sleep(0.1)
            consumer.assign([TopicPartition(topic, p) for p in partitions])
            while len(records) < count:
                batch = await consumer.getmany(timeout_ms=200)
                for part in batch.values():
                    records.extend(part)
    finally:
        await consumer.stop()
    return records
