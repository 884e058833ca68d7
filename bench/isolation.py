"""Isolation: does an authority that fails every call slow down another one?

Three targets in a child process: "good" and "other" answer every call, "bad"
answers every call with UNAVAILABLE (so its tasks are retried through the
ladder and the authority is backed off). Tasks to "good" are added at a
steady rate and the latency from add to call is measured, first beside
"other" at the same rate (the baseline), then beside "bad" at the same rate:
the same load, one authority failing. One rpc server and one worker per tier
serve all, in this process.

    python bench/isolation.py [--rate 50] [--duration 20]

Prints good's p50 and p99 latency in both phases and the ratio of the p99s;
the MISSION target is a change under 10 percent.
"""

import asyncio
import contextlib
import multiprocessing.connection
import sys
import time
from pathlib import Path
from typing import Any

from google.protobuf.any_pb2 import Any as AnyPb
from grpclib.client import Channel
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
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


class _Good:
    def __init__(self) -> None:
        self.latencies_s: list[float] = []

    def __mapping__(self) -> dict[str, Handler]:
        return {METHOD: Handler(self._call, Cardinality.UNARY_UNARY, bytes, bytes)}

    async def _call(self, stream: Stream[bytes, bytes]) -> None:
        at = time.time()
        await stream.recv_message()
        sent = dict(stream.metadata or {}).get("sent", "0")
        self.latencies_s.append(at - float(str(sent)))
        await stream.send_message(b"")


class _Bad:
    def __mapping__(self) -> dict[str, Handler]:
        return {METHOD: Handler(self._call, Cardinality.UNARY_UNARY, bytes, bytes)}

    async def _call(self, stream: Stream[bytes, bytes]) -> None:
        await stream.recv_message()
        raise GRPCError(Status.UNAVAILABLE, "always down")


class _Other:
    """A second healthy authority: the baseline's load equals the failing one's."""

    def __mapping__(self) -> dict[str, Handler]:
        return {METHOD: Handler(self._call, Cardinality.UNARY_UNARY, bytes, bytes)}

    async def _call(self, stream: Stream[bytes, bytes]) -> None:
        await stream.recv_message()
        await stream.send_message(b"")


def targets_main(conn: multiprocessing.connection.Connection) -> None:
    """Child: serve both targets; "reset" clears the latencies, "stop" ends."""

    async def serve() -> None:
        good = _Good()
        servers = [
            Server([handler], codec=RawCodec()) for handler in (good, _Bad(), _Other())
        ]
        for server in servers:
            await server.start("127.0.0.1", 0)
        conn.send([s._server.sockets[0].getsockname()[1] for s in servers])  # type: ignore[union-attr]
        while (command := await asyncio.to_thread(conn.recv)) != "stop":
            conn.send(good.latencies_s)
            good.latencies_s = []
            del command
        for server in servers:
            server.close()
            await server.wait_closed()

    asyncio.run(serve())


async def steady(stub: TaskQueueStub, authority: str, args: Any) -> None:
    argument = AnyPb(type_url="type.googleapis.com/bench.Ping")
    start = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - start) < args.duration:
        task = Task(
            authority=authority,
            method=METHOD,
            argument=argument,
            metadata={"sent": repr(time.time())},
        )
        await stub.add(task, timeout=10)
        sent += 1
        await asyncio.sleep(max(0.0, sent / args.rate - elapsed))


async def phase(
    stub: TaskQueueStub, conn: Any, good: str, beside: str, args: Any
) -> list[float]:
    await asyncio.gather(steady(stub, good, args), steady(stub, beside, args))
    await asyncio.sleep(2)  # the last calls to good arrive
    conn.send("collect")
    latencies: list[float] = conn.recv()
    return latencies


async def run(args: Any, bootstrap: str) -> tuple[list[float], list[float]]:
    config = _common.make_config(bootstrap)
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    main, retry = Worker(config, TierName.MAIN), Worker(config, TierName.RETRY)

    with _common.child(targets_main) as targets:
        good, bad, other = (f"127.0.0.1:{port}" for port in targets.ready)
        services = [
            asyncio.create_task(run_rpc(config, stop, bound.set_result)),
            asyncio.create_task(main.run()),
            asyncio.create_task(retry.run()),
        ]
        try:
            async with Channel("127.0.0.1", await bound) as channel:
                stub = TaskQueueStub(channel)
                await phase(stub, targets.conn, good, other, args)  # warm-up
                alone = await phase(stub, targets.conn, good, other, args)
                beside_bad = await phase(stub, targets.conn, good, bad, args)
        finally:
            stop.set()
            main.stop()
            retry.stop()
            await asyncio.gather(*services)
    return alone, beside_bad


def main() -> None:
    p = _common.parser(__doc__ or "", rounds=1)
    p.add_argument("--rate", type=float, default=50.0, help="tasks/s per authority")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    args = p.parse_args()
    with _common.temp_dir() as tmp, _common.broker(args.bootstrap, tmp) as kafka:
        _common.configure_logging(args.log_level, tmp)
        alone, beside_bad = asyncio.run(run(args, kafka.bootstrap))

    rows = []
    for name, values in (("beside healthy", alone), ("beside failing", beside_bad)):
        ms = [v * 1000 for v in values]
        rows.append(
            [name, len(ms), _common.percentile(ms, 50), _common.percentile(ms, 99)]
        )
    print(_common.table(["good authority", "calls", "p50 ms", "p99 ms"], rows))
    ratio = rows[1][3] / rows[0][3]  # type: ignore[operator]
    print(f"p99 beside a failing / a healthy authority: {ratio:.2f} (target < 1.10)")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
