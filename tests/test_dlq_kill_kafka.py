"""CASES.md C11 on a real broker: a worker process killed with SIGKILL right
after a dead-letter write, while an earlier record's call is still in flight.

One partition, concurrency 5, tasks at offsets 0 to 8: offset 4 is the slow
one (the target holds its first call open instead of sleeping 5 s), offset 5
fails with INVALID_ARGUMENT and is dead-lettered at once, the others succeed.
Offset 3 is held as well, until the worker has logged 5 to 8 as finished: the
commit that 3's completion allows is then computed with everything after 4
finished, so a worker that committed past an unfinished record would show it
there, not only by chance.
"""

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path

from aiokafka import TopicPartition
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from taskqueue.server.config import Config
from taskqueue.server.record import from_headers
from taskqueue.server.topics import Topics
from tests.conftest import ROOT, make_config
from tests.support import Received, Target, read_topic, rpc_server, target
from tests.test_delivery import (
    CALL_TIMEOUT_S,
    committed_offset,
    kill_9,
    show_log,
    wait_committed,
    worker_process,
    write_config,
)
from tests.test_dlq import end_offset
from tests.test_ladder_kafka import add, task

QUEUE = "c11"
ORDER = "order"  # metadata: the task's offset on the partition
TASK_ID = "taskqueue-task-id"
TASKS = 9
SLOW, FAILS = 4, 5


class Cafe:
    """The target's behaviour, by the task's offset."""

    def __init__(self) -> None:
        self.release_3 = asyncio.Event()
        self.release_4 = asyncio.Event()  # set once the first worker is dead
        self.broken = True  # until the operator fixes what failed offset 5

    async def __call__(self, received: Received) -> None:
        order = int(received.metadata[ORDER])
        if order == SLOW - 1:
            await self.release_3.wait()
        elif order == SLOW and not self.release_4.is_set():
            await self.release_4.wait()
        elif order == FAILS and self.broken:
            raise GRPCError(Status.INVALID_ARGUMENT, "no such size")


def calls_of(cafe: Target, order: int) -> list[Received]:
    return [c for c in cafe.calls if c.metadata[ORDER] == str(order)]


async def until(condition: Callable[[], bool], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.05)


async def wait_logged(log: Path, *lines: str) -> None:
    """Until the worker log holds each of ``lines`` (lifecycle events)."""

    def logged() -> bool:
        text = log.read_text(errors="replace") if log.exists() else ""
        return all(line in text for line in lines)

    await until(logged, CALL_TIMEOUT_S)


async def replay(location: str) -> tuple[int, list[dict[str, object]]]:
    """``taskqueue dlq replay --json`` as its own process."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "taskqueue.server", "dlq", "replay", "-c", location, "--json"),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(CALL_TIMEOUT_S):
        out, _ = await process.communicate()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    return process.returncode or 0, lines


def c11_config(bootstrap: str) -> Config:
    return make_config(
        bootstrap,
        kafka={"partitions": 1},
        # The broker's smallest session: the restarted worker waits that long
        # for the killed one to leave the group.
        worker={"concurrency": 5, "session_timeout_s": 6},
    )


async def test_c11_kill_9_after_a_dead_letter_write_with_a_slow_call_in_flight(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    config = c11_config(kafka_bootstrap)
    location = write_config(config, tmp_path / "config.yaml")
    log = tmp_path / "workers.log"
    topics = Topics(config.topics.prefix)
    behaviour = Cafe()

    try:
        async with target(behaviour) as cafe, rpc_server(config) as port:
            main = topics.main(cafe.authority, QUEUE)
            dlq = topics.dlq(cafe.authority, QUEUE)
            tp = TopicPartition(main, 0)
            tasks = [
                task(cafe.authority, queue=QUEUE, metadata={ORDER: str(i)})
                for i in range(TASKS)
            ]
            ids = [task_id for task_id, _ in await add(port, *tasks)]

            with worker_process(location, log) as first:
                await until(lambda: bool(calls_of(cafe, SLOW)), CALL_TIMEOUT_S)
                # Acknowledged: the worker logs a dead letter once Kafka took it.
                await wait_logged(
                    log,
                    f"task {ids[FAILS]} dead-lettered ",
                    *(f"task {ids[i]} succeeded " for i in range(FAILS + 1, TASKS)),
                )
                behaviour.release_3.set()
                await wait_committed(config, tp, SLOW)
                assert await committed_offset(config, tp) == SLOW
                await kill_9(first)  # 4's call is still held by the target

            assert await committed_offset(config, tp) == SLOW
            assert len(calls_of(cafe, SLOW)) == 1
            assert await end_offset(kafka_bootstrap, dlq) == 1
            behaviour.release_4.set()

            with worker_process(location, log):
                await wait_committed(config, tp, TASKS)
                letters = await read_topic(kafka_bootstrap, dlq, 2)

                behaviour.broken = False
                code, lines = await replay(location)
                await wait_committed(config, tp, TASKS + 1)
    finally:
        show_log(log)

    # After the restart 4 ran again, and 5 was dead-lettered again: both
    # copies carry the one task id.
    slow = calls_of(cafe, SLOW)
    assert [c.metadata[TASK_ID] for c in slow] == [ids[SLOW]] * 2
    assert len(letters) == 2
    assert [from_headers(list(r.headers)).id for r in letters] == [ids[FAILS]] * 2
    assert [r.key for r in letters] == [ids[FAILS].encode()] * 2

    # The replay requeued 5 once, and its target saw it once more.
    *steps, _ = lines
    assert code == 0, lines
    assert sorted((s["outcome"], s["task_id"]) for s in steps) == [
        ("copy of one replayed", ids[FAILS]),
        ("replayed", ids[FAILS]),
    ]
    assert await end_offset(kafka_bootstrap, main) == TASKS + 1
    fails = calls_of(cafe, FAILS)
    assert len(fails) == 3
    assert fails[-1].metadata[TASK_ID] == ids[FAILS]
    assert fails[-1].metadata["taskqueue-attempt"] == "1"
