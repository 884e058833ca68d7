"""Dispatch benchmark: how fast a Worker drains a backlog into a target server.

N tasks are enqueued through the real rpc server (so the main topic holds
exactly the records ``add`` writes), all due at once and aimed at one target:
a grpclib server in a child process that counts the calls it receives. Then,
one after the other, each in a consumer group of its own over the same topic:

- ours: ``Worker(config, TierName.MAIN).run()`` with the product's default
  worker settings (concurrency 100, max_pending 1000, commit every 0.2 s);
- baseline: a bare aiokafka consumer loop that takes up to max_pending
  records, decodes each Task and makes the same grpclib call (raw bytes, same
  deadline and the same four metadata entries) with as many calls in flight
  as the worker's concurrency, then commits, and again.

The figure is calls/s at the target between its first and its last call.

    .venv/bin/python bench/dispatch.py [--bootstrap HOST:PORT] [--tasks N]
"""

import argparse
import asyncio
import cProfile
import multiprocessing.connection
import pstats
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from google.protobuf.any_pb2 import Any as AnyPb
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Cardinality, Handler
from grpclib.server import Server, Stream

from taskqueue.protobuf.service_grpc import TaskQueueStub
from taskqueue.protobuf.service_pb2 import Task
from taskqueue.server.app import run_rpc
from taskqueue.server.config import Config
from taskqueue.server.dispatcher import RawCodec
from taskqueue.server.topics import Topics
from taskqueue.server.worker import TierName, Worker

if not __package__:  # run as a script: make the `bench` package importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))
from bench import _common

OURS = "taskqueue Worker"
BASELINE = "aiokafka+grpclib loop"
METHOD = "/bench.Target/ping"
PREFILL_CONCURRENCY = 64
TARGET_RATIO = 0.7
POLL_S = 0.01
SETTLE_S = 0.3

# Shared with the target child: calls received, first and last (monotonic s).
COUNT, FIRST, LAST = 0, 1, 2
Stats = Any  # a multiprocessing RawArray of 3 doubles


# -- the target (child process) --------------------------------------------------


class CountingTarget:
    """Answers METHOD with an empty message and counts the calls."""

    def __init__(self, stats: Stats, latency_s: float) -> None:
        self._stats = stats
        self._latency_s = latency_s

    def __mapping__(self) -> dict[str, Handler]:
        return {METHOD: Handler(self._handle, Cardinality.UNARY_UNARY, bytes, bytes)}

    async def _handle(self, stream: "Stream[bytes, bytes]") -> None:
        await stream.recv_message()
        now = time.monotonic()
        stats = self._stats
        stats[COUNT] += 1
        if stats[COUNT] == 1:
            stats[FIRST] = now
        stats[LAST] = now
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        await stream.send_message(b"")


def serve_target(
    conn: multiprocessing.connection.Connection, stats: Stats, latency_s: float
) -> None:
    asyncio.run(_serve_target(conn, stats, latency_s))


async def _serve_target(
    conn: multiprocessing.connection.Connection, stats: Stats, latency_s: float
) -> None:
    server = Server([CountingTarget(stats, latency_s)], codec=RawCodec())
    await server.start("127.0.0.1", 0)
    sockets = server._server.sockets  # type: ignore[union-attr]
    conn.send(int(sockets[0].getsockname()[1]))
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    server.close()
    await server.wait_closed()


# -- pre-fill --------------------------------------------------------------------


async def prefill(config: Config, authority: str, count: int, payload: int) -> float:
    """Enqueue ``count`` tasks through the real rpc server; returns seconds."""
    task = Task(
        authority=authority,
        method=METHOD,
        argument=AnyPb(type_url="type.googleapis.com/bench.Ping", value=b"x" * payload),
    )
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    rpc = asyncio.create_task(run_rpc(config, stop, bound.set_result))
    started = time.perf_counter()
    try:
        async with asyncio.timeout(60):
            port = await asyncio.shield(bound)
        channel = Channel("127.0.0.1", port)
        stub = TaskQueueStub(channel)
        left = count

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await stub.add(task, timeout=30)

        try:
            await asyncio.gather(*(caller() for _ in range(PREFILL_CONCURRENCY)))
        finally:
            channel.close()
    finally:
        stop.set()
        await rpc
    return time.perf_counter() - started


# -- the two sides ---------------------------------------------------------------


@dataclass
class Phase:
    side: str
    calls: int
    first_s: float  # first call at the target, seconds after the phase started
    drain_s: float  # from the first call to the last
    own_cpu_s: float  # this process: the worker or the baseline loop
    target_cpu_s: float
    broker_cpu_s: float

    @property
    def rate(self) -> float:
        return (self.calls - 1) / self.drain_s if self.drain_s > 0 else 0.0

    def per_call_us(self, cpu_s: float) -> float:
        return cpu_s / max(1, self.calls) * 1e6

    @property
    def total_cpu_us(self) -> float:
        """Own, target and broker CPU per call: what one dispatch costs."""
        cpu_s = self.own_cpu_s + self.target_cpu_s + self.broker_cpu_s
        return self.per_call_us(cpu_s)


@dataclass
class Setup:
    config: Config
    topic: str
    tasks: int
    stats: Stats
    target_pid: int
    broker_pid: int | None
    timeout_s: float


def fresh_group(config: Config) -> Config:
    worker = msgspec.structs.replace(
        config.worker, group_prefix=f"bench{uuid.uuid4().hex[:10]}"
    )
    return msgspec.structs.replace(config, worker=worker)


async def measure(
    setup: Setup, side: str, run: Callable[[asyncio.Event], Awaitable[None]]
) -> Phase:
    """Run ``run(stop)`` until the target has every task; the figures of it."""
    stats = setup.stats
    stats[COUNT] = stats[FIRST] = stats[LAST] = 0
    stop = asyncio.Event()
    cpu = (time.process_time(), *_child_cpu(setup))
    started = time.monotonic()
    running = asyncio.ensure_future(run(stop))
    deadline = started + setup.timeout_s
    try:
        while stats[COUNT] < setup.tasks:
            if running.done():
                running.result()
                raise RuntimeError(f"{side} stopped after {stats[COUNT]:.0f} calls")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{side}: {stats[COUNT]:.0f} calls in time")
            await asyncio.sleep(POLL_S)
        used = (time.process_time(), *_child_cpu(setup))
    finally:
        stop.set()
        await running
    await asyncio.sleep(SETTLE_S)  # duplicates, if any, would show up now
    return Phase(
        side=side,
        calls=int(stats[COUNT]),
        first_s=stats[FIRST] - started,
        drain_s=stats[LAST] - stats[FIRST],
        own_cpu_s=used[0] - cpu[0],
        target_cpu_s=used[1] - cpu[1],
        broker_cpu_s=used[2] - cpu[2],
    )


def _child_cpu(setup: Setup) -> tuple[float, float]:
    return _common.cpu_s(setup.target_pid), _common.cpu_s(setup.broker_pid)


def run_worker(config: Config) -> Callable[[asyncio.Event], Awaitable[None]]:
    async def run(stop: asyncio.Event) -> None:
        worker = Worker(fresh_group(config), TierName.MAIN)
        running = asyncio.create_task(worker.run())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([running, stopping], return_when=asyncio.FIRST_COMPLETED)
        worker.stop()
        stopping.cancel()
        await running

    return run


def run_baseline(
    config: Config, topic: str
) -> Callable[[asyncio.Event], Awaitable[None]]:
    async def run(stop: asyncio.Event) -> None:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=config.kafka.bootstrap_servers,
            group_id=f"bench{uuid.uuid4().hex[:10]}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        loop = BareLoop(config)
        await consumer.start()
        try:
            while not stop.is_set():
                batches = await consumer.getmany(
                    timeout_ms=100, max_records=config.worker.max_pending
                )
                records = [r for rs in batches.values() for r in rs]
                if records:
                    await loop.call_all(records)
                    await consumer.commit()
        finally:
            loop.close()
            await consumer.stop()

    return run


class BareLoop:
    """The baseline's calls: decode, call, up to ``concurrency`` at once."""

    def __init__(self, config: Config) -> None:
        self._concurrency = config.worker.concurrency
        self._deadline_s = config.queue_defaults.deadline_s
        self._channels: dict[str, Channel] = {}
        self._codec = RawCodec()

    async def call_all(self, records: list[ConsumerRecord]) -> None:
        pending = iter(records)

        async def drain() -> None:
            for record in pending:
                await self.call(record)

        lanes = min(self._concurrency, len(records))
        await asyncio.gather(*(drain() for _ in range(lanes)))

    async def call(self, record: ConsumerRecord) -> None:
        task = Task.FromString(record.value)
        channel = self._channels.get(task.authority)
        if channel is None:
            host, _, port = task.authority.rpartition(":")
            channel = Channel(host, int(port), codec=self._codec)
            self._channels[task.authority] = channel
        scheduled = datetime.fromtimestamp(record.timestamp / 1000, UTC)
        metadata = {
            "taskqueue-task-id": record.key.decode(),
            "taskqueue-attempt": "1",
            "taskqueue-queue": task.queue,
            "taskqueue-scheduled-at": scheduled.isoformat(timespec="milliseconds"),
        }
        method = UnaryUnaryMethod[bytes, bytes](channel, task.method, bytes, bytes)
        await method(task.argument.value, timeout=self._deadline_s, metadata=metadata)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


# -- report ----------------------------------------------------------------------


def report(phases: list[Phase], tasks: int) -> None:
    rows: list[list[object]] = [
        [
            p.side,
            p.calls,
            p.first_s,
            p.drain_s,
            p.rate,
            p.per_call_us(p.own_cpu_s),
            p.per_call_us(p.target_cpu_s),
            p.per_call_us(p.broker_cpu_s),
        ]
        for p in phases
    ]
    print(
        _common.table(
            [
                "side",
                "calls",
                "1st call s",
                "drain s",
                "calls/s",
                "own cpu us/call",
                "target cpu us/call",
                "kafka cpu us/call",
            ],
            rows,
        )
    )
    ours = _common.median([p.rate for p in phases if p.side == OURS])
    base = _common.median([p.rate for p in phases if p.side == BASELINE])
    ratio = ours / base
    verdict = "ok" if ratio >= TARGET_RATIO else "BELOW TARGET"
    print(
        f"\nRATIO ours/baseline: {ours:,.0f} / {base:,.0f} calls/s = {ratio:.3f} "
        f"(target >= {TARGET_RATIO}: {verdict}); medians over rounds"
    )
    ours_cpu = _common.median([p.total_cpu_us for p in phases if p.side == OURS])
    base_cpu = _common.median([p.total_cpu_us for p in phases if p.side == BASELINE])
    print(
        f"cpu ratio: {base_cpu:,.0f} / {ours_cpu:,.0f} us of CPU per call "
        f"(baseline/ours, own+target+broker) = {base_cpu / ours_cpu:.3f}: the ratio "
        "were the run CPU-bound and alone on the machine"
    )
    extra = [p for p in phases if p.calls != tasks]
    for p in extra:
        print(f"note: {p.side} made {p.calls} calls for {tasks} tasks")


def print_profile(profiler: cProfile.Profile) -> None:
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("cumulative").print_stats("taskqueue/", 30)


async def run_all(args: argparse.Namespace, broker: _common.Broker, tmp: Path) -> None:
    _common.configure_logging(args.log_level, tmp)
    config = _common.make_config(
        broker.bootstrap,
        worker={
            "concurrency": args.concurrency,
            # One target here: let it have every slot, as the baseline does.
            "max_calls_per_authority": args.concurrency,
            "max_pending": max(1000, 2 * args.concurrency),
        },
    )
    stats = _common.SPAWN.RawArray("d", 3)
    with _common.child(serve_target, stats, args.latency_ms / 1000) as target:
        authority = f"127.0.0.1:{target.ready}"
        topic = Topics(config.topics.prefix).main(authority, "default")
        print(f"dispatch benchmark on {_common.machine(broker.version)}")
        print(
            f"{args.tasks} tasks of {args.payload} B in {topic} "
            f"({config.kafka.partitions} partitions), worker concurrency "
            f"{config.worker.concurrency}, max_pending {config.worker.max_pending}, "
            f"target latency {args.latency_ms:g} ms"
        )
        took = await prefill(config, authority, args.tasks, args.payload)
        print(f"pre-filled through the rpc in {took:.1f}s\n")
        setup = Setup(
            config, topic, args.tasks, stats, target.pid, broker.pid, args.timeout
        )
        sides = [
            (BASELINE, run_baseline(config, topic)),
            (OURS, run_worker(config)),
        ]
        phases: list[Phase] = []
        for round_ in range(args.rounds):
            # Alternate which side goes first, so neither always runs warmer.
            for side, run in sides if round_ % 2 == 0 else sides[::-1]:
                phases.append(await measure(setup, side, run))
        report(phases, args.tasks)
        print(f"after the run: {_common.load()}")

        if args.profile:
            for side, run in sides[::-1]:
                profiler = cProfile.Profile()
                profiler.enable()
                phase = await measure(setup, side, run)
                profiler.disable()
                print(f"\ncProfile of {side} ({phase.rate:,.0f} calls/s profiled):")
                print_profile(profiler)


def main() -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=20_000, help="backlog size")
    p.add_argument("--payload", type=int, default=32, help="argument bytes")
    p.add_argument(
        "--concurrency", type=int, default=100, help="calls in flight, both sides"
    )
    p.add_argument(
        "--latency-ms", type=float, default=0.0, help="the target's time per call"
    )
    p.add_argument(
        "--timeout", type=float, default=300.0, help="time bound of each side's run"
    )
    args = p.parse_args()
    with _common.temp_dir() as tmp, _common.broker(args.bootstrap, tmp) as broker:
        asyncio.run(run_all(args, broker, tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
