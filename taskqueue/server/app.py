"""Running the rpc server and the workers as processes: start, signals, stop.

Each process also runs its health probe and, when ``metrics.port`` is set,
serves ``/metrics`` and ``/healthz`` over HTTP.
"""

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable

from taskqueue.server import tls
from taskqueue.server.admin import AdminService
from taskqueue.server.config import Config
from taskqueue.server.control import PauseBoard, PauseWriter
from taskqueue.server.health import BrokerProbe, WorkerProbe, grpc_health
from taskqueue.server.kafka import KafkaWriter
from taskqueue.server.metrics import HealthCheck, Metrics, MetricsServer
from taskqueue.server.rpc import TaskQueueService, make_server
from taskqueue.server.worker import TierName, Worker

log = logging.getLogger(__name__)

EXIT_FORCED = 130
EXIT_STUCK = 3


def _on_signals(first: Callable[[], None]) -> None:
    """First SIGINT/SIGTERM: graceful stop. Second: exit at once."""
    loop = asyncio.get_running_loop()
    received = 0

    def handle() -> None:
        nonlocal received
        received += 1
        if received == 1:
            log.info("stopping (signal again to exit at once)")
            first()
        else:
            os._exit(EXIT_FORCED)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handle)


async def serve_rpc(config: Config, ready: Callable[[int], None] | None = None) -> None:
    stop = asyncio.Event()
    _on_signals(stop.set)
    await run_rpc(config, stop, ready)


async def run_rpc(
    config: Config,
    stop: asyncio.Event,
    ready: Callable[[int], None] | None = None,
    *,
    metrics_ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until ``stop`` is set; ``ready`` gets the gRPC port and
    ``metrics_ready`` the metrics port (when ``metrics.port`` is set)."""
    ssl_context = tls.server_context(config.security.tls)
    metrics = Metrics()
    writer = KafkaWriter(config)
    await writer.start()
    try:
        probe = BrokerProbe(writer, config.health, metrics)
        service = TaskQueueService(config, writer, metrics=metrics)
        async with (
            probe.running(),
            _metrics_served(config, metrics, probe.verdict, metrics_ready),
            _admin_service(config) as admin,
        ):
            health = grpc_health(service, probe)
            server = make_server(config.rpc, service, health, *admin)
            await server.start(config.rpc.host, config.rpc.port, ssl=ssl_context)
            port = _bound_port(server)
            log.info(
                "rpc serving on %s:%d (%s)",
                config.rpc.host,
                port,
                tls.describe(config.security.tls),
            )
            if ready is not None:
                ready(port)
            await stop.wait()
            # Load balancers watching health stop sending before we stop taking.
            probe.drain()
            server.close()
            await server.wait_closed()
    finally:
        await writer.stop()
    log.info("rpc stopped")


@contextlib.asynccontextmanager
async def _admin_service(config: Config) -> AsyncIterator[list[AdminService]]:
    """The admin service when ``admin.enabled``, with what it reads and writes."""
    if not config.admin.enabled:
        yield []
        return
    board, writer = PauseBoard(config), PauseWriter(config)
    await board.start()
    try:
        await writer.start()
        try:
            yield [AdminService(config, board, writer)]
        finally:
            await writer.stop()
    finally:
        await board.stop()


@contextlib.asynccontextmanager
async def _metrics_served(
    config: Config,
    metrics: Metrics,
    health: HealthCheck,
    ready: Callable[[int], None] | None,
) -> AsyncIterator[None]:
    if config.metrics.port is None:
        yield
        return
    server = MetricsServer(config.metrics, metrics.registry, health)
    port = server.start()
    try:
        if ready is not None:
            ready(port)
        yield
    finally:
        await asyncio.to_thread(server.stop)


def _bound_port(server: object) -> int:
    sockets = server._server.sockets  # type: ignore[attr-defined]
    return int(sockets[0].getsockname()[1])


async def serve_worker(config: Config, tier: TierName) -> None:
    worker = Worker(config, tier)
    _on_signals(worker.stop)
    if await run_worker(config, worker):
        raise SystemExit(EXIT_STUCK)


async def run_worker(
    config: Config,
    worker: Worker,
    metrics_ready: Callable[[int], None] | None = None,
) -> bool:
    """Run ``worker`` (until its ``stop()``) with its health probe and metrics;
    True when it was stopped because it was stuck."""
    probe = WorkerProbe(worker, config.health)
    async with (
        probe.running(),
        _metrics_served(config, worker.metrics, probe.verdict, metrics_ready),
    ):
        await worker.run()
    return probe.gave_up
