"""``taskqueue queues``: depth per tier, oldest due time and lateness, from Kafka."""

import asyncio
import json
import os
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
from google.protobuf.duration_pb2 import Duration
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from rich.console import Console

from taskqueue.server.config import Config
from taskqueue.server.kafka import KafkaWriter
from taskqueue.server.record import State, encode_task, to_headers
from taskqueue.server.stats import QueueStats, TierStats, table
from taskqueue.server.topics import Topics
from tests.ops_support import add, ops_config, rpc_with_metrics, task
from tests.support import Received, target, worker

CLI_TIMEOUT_S = 60.0


def write_config(config: Config, path: Path) -> str:
    path.write_bytes(msgspec.yaml.encode({"test": msgspec.to_builtins(config)}))
    return f"{path}@test"


async def run_queues(location: str, *options: str) -> str:
    """What ``taskqueue queues`` prints, asserting it exits 0."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from taskqueue.server.cli import main; main()",
        "queues",
        *options,
        "--config",
        location,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # Wide enough that no table cell wraps.
        env={**os.environ, "COLUMNS": "200"},
    )
    async with asyncio.timeout(CLI_TIMEOUT_S):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def queues_json(location: str) -> dict[str, Any]:
    """``taskqueue queues --json``, keyed by queue name."""
    return {q["queue"]: q for q in json.loads(await run_queues(location, "--json"))}


async def refuse_dead(received: Received) -> None:
    if received.body == b"dead":
        raise GRPCError(Status.NOT_FOUND, "no such order")


async def test_queues_shows_depth_due_time_and_dead_letters(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    config = ops_config(
        kafka_bootstrap, topics={"tiers": ["1s", "1m"]}, kafka={"partitions": 2}
    )
    location = write_config(config, tmp_path / "config.yaml")

    async with target(refuse_dead) as cafe, rpc_with_metrics(config) as (port, _):
        added_s = time.time()
        for body in (b"a", b"b", b"dead"):
            await add(port, task(cafe.authority, body, queue="orders"))
        await add(port, task(cafe.authority, delay=Duration(seconds=90)))
        before = await queues_json(location)

        async with worker(config):
            await cafe.wait_calls(3)
            after = await wait_for(location, lambda q: q["orders"]["depth"] == 0)

    orders, later = before["orders"], before["default"]
    assert orders["authority"] == later["authority"] == cafe.authority
    assert orders["depth"] == 3
    assert orders["tiers"]["main"]["depth"] == 3
    assert orders["tiers"]["dlq"]["depth"] == 0
    assert added_s - 1 <= iso_s(orders["oldest_due"]) <= time.time()
    assert orders["late_s"] >= 0
    assert later["tiers"]["retry-1m"]["depth"] == 1
    assert later["tiers"]["main"]["depth"] == 0
    assert iso_s(later["oldest_due"]) >= added_s + 89
    assert later["late_s"] == 0

    assert after["orders"]["tiers"]["main"] == {"depth": 0, "oldest_due": None}
    assert after["orders"]["tiers"]["dlq"]["depth"] == 1
    assert after["default"]["depth"] == 1  # no retry worker ran


async def wait_for(location: str, done: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        found = await queues_json(location)
        if done(found) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.5)


def iso_s(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_table_shows_busy_tiers_only() -> None:
    queue = QueueStats(
        "cafe:50051",
        "orders",
        {
            "main": TierStats("main", 4, 1_700_000_000_000),
            "retry-1m": TierStats("retry-1m", 2),
            "retry-5s": TierStats("retry-5s", 0),
            "dlq": TierStats("dlq", 1),
        },
    )
    console = Console(record=True, width=120)
    console.print(table([queue], now_s=1_700_000_010.0))
    text = console.export_text()

    header = next(line for line in text.splitlines() if "authority" in line)
    assert [c.strip() for c in header.split("┃") if c.strip()] == [
        "authority",
        "queue",
        "main",
        "1m",
        "dlq",
        "oldest due (UTC)",
        "late",
    ]
    assert "2023-11-14T22:13:20Z" in text
    assert "10.0s" in text


async def test_queues_prints_a_due_time_out_of_range_as_its_number(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Another tool wrote head records whose due time no calendar holds."""
    config = ops_config(kafka_bootstrap, kafka={"partitions": 1})
    location = write_config(config, tmp_path / "config.yaml")
    authority = "127.0.0.1:1"
    dues_ms = {"past": -(10**18), "future": 10**18}
    await write_heads(config, authority, dues_ms)

    found = await queues_json(location)
    shown = await run_queues(location)

    for queue, due_ms in dues_ms.items():
        assert found[queue]["depth"] == 1
        assert found[queue]["oldest_due"] == f"out of range ({due_ms} ms)"
        assert found[queue]["late_s"] == 0
        row = next(line for line in shown.splitlines() if f" {queue} " in line)
        assert f"out of range ({due_ms} ms)" in row


async def write_heads(config: Config, authority: str, dues_ms: dict[str, int]) -> None:
    """One task record per queue, due at ``dues_ms[queue]``."""
    topics = Topics(config.topics.prefix)
    writer = KafkaWriter(config)
    await writer.start()
    try:
        for queue, due_ms in dues_ms.items():
            task_id = uuid.uuid4().hex
            await writer.write(
                topics.main(authority, queue),
                key=task_id.encode(),
                value=encode_task(task(authority, queue=queue, id=task_id)),
                headers=to_headers(State(id=task_id, due_ms=due_ms, added_ms=0)),
                timestamp_ms=int(time.time() * 1000),
            )
    finally:
        await writer.stop()
