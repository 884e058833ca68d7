"""The worker checks again right before every call, whatever Kafka holds.

Records are written straight to Kafka, as a compromised producer or an old
version could, so ``add`` never saw them. The worker must dead-letter each one
without any connection: every connection attempt in the process is recorded
(and one to a non-loopback address refused before a socket exists), and the
only target, on 127.0.0.2, must see none but the one call allowed.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from taskqueue.protobuf.service_pb2 import Task
from taskqueue.server.config import Config
from taskqueue.server.kafka import KafkaWriter
from taskqueue.server.record import State, encode_task, to_headers
from taskqueue.server.topics import Topics
from tests.conftest import make_config
from tests.security_support import NetworkGuard, TlsTarget
from tests.support import read_topic, worker

METHOD = TlsTarget.methods[0]


@pytest.fixture
async def target() -> AsyncIterator[TlsTarget]:
    # 127.0.0.2: whatever reaches it came through a name we resolved to it.
    running = TlsTarget(host="127.0.0.2")
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


def refused_authorities(port: int) -> list[str]:
    return [
        f"169.254.169.254:{port}",
        f"2852039166:{port}",
        f"0xA9FEA9FE:{port}",
        f"169.254.43518:{port}",
        f"[::ffff:169.254.169.254]:{port}",
        f"[fe80::1]:{port}",
        f"metadata.google.internal:{port}",
        f"METADATA.google.internal.:{port}",
        f"two-faced.test:{port}",  # one loopback and one metadata address
        f"mapped.test:{port}",  # ::ffff:169.254.169.254
        f"127.0.0.2:{port}",  # an address no pattern allows
    ]


async def write_tasks(config: Config, authorities: list[str], method: str) -> None:
    writer = KafkaWriter(config)
    topics = Topics(config.topics.prefix)
    now_ms = int(time.time() * 1000)
    await writer.start()
    try:
        for authority in authorities:
            task = Task(authority=authority, method=method, queue="default")
            task.argument.type_url = "type.googleapis.com/coffeemachine.LatteOrder"
            task.id = uuid.uuid4().hex
            state = State(id=task.id, due_ms=now_ms, added_ms=now_ms)
            # Each in its own queue's topic, where a worker accepts it as a
            # task (a record in another queue's topic is dead-lettered unread).
            await writer.write(
                topics.main(authority, "default"),
                key=task.id.encode(),
                value=encode_task(task),
                headers=to_headers(state),
                timestamp_ms=now_ms,
            )
    finally:
        await writer.stop()


async def test_worker_calls_nothing_it_may_not(
    kafka_bootstrap: str, target: TlsTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = NetworkGuard(
        dns={
            "good.test": ["127.0.0.2"],
            "two-faced.test": ["127.0.0.2", "169.254.169.254"],
            "mapped.test": ["::ffff:169.254.169.254"],
        }
    )
    guard.install(asyncio.get_running_loop(), monkeypatch)
    config = make_config(kafka_bootstrap, allow=["*.test:*", "*.internal:*"])
    topics = Topics(config.topics.prefix)
    refused = refused_authorities(target.port)
    allowed = f"good.test:{target.port}"

    await write_tasks(config, [*refused, allowed], METHOD)
    async with worker(config):
        await target.wait_calls(1)
        dead = {
            authority: await read_topic(
                kafka_bootstrap, topics.dlq(authority, "default"), 1
            )
            for authority in refused
        }

    assert len(target.calls) == 1  # good.test only
    broker_host = kafka_bootstrap.rpartition(":")[0]
    calls_out = [host for host in guard.connects if host != broker_host]
    assert calls_out == ["127.0.0.2"], guard.connects
    assert not any(h.startswith("169.254") or "ffff" in h for h in guard.connects)
    # Literal addresses and metadata names were refused without any lookup.
    assert sorted(h for h in guard.lookups if h.endswith(".test")) == [
        "good.test",
        "mapped.test",
        "two-faced.test",
    ]
    for authority, records in dead.items():
        headers = {k: v.decode() for k, v in records[0].headers}
        # Refused by the allowlist before the call, or by the dispatcher when
        # the name resolved to a forbidden address.
        why = headers["tq-reason"] + headers.get("tq-last-message", "")
        assert "not allowed" in why or "169.254.169.254" in why, (authority, why)
