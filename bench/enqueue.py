"""Enqueue benchmark: ``add`` throughput and latency against a bare grpclib server.

Ours is the real rpc server (``run_rpc``: validate, write to Kafka with
acks=all, reply after the acknowledgement). The baseline is a bare grpclib
server with the same ``TaskQueue`` service and messages whose ``add`` handler
reads the Task and replies at once. Each runs in a child process of its own;
this process drives both with the same load: C concurrent callers over one
HTTP/2 channel, each making ``add`` calls back to back, a fixed number of
calls per level (bounded in time too).

    .venv/bin/python bench/enqueue.py [--bootstrap HOST:PORT] [--rounds N]
"""

import argparse
import asyncio
import contextlib
import cProfile
import multiprocessing.connection
import pstats
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from google.protobuf.any_pb2 import Any as AnyPb
from grpclib.client import Channel
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Server, Stream

from taskqueue.protobuf.service_grpc import TaskQueueBase, TaskQueueStub
from taskqueue.protobuf.service_pb2 import AddReply, Task
from taskqueue.server.app import run_rpc
from taskqueue.server.config import Config

if not __package__:  # run as a script: make the `bench` package importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))
from bench import _common

OURS = "taskqueue"
BASELINE = "bare grpclib"
# Not the baseline: what the bare server costs once it also waits for Kafka.
KAFKA_REF = "grpclib+kafka"
SIDES = (BASELINE, KAFKA_REF, OURS)
WARMUP_CALLS = 1500
CALL_TIMEOUT_S = 10.0
TARGET_RATIO = 0.7


# -- the servers (child processes) -----------------------------------------------


class BareTaskQueue(TaskQueueBase):
    """The baseline: same service and messages; ``add`` just replies."""

    async def add(self, stream: "Stream[Task, AddReply]") -> None:
        task = await stream.recv_message()
        assert task is not None
        await stream.send_message(AddReply(id="bare"))


class KafkaTaskQueue(TaskQueueBase):
    """The reference: the bare handler plus one acks=all write per task.

    Same producer settings as taskqueue's writer (idempotent, acks=all,
    linger 2 ms), no validation, no headers, a pre-created topic.
    """

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic

    async def add(self, stream: "Stream[Task, AddReply]") -> None:
        task = await stream.recv_message()
        assert task is not None
        task_id = uuid.uuid4().hex
        sent = await self._producer.send(
            self._topic, task.SerializeToString(), key=task_id.encode()
        )
        await sent
        await stream.send_message(AddReply(id=task_id))


@dataclass(frozen=True)
class Spec:
    """What a server child runs (picklable)."""

    side: str
    config: Config
    log_level: str
    tmp: str
    profile_to: str = ""  # a file for cProfile's figures; empty: no profile


def serve(conn: multiprocessing.connection.Connection, spec: Spec) -> None:
    """Child entry point: serve ``spec.side`` until the parent says stop."""
    _common.configure_logging(spec.log_level, Path(spec.tmp))
    profiler = cProfile.Profile() if spec.profile_to else None
    if profiler is not None:
        profiler.enable()
    asyncio.run(_serve(conn, spec.side, spec.config))
    if profiler is not None:
        profiler.disable()
        with open(spec.profile_to, "w") as out:
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("tottime").print_stats(30)
            stats.sort_stats("cumulative").print_stats(40)
            stats.sort_stats("cumulative").print_stats("taskqueue/|aiokafka/", 40)


async def _serve(
    conn: multiprocessing.connection.Connection, side: str, config: Config
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    if side == OURS:
        bound: asyncio.Future[int] = loop.create_future()
        running = asyncio.create_task(run_rpc(config, stop, bound.set_result))
        either: list[asyncio.Future[Any]] = [running, bound]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if running.done():
            running.result()  # raises what stopped it
            raise RuntimeError("run_rpc returned before serving")
        conn.send(bound.result())
        await loop.run_in_executor(None, conn.recv)
        stop.set()
        await running
        return

    async with contextlib.AsyncExitStack() as stack:
        service: TaskQueueBase = BareTaskQueue()
        if side == KAFKA_REF:
            service = await stack.enter_async_context(kafka_service(config))
        server = Server([service])
        await server.start("127.0.0.1", 0)
        sockets = server._server.sockets  # type: ignore[union-attr]
        conn.send(int(sockets[0].getsockname()[1]))
        await loop.run_in_executor(None, conn.recv)
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def kafka_service(config: Config) -> AsyncIterator[KafkaTaskQueue]:
    bootstrap = config.kafka.bootstrap_servers
    topic = f"{config.topics.prefix}.reference"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, config.kafka.partitions, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=2
    )
    await producer.start()
    try:
        yield KafkaTaskQueue(producer, topic)
    finally:
        await producer.stop()


# -- the load --------------------------------------------------------------------


@dataclass
class Level:
    side: str
    concurrency: int
    calls: int
    errors: int
    elapsed_s: float
    latencies_s: list[float]
    server_cpu_s: float
    broker_cpu_s: float
    client_cpu_s: float

    @property
    def rate(self) -> float:
        return self.calls / self.elapsed_s

    def per_call_us(self, cpu_s: float) -> float:
        return cpu_s / max(1, self.calls) * 1e6

    @property
    def total_cpu_us(self) -> float:
        """Server, broker and client CPU per call: what one add costs."""
        cpu_s = self.server_cpu_s + self.broker_cpu_s + self.client_cpu_s
        return self.per_call_us(cpu_s)


def make_task(payload: int) -> Task:
    # The authority is where taskqueue would call back; nobody needs to listen.
    return Task(
        authority="127.0.0.1:9",
        method="/bench.Echo/ping",
        argument=AnyPb(type_url="type.googleapis.com/bench.Ping", value=b"x" * payload),
    )


async def drive(
    port: int, task: Task, concurrency: int, count: int, max_s: float
) -> tuple[int, int, float, list[float]]:
    """``count`` add calls by ``concurrency`` callers: (ok, errors, s, latencies)."""
    channel = Channel("127.0.0.1", port)
    stub = TaskQueueStub(channel)
    latencies: list[float] = []
    issued = errors = 0
    deadline = time.monotonic() + max_s

    async def caller() -> None:
        nonlocal issued, errors
        while issued < count and time.monotonic() < deadline:
            issued += 1
            started = time.perf_counter()
            try:
                await stub.add(task, timeout=CALL_TIMEOUT_S)
            except (GRPCError, StreamTerminatedError, TimeoutError):
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        channel.close()
    return len(latencies), errors, elapsed, latencies


def measure_side(
    side: str,
    args: argparse.Namespace,
    broker: _common.Broker,
    tmp: Path,
    profile_to: str = "",
) -> list[Level]:
    config = _common.make_config(broker.bootstrap)
    task = make_task(args.payload)
    levels: list[Level] = []
    spec = Spec(side, config, args.log_level, str(tmp), profile_to)
    with _common.child(serve, spec) as server:
        # Warms the broker's JIT, the topic and the connections alike.
        asyncio.run(drive(server.ready, task, 16, WARMUP_CALLS, args.max_seconds))
        for concurrency in args.concurrency:
            count = args.calls * min(max(1, concurrency // 4), 8)
            before = (
                _common.cpu_s(server.pid),
                _common.cpu_s(broker.pid),
                time.process_time(),
            )
            ok, errors, elapsed, latencies = asyncio.run(
                drive(server.ready, task, concurrency, count, args.max_seconds)
            )
            levels.append(
                Level(
                    side=side,
                    concurrency=concurrency,
                    calls=ok,
                    errors=errors,
                    elapsed_s=elapsed,
                    latencies_s=latencies,
                    server_cpu_s=_common.cpu_s(server.pid) - before[0],
                    broker_cpu_s=_common.cpu_s(broker.pid) - before[1],
                    client_cpu_s=time.process_time() - before[2],
                )
            )
    return levels


# -- report ----------------------------------------------------------------------


def report(results: dict[tuple[str, int], list[Level]], concurrency: list[int]) -> None:
    rows: list[list[object]] = []
    for c in concurrency:
        for side in SIDES:
            for level in results[(side, c)]:
                lat = level.latencies_s
                rows.append(
                    [
                        c,
                        side,
                        level.calls,
                        level.errors,
                        level.rate,
                        _common.percentile(lat, 50) * 1000,
                        _common.percentile(lat, 99) * 1000,
                        level.per_call_us(level.server_cpu_s),
                        level.per_call_us(level.broker_cpu_s),
                        level.per_call_us(level.client_cpu_s),
                    ]
                )
    print(
        _common.table(
            [
                "conc",
                "server",
                "calls",
                "errors",
                "tasks/s",
                "p50 ms",
                "p99 ms",
                "srv cpu us/call",
                "kafka cpu us/call",
                "client cpu us/call",
            ],
            rows,
        )
    )
    print()
    ratio_rows: list[list[object]] = []
    for c in concurrency:
        ours, base, ref = (
            _common.median([lv.rate for lv in results[(side, c)]])
            for side in (OURS, BASELINE, KAFKA_REF)
        )
        ours_cpu, base_cpu = (
            _common.median([lv.total_cpu_us for lv in results[(side, c)]])
            for side in (OURS, BASELINE)
        )
        ratio = ours / base
        verdict = "ok" if ratio >= TARGET_RATIO else "BELOW TARGET"
        ratio_rows.append(
            [
                c,
                ours,
                base,
                f"{ratio:.3f}",
                verdict,
                f"{ours / ref:.3f}",
                f"{base_cpu / ours_cpu:.3f}",
            ]
        )
    print(
        _common.table(
            [
                "conc",
                "ours tasks/s",
                "baseline tasks/s",
                "RATIO ours/baseline",
                f">= {TARGET_RATIO}",
                "ours/grpclib+kafka",
                "cpu ratio",
            ],
            ratio_rows,
        )
    )
    print(
        "\nbaseline: bare grpclib server, same Task/AddReply, replies at once. "
        "grpclib+kafka: the baseline plus one acks=all aiokafka write per task "
        "(for reference, not the target). cpu ratio: baseline's over ours' "
        "server+broker+client CPU per call (what the ratio would be were the run "
        "CPU-bound and alone on the machine). Medians over rounds."
    )


def main() -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--concurrency",
        type=lambda text: [int(c) for c in text.split(",")],
        default=[1, 16, 64],
        help="comma-separated concurrency levels (default 1,16,64)",
    )
    p.add_argument(
        "--calls",
        type=int,
        default=1000,
        help="calls per level: this x concurrency/4, between x1 and x8 "
        "(default 1000: 1000, 4000, 8000 at 1, 16, 64)",
    )
    p.add_argument("--payload", type=int, default=32, help="argument bytes")
    p.add_argument(
        "--max-seconds", type=float, default=30.0, help="time bound of each level"
    )
    args = p.parse_args()

    with _common.temp_dir() as tmp, _common.broker(args.bootstrap, tmp) as broker:
        print(f"enqueue benchmark on {_common.machine(broker.version)}")
        print(
            f"payload {args.payload} B, one HTTP/2 channel, levels {args.concurrency}, "
            f"{args.rounds} round(s)\n"
        )
        results: dict[tuple[str, int], list[Level]] = {}
        for _ in range(args.rounds):
            for side in SIDES:
                for level in measure_side(side, args, broker, tmp):
                    results.setdefault((side, level.concurrency), []).append(level)
        report(results, args.concurrency)
        print(f"after the run: {_common.load()}")

        if args.profile:
            profile_to = tmp / "profile.txt"
            args.concurrency = [max(args.concurrency)]
            measure_side(OURS, args, broker, tmp, str(profile_to))
            print(f"\ncProfile of our rpc server at concurrency {args.concurrency}:")
            with contextlib.suppress(OSError):
                print(profile_to.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
