"""Logs: one line per task lifecycle event; JSON lines on request; no payloads."""

import asyncio
import json
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from taskqueue.server.config import Config
from taskqueue.server.logs import EVENT_ATTRIBUTE, JsonFormatter, TaskEvent, task_event
from tests.ops_support import add, ops_config, rpc_with_metrics, task
from tests.support import Received, target, worker

SECRET = b"secret-latte-order"
FIELDS = {"task_id", "outcome", "authority", "method", "attempt", "queue", "tier"}
START_TIMEOUT_S = 30.0


def test_a_task_event_is_one_line_with_its_fields() -> None:
    record = capture(
        TaskEvent("t1", "cafe:50051", "/c.C/m", 2, "orders", "retry-5s"),
        status="UNAVAILABLE",
    )

    assert record.getMessage() == (
        "task t1 retrying authority=cafe:50051 method=/c.C/m attempt=2 "
        "queue=orders tier=retry-5s status=UNAVAILABLE"
    )
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == record.getMessage()
    assert {k: line[k] for k in (*FIELDS, "status")} == {
        "task_id": "t1",
        "outcome": "retrying",
        "authority": "cafe:50051",
        "method": "/c.C/m",
        "attempt": 2,
        "queue": "orders",
        "tier": "retry-5s",
        "status": "UNAVAILABLE",
    }


class Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def capture(event: TaskEvent, **more: str) -> logging.LogRecord:
    logger = logging.getLogger("tests.capture")
    logger.setLevel(logging.INFO)
    handler = Keep()
    logger.addHandler(handler)
    try:
        task_event(logger, logging.INFO, "retrying", event, **more)
    finally:
        logger.removeHandler(handler)
    [record] = handler.records
    return record


async def fail_once_or_dead(received: Received) -> None:
    if received.body.endswith(b"dead"):
        raise GRPCError(Status.NOT_FOUND, "no such order")
    if received.metadata["taskqueue-attempt"] == "1":
        raise GRPCError(Status.UNAVAILABLE, "busy")


async def test_each_lifecycle_event_is_logged_once_without_payload(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = ops_config(kafka_bootstrap, queue_defaults={"retry": {"backoff_s": [0.2]}})
    caplog.set_level(logging.INFO, logger="taskqueue")

    async with (
        target(fail_once_or_dead) as cafe,
        rpc_with_metrics(config) as (port, _),
        worker(config),
    ):
        ok = (await add(port, task(cafe.authority, SECRET))).id
        dead = (await add(port, task(cafe.authority, SECRET + b"dead"))).id
        await cafe.wait_calls(3)
        await asyncio.sleep(0.5)  # the worker logs after the call returns

    events: list[dict[str, Any]] = [
        getattr(r, EVENT_ATTRIBUTE)
        for r in caplog.records
        if hasattr(r, EVENT_ATTRIBUTE)
    ]
    outcomes = {
        task_id: [
            (e["outcome"], e["attempt"], e["tier"])
            for e in events
            if e["task_id"] == task_id
        ]
        for task_id in (ok, dead)
    }
    assert outcomes[ok] == [
        ("enqueued", 0, "main"),
        ("retrying", 1, "main"),
        ("succeeded", 2, "main"),
    ]
    assert outcomes[dead] == [("enqueued", 0, "main"), ("dead-lettered", 1, "main")]
    assert all(set(e) >= FIELDS for e in events)
    assert all(e["authority"] == cafe.authority for e in events)
    assert not any(SECRET.decode() in r.getMessage() for r in caplog.records)


def write_config(config: Config, path: Path, rpc_port: int) -> str:
    config = msgspec.structs.replace(
        config, rpc=msgspec.structs.replace(config.rpc, port=rpc_port)
    )
    path.write_bytes(msgspec.yaml.encode({"test": msgspec.to_builtins(config)}))
    return f"{path}@test"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serving(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def rpc_lines(config: Config, path: Path, *flags: str) -> list[str]:
    """Run ``taskqueue rpc`` until it serves, then stop it; its stderr lines."""
    port = free_port()
    location = write_config(config, path, port)
    command = [sys.executable, "-m", "taskqueue.server", "rpc", "-c", location]
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen([*command, *flags], stderr=stderr)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not serving(port) and process.poll() is None:
                assert time.monotonic() < deadline, "rpc did not start"
                time.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=START_TIMEOUT_S) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        stderr.seek(0)
        return stderr.read().splitlines()


@pytest.mark.parametrize(
    ("logs", "flags"),
    [({"format": "text"}, ("--log-format", "json")), ({"format": "json"}, ())],
    ids=["flag", "config"],
)
def test_json_lines_by_flag_or_config(
    kafka_bootstrap: str, tmp_path: Path, logs: dict[str, str], flags: tuple[str, ...]
) -> None:
    config = ops_config(kafka_bootstrap, logs=logs)
    lines = rpc_lines(config, tmp_path / "config.yaml", *flags)

    decoded = [json.loads(line) for line in lines]
    assert any("rpc serving on" in d["message"] for d in decoded)
    assert all({"time", "level", "logger", "message"} <= set(d) for d in decoded)


def test_level_from_the_config(kafka_bootstrap: str, tmp_path: Path) -> None:
    config = ops_config(kafka_bootstrap, logs={"level": "WARNING"})
    lines = rpc_lines(config, tmp_path / "loud.yaml", "--log-level", "INFO")
    quiet = rpc_lines(config, tmp_path / "quiet.yaml")

    assert any("rpc serving on" in line for line in lines)
    assert not any("rpc serving on" in line for line in quiet)
