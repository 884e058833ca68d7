"""Lateness of scheduled tasks: how long after its due time each call arrives.

Tasks are added at a steady rate, each with a delay drawn uniformly from
[--min-delay, --max-delay] seconds, through the real rpc server; a main-tier
and a retry-tier worker (product defaults: tiers 5s, 1m, 10m, ...) make the
calls to a target in a child process, which notes the wall-clock arrival of
each. Lateness is arrival minus the due time the server computed (sent to the
target as ``taskqueue-scheduled-at``). Early calls are counted, and must be 0.

    python bench/lateness.py [--rate 20] [--duration 60] [--max-delay 120]

Prints p50, p99, max lateness in ms and the early count; the MISSION target is
p99 under 50 ms, zero early.
"""

import asyncio
import contextlib
import multiprocessing.connection
import random
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.duration_pb2 import Duration
from grpclib.client import Channel
from grpclib.const import Cardinality, Handler
from grpclib.server import Server, Stream

from taskqueue.protobuf.service_grpc import TaskQueueStub
from taskqueue.protobuf.service_pb2 import Task
from taskqueue.server.app import run_rpc
from taskqueue.server.dispatcher import RawCodec
from taskqueue.server.worker import TierName, Worker

if not __package__:  # run as a script: make the `bench` package importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))
from bench import _common

METHOD = "/bench.Target/call"


class _Recorder:
    def __init__(self) -> None:
        self.arrivals: list[tuple[float, str]] = []

    def __mapping__(self) -> dict[str, Handler]:
        return {METHOD: Handler(self._call, Cardinality.UNARY_UNARY, bytes, bytes)}

    async def _call(self, stream: Stream[bytes, bytes]) -> None:
        at = time.time()
        await stream.recv_message()
        scheduled = dict(stream.metadata or {}).get("taskqueue-scheduled-at", "")
        self.arrivals.append((at, str(scheduled)))
        await stream.send_message(b"")


def target_main(conn: multiprocessing.connection.Connection) -> None:
    """Child: serve the target; on "stop", send back every arrival."""

    async def serve() -> None:
        recorder = _Recorder()
        server = Server([recorder], codec=RawCodec())
        await server.start("127.0.0.1", 0)
        conn.send(server._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        await asyncio.to_thread(conn.recv)
        server.close()
        await server.wait_closed()
        conn.send(recorder.arrivals)

    asyncio.run(serve())


async def enqueue(port: int, authority: str, args: Any) -> int:
    rng = random.Random(1)
    argument = AnyPb(type_url="type.googleapis.com/bench.Ping")
    sent = 0
    async with Channel("127.0.0.1", port) as channel:
        stub = TaskQueueStub(channel)
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < args.duration:
            delay = rng.uniform(args.min_delay, args.max_delay)
            whole, fraction = divmod(delay, 1)
            task = Task(
                authority=authority,
                method=METHOD,
                argument=argument,
                delay=Duration(seconds=int(whole), nanos=int(fraction * 1e9)),
            )
            await stub.add(task, timeout=10)
            sent += 1
            await asyncio.sleep(max(0.0, sent / args.rate - elapsed))
    return sent


async def run(args: Any, bootstrap: str) -> list[tuple[float, str]]:
    config = _common.make_config(bootstrap)
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    main, retry = Worker(config, TierName.MAIN), Worker(config, TierName.RETRY)

    with _common.child(target_main) as target:
        authority = f"127.0.0.1:{target.ready}"
        services = [
            asyncio.create_task(run_rpc(config, stop, bound.set_result)),
            asyncio.create_task(main.run()),
            asyncio.create_task(retry.run()),
        ]
        try:
            sent = await enqueue(await bound, authority, args)
            # Every task is due by now plus the longest delay; wait for them.
            await asyncio.sleep(args.max_delay + 2)
        finally:
            stop.set()
            main.stop()
            retry.stop()
            await asyncio.gather(*services)
        target.conn.send("stop")
        arrivals: list[tuple[float, str]] = target.conn.recv()
    print(f"sent {sent} tasks, {len(arrivals)} calls arrived")
    return arrivals


def report(arrivals: list[tuple[float, str]]) -> None:
    lateness_ms = sorted(
        (at - datetime.fromisoformat(scheduled).timestamp()) * 1000
        for at, scheduled in arrivals
    )
    early = sum(1 for late in lateness_ms if late < 0)
    print(f"{'calls':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'early':>6}")
    print(
        f"{len(lateness_ms):>8} {_common.percentile(lateness_ms, 50):>8.1f} "
        f"{_common.percentile(lateness_ms, 99):>8.1f} {lateness_ms[-1]:>8.1f} "
        f"{early:>6}"
    )
    print("target: p99 < 50 ms, early == 0")


def main() -> None:
    p = _common.parser(__doc__ or "", rounds=1)
    p.add_argument("--rate", type=float, default=20.0, help="tasks added per second")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of adding")
    p.add_argument("--min-delay", type=float, default=1.0)
    p.add_argument("--max-delay", type=float, default=120.0)
    args = p.parse_args()
    with _common.temp_dir() as tmp, _common.broker(args.bootstrap, tmp) as kafka:
        _common.configure_logging(args.log_level, tmp)
        arrivals = asyncio.run(run(args, kafka.bootstrap))
    report(arrivals)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
