"""Delivery guarantees through a worker *process* killed with SIGKILL mid-call.

The worker runs as ``python -m taskqueue.server FILE@test worker``; the target
holds the first call open until the test has killed that process, then a
second worker process of the same consumer group takes over.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from grpclib.client import Channel

from taskqueue.client.queue import QueueStub
from taskqueue.server import config as config_module
from taskqueue.server.config import Config
from taskqueue.server.topics import Topics
from tests.conftest import make_config
from tests.support import Received, Target, rpc_server, target

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "cafe"))
import cafe_pb2

CoffeeMachineQueue = QueueStub.for_(cafe_pb2, "CoffeeMachine")
TASK_ID = "taskqueue-task-id"
QUEUE = "orders"
# Start-up of a Python process plus a group join; after a kill -9 the group
# also waits for the dead member's session to expire (10 s by default).
CALL_TIMEOUT_S = 40.0
STOP_TIMEOUT_S = 15.0


class BlockFirstCall:
    """Target behaviour: the first call hangs until released; others succeed."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self._seen = 0

    async def __call__(self, _: Received) -> None:
        self._seen += 1
        if self._seen == 1:
            await self.release.wait()


def write_config(config: Config, path: Path) -> str:
    """The same settings as ``config``, as a ``FILE@test`` location."""
    path.write_bytes(msgspec.yaml.encode({"test": msgspec.to_builtins(config)}))
    location = f"{path}@test"
    assert config_module.load(location) == config
    return location


@contextlib.contextmanager
def worker_process(location: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A worker process; never outlives the block (SIGTERM, then SIGKILL)."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskqueue.server", location, "worker"],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def kill_9(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    code = await asyncio.to_thread(proc.wait, STOP_TIMEOUT_S)
    assert code == -signal.SIGKILL


@contextlib.asynccontextmanager
async def blocking_target() -> AsyncIterator[tuple[Target, BlockFirstCall]]:
    blocker = BlockFirstCall()
    async with target(blocker) as cafe:
        try:
            yield cafe, blocker
        finally:
            blocker.release.set()


def show_log(log: Path) -> None:
    """Printed at teardown, so a failing test shows what the workers did."""
    if log.exists():
        print(f"--- worker processes ({log}) ---")
        print(log.read_text(errors="replace")[-20_000:])


async def committed_offset(config: Config, tp: TopicPartition) -> int | None:
    admin = AIOKafkaAdminClient(bootstrap_servers=config.kafka.bootstrap_servers)
    await admin.start()
    try:
        group = f"{config.worker.group_prefix}-main"
        offsets = await admin.list_consumer_group_offsets(group, partitions=[tp])
    finally:
        await admin.close()
    found = offsets.get(tp)
    return None if found is None or found.offset < 0 else found.offset


async def wait_committed(config: Config, tp: TopicPartition, offset: int) -> None:
    async with asyncio.timeout(CALL_TIMEOUT_S):
        # The broker tells no one when a group commits: ask until it has.
        while (await committed_offset(config, tp) or 0) < offset:
            await asyncio.sleep(0.1)


async def test_at_least_once_task_is_called_again_after_worker_kill_9(
    tmp_path: Path, config: Config
) -> None:
    location = write_config(config, tmp_path / "config.yaml")
    log = tmp_path / "workers.log"

    try:
        async with (
            blocking_target() as (cafe, _),
            rpc_server(config) as port,
            Channel("127.0.0.1", port) as channel,
        ):
            queue = CoffeeMachineQueue(cafe.authority, channel)
            task_id = await queue.make_latte.add(
                cafe_pb2.LatteOrder(sugar=1), queue=QUEUE, timeout=10
            )

            with worker_process(location, log) as first:
                await cafe.wait_calls(1, CALL_TIMEOUT_S)
                await kill_9(first)  # the call is still in progress
            assert len(cafe.calls) == 1

            with worker_process(location, log):
                calls = await cafe.wait_calls(2, CALL_TIMEOUT_S)
    finally:
        show_log(log)

    assert [c.metadata[TASK_ID] for c in calls[:2]] == [task_id, task_id]


async def test_at_most_once_task_is_not_called_again_after_worker_kill_9(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    # One partition, so the worker reads the tasks in the order they were added.
    config = make_config(kafka_bootstrap, kafka={"partitions": 1})
    location = write_config(config, tmp_path / "config.yaml")
    log = tmp_path / "workers.log"

    try:
        async with (
            blocking_target() as (cafe, _),
            rpc_server(config) as port,
            Channel("127.0.0.1", port) as channel,
        ):
            queue = CoffeeMachineQueue(cafe.authority, channel)
            tp = TopicPartition(
                Topics(config.topics.prefix).main(cafe.authority, QUEUE), 0
            )
            task_id = await queue.make_latte.add(
                cafe_pb2.LatteOrder(sugar=1),
                queue=QUEUE,
                delivery="at-most-once",
                timeout=10,
            )

            with worker_process(location, log) as first:
                await cafe.wait_calls(1, CALL_TIMEOUT_S)
                await kill_9(first)  # the call is still in progress
            assert len(cafe.calls) == 1

            with worker_process(location, log):
                # A later task on the same partition: the restarted worker has
                # read past the killed task once this one is called and the
                # group's committed offset reached the end of the partition.
                # An at-most-once record is called only after every earlier
                # record of its partition is finished, so a second call of the
                # first task would have arrived before this one.
                sentinel_id = await queue.make_latte.add(
                    cafe_pb2.LatteOrder(sugar=2),
                    queue=QUEUE,
                    delivery="at-most-once",
                    timeout=10,
                )
                await cafe.wait_calls(2, CALL_TIMEOUT_S)
                await wait_committed(config, tp, 2)
    finally:
        show_log(log)

    assert [c.metadata[TASK_ID] for c in cafe.calls] == [task_id, sentinel_id]


@pytest.fixture(autouse=True)
def _no_worker_left(tmp_path: Path) -> Iterator[None]:
    yield
    leftovers = subprocess.run(
        ["pgrep", "-f", f"taskqueue.server {tmp_path}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    assert not leftovers, f"worker processes left behind: {leftovers}"
