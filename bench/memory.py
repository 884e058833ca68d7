"""Worker memory with a large backlog and many scheduled tasks.

Writes --backlog records due now onto a queue's main topic and --scheduled
records due in an hour onto its `retry-1h` tier, straight with a producer in
taskqueue's record format (much faster than through `add`). Then starts a
main-tier and a retry-tier worker, each in a process of its own, against a
target that takes 50 ms per call, and samples each worker's resident memory
every second for --seconds.

    python bench/memory.py [--backlog 1000000] [--scheduled 100000] [--seconds 60]

The MISSION target: RSS flat and under 200 MB for both workers.
"""

import asyncio
import contextlib
import multiprocessing.connection
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from google.protobuf.any_pb2 import Any as AnyPb
from grpclib.const import Cardinality, Handler
from grpclib.server import Server, Stream

from taskqueue.protobuf.service_pb2 import Task
from taskqueue.server.config import Config
from taskqueue.server.dispatcher import RawCodec
from taskqueue.server.kafka import KafkaWriter
from taskqueue.server.record import State, encode_task, to_headers
from taskqueue.server.topics import Topics
from taskqueue.server.worker import TierName, Worker

if not __package__:  # run as a script: make the `bench` package importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))
from bench import _common

METHOD = "/bench.Target/call"
HOUR_MS = 3600 * 1000


class _Slow:
    def __mapping__(self) -> dict[str, Handler]:
        return {METHOD: Handler(self._call, Cardinality.UNARY_UNARY, bytes, bytes)}

    async def _call(self, stream: Stream[bytes, bytes]) -> None:
        await stream.recv_message()
        await asyncio.sleep(0.05)
        await stream.send_message(b"")


def target_main(conn: multiprocessing.connection.Connection) -> None:
    async def serve() -> None:
        server = Server([_Slow()], codec=RawCodec())
        await server.start("127.0.0.1", 0)
        conn.send(server._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        await asyncio.to_thread(conn.recv)
        server.close()

    asyncio.run(serve())


def worker_main(
    conn: multiprocessing.connection.Connection, config: Config, tier: TierName
) -> None:
    async def work() -> None:
        worker = Worker(config, tier)
        running = asyncio.create_task(worker.run())
        conn.send("ready")
        await asyncio.to_thread(conn.recv)
        worker.stop()
        await running

    asyncio.run(work())


async def fill(config: Config, authority: str, backlog: int, scheduled: int) -> None:
    """Write the records as `add` would, through its own topic creation."""
    topics = Topics(config.topics.prefix)
    writer = KafkaWriter(config)
    await writer.start()
    await writer.ensure_queue(topics.main(authority, "default"))
    await writer.stop()

    producer = AIOKafkaProducer(
        bootstrap_servers=config.kafka.bootstrap_servers, linger_ms=20, acks=1
    )
    await producer.start()
    try:
        now_ms = int(time.time() * 1000)
        for count, topic, due_ms in (
            (backlog, topics.main(authority, "default"), now_ms),
            (
                scheduled,
                topics.tier(authority, "default", "retry-1h"),
                now_ms + HOUR_MS,
            ),
        ):
            await _produce(
                producer,
                topic=topic,
                authority=authority,
                count=count,
                due_ms=due_ms,
                now_ms=now_ms,
            )
    finally:
        await producer.stop()


async def _produce(
    producer: AIOKafkaProducer,
    *,
    topic: str,
    authority: str,
    count: int,
    due_ms: int,
    now_ms: int,
) -> None:
    argument = AnyPb(type_url="type.googleapis.com/bench.Ping", value=b"x" * 32)
    pending = []
    for _ in range(count):
        task_id = uuid.uuid4().hex
        task = Task(
            authority=authority, method=METHOD, argument=argument, queue="default"
        )
        task.id = task_id
        task.eta.FromMilliseconds(due_ms)
        state = State(id=task_id, due_ms=due_ms, added_ms=now_ms)
        pending.append(
            await producer.send(
                topic,
                encode_task(task),
                key=task_id.encode(),
                headers=to_headers(state),
                timestamp_ms=now_ms,
            )
        )
        if len(pending) >= 10_000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = _common.parser(__doc__ or "", rounds=1)
    p.add_argument("--backlog", type=int, default=1_000_000)
    p.add_argument("--scheduled", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=60.0)
    args = p.parse_args()
    with _common.temp_dir() as tmp, _common.broker(args.bootstrap, tmp) as kafka:
        measure(args, _common.make_config(kafka.bootstrap))


def measure(args: Any, config: Config) -> None:
    with _common.child(target_main) as target:
        authority = f"127.0.0.1:{target.ready}"
        started = time.monotonic()
        asyncio.run(fill(config, authority, args.backlog, args.scheduled))
        print(
            f"wrote {args.backlog} + {args.scheduled} records in "
            f"{time.monotonic() - started:.0f}s"
        )
        with (
            _common.child(worker_main, config, TierName.MAIN) as main_worker,
            _common.child(worker_main, config, TierName.RETRY) as retry_worker,
        ):
            samples: dict[str, list[float]] = {"main": [], "retry": []}
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                samples["main"].append(rss_mb(main_worker.pid))
                samples["retry"].append(rss_mb(retry_worker.pid))
                time.sleep(1)
    rows = [
        [
            tier,
            f"{values[len(values) // 10]:.0f}",
            f"{max(values):.0f}",
            f"{values[-1]:.0f}",
        ]
        for tier, values in samples.items()
    ]
    print(_common.table(["worker", "RSS at 10% MB", "max MB", "last MB"], rows))
    print("target: flat and under 200 MB")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
