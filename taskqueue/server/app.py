"""Running the rpc server and the workers as processes: start, signals, stop."""

import asyncio
import logging
import os
import signal
from collections.abc import Callable

from taskqueue.server.config import Config
from taskqueue.server.kafka import KafkaWriter
from taskqueue.server.rpc import TaskQueueService, make_server
from taskqueue.server.worker import TierName, Worker

log = logging.getLogger(__name__)

EXIT_FORCED = 130


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
    config: Config, stop: asyncio.Event, ready: Callable[[int], None] | None = None
) -> None:
    writer = KafkaWriter(config)
    await writer.start()
    try:
        server = make_server(TaskQueueService(config, writer))
        await server.start(config.rpc.host, config.rpc.port)
        port = _bound_port(server)
        log.info("rpc serving on %s:%d", config.rpc.host, port)
        if ready is not None:
            ready(port)
        await stop.wait()
        server.close()
        await server.wait_closed()
    finally:
        await writer.stop()
    log.info("rpc stopped")


def _bound_port(server: object) -> int:
    sockets = server._server.sockets  # type: ignore[attr-defined]
    return int(sockets[0].getsockname()[1])


async def serve_worker(config: Config, tier: TierName) -> None:
    worker = Worker(config, tier)
    _on_signals(worker.stop)
    await worker.run()
