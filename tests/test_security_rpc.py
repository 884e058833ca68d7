"""Who may call ``add``, and what it lets them ask for: against the real rpc server.

TLS and mutual TLS with certificates made by the tests, bearer tokens and the
authorities each caller may use, the allowlist seen from ``add``, Kafka's
refusal of colliding topic names, and that no secret reaches a log line or an
error message.
"""

import hashlib
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import cafe_pb2  # examples/cafe, on the path through conftest
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.events import SendRequest, listen
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest
from grpclib.reflection.v1.reflection_grpc import ServerReflectionStub
from grpclib.reflection.v1.reflection_pb2 import ServerReflectionRequest

from taskqueue.protobuf.admin_grpc import AdminStub
from taskqueue.protobuf.admin_pb2 import ListPausesRequest
from taskqueue.protobuf.service_grpc import TaskQueueStub
from taskqueue.protobuf.service_pb2 import Task
from taskqueue.server import logs
from taskqueue.server.config import Config
from tests.conftest import make_config
from tests.security_support import Pki, client_context, make_pki
from tests.support import rpc_server
from tests.test_add_errors import CoffeeMachineQueue, good_task
from tests.test_security_allowlist import LITERALS, NAMES

TOKEN_A = "tq-token-AAAA-0123456789abcdef"
TOKEN_B = "tq-token-BBBB-fedcba9876543210"
# What a refused connection can look like to grpclib's client.
CONNECTION_FAILED = (OSError, StreamTerminatedError, ProtocolError, ssl.SSLError)


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def tls_section(pki: Pki, mutual: bool = False) -> dict[str, str]:
    section = {"cert": str(pki.server.cert), "key": str(pki.server.key)}
    if mutual:
        section["client_ca"] = str(pki.ca.path)
    return section


async def add(
    port: int,
    task: Task,
    *,
    context: ssl.SSLContext | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    async with Channel("127.0.0.1", port, ssl=context) as channel:
        reply = await TaskQueueStub(channel).add(task, timeout=15, metadata=metadata)
    return reply.id


async def refusal(port: int, task: Task, **kwargs: object) -> GRPCError:
    with pytest.raises(GRPCError) as raised:
        await add(port, task, **kwargs)  # type: ignore[arg-type]
    return raised.value


# -- TLS and mutual TLS on the rpc server ------------------------------------


async def test_add_over_tls(kafka_bootstrap: str, pki: Pki) -> None:
    config = make_config(kafka_bootstrap, security={"tls": tls_section(pki)})

    async with rpc_server(config) as port:
        task_id = await add(port, good_task(), context=client_context(pki.ca))
        with pytest.raises(CONNECTION_FAILED):
            await add(port, good_task())  # plaintext to a TLS port
        with pytest.raises(CONNECTION_FAILED):
            await add(port, good_task(), context=client_context(pki.other_ca))

    assert task_id


async def test_mutual_tls_wants_a_certificate_of_the_client_ca(
    kafka_bootstrap: str, pki: Pki
) -> None:
    config = make_config(
        kafka_bootstrap, security={"tls": tls_section(pki, mutual=True)}
    )

    async with rpc_server(config) as port:
        task_id = await add(
            port, good_task(), context=client_context(pki.ca, pki.client)
        )
        with pytest.raises(CONNECTION_FAILED):
            await add(port, good_task(), context=client_context(pki.ca))
        with pytest.raises(CONNECTION_FAILED):
            await add(port, good_task(), context=client_context(pki.ca, pki.stranger))
        # The server's own certificate was not issued for client authentication.
        with pytest.raises(CONNECTION_FAILED):
            await add(port, good_task(), context=client_context(pki.ca, pki.server))

    assert task_id


# -- bearer tokens and each caller's authorities ------------------------------


@pytest.fixture
async def with_tokens(kafka_bootstrap: str, tmp_path: Path) -> AsyncIterator[int]:
    token_file = tmp_path / "token-b"
    token_file.write_text(TOKEN_B + "\n")
    config = make_config(
        kafka_bootstrap,
        security={
            "callers": [
                {
                    "name": "billing",
                    "token_sha256": hashlib.sha256(TOKEN_A.encode()).hexdigest(),
                },
                {
                    "name": "cafe",
                    "token_file": str(token_file),
                    "authorities": ["127.0.0.1:50999"],
                },
            ]
        },
    )
    async with rpc_server(config) as port:
        yield port


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        {"authorization": " "},
        {"authorization": "Bearer"},
        {"authorization": f"Basic {TOKEN_A}"},
        {"authorization": f"Bearer {TOKEN_A}x"},
        {"authorization": TOKEN_A},
        {"x-api-key": TOKEN_A},
    ],
    ids=["none", "blank", "no-token", "basic", "wrong", "no-scheme", "other-key"],
)
async def test_without_a_known_token_add_is_unauthenticated(
    with_tokens: int, metadata: dict[str, str] | None
) -> None:
    error = await refusal(with_tokens, good_task(), metadata=metadata)

    assert error.status is Status.UNAUTHENTICATED, error
    assert "token" in (error.message or "")


async def test_known_tokens_are_let_in(with_tokens: int) -> None:
    assert await add(with_tokens, good_task(), metadata=bearer(TOKEN_A))
    assert await add(
        with_tokens, good_task(), metadata={"authorization": f"bearer  {TOKEN_B}"}
    )


async def test_the_client_library_sends_a_token_through_grpclib_events(
    with_tokens: int,
) -> None:
    async def add_token(event: SendRequest) -> None:
        event.metadata["authorization"] = f"Bearer {TOKEN_A}"

    async with Channel("127.0.0.1", with_tokens) as channel:
        listen(channel, SendRequest, add_token)
        queue = CoffeeMachineQueue("127.0.0.1:50999", channel)
        task_id = await queue.make_latte.add(cafe_pb2.LatteOrder(), timeout=15)

    assert task_id


async def test_a_caller_is_held_to_its_authorities(with_tokens: int) -> None:
    task = good_task()
    task.authority = "127.0.0.1:50998"  # allowed by `allow`, not for "cafe"

    error = await refusal(with_tokens, task, metadata=bearer(TOKEN_B))
    accepted = await add(with_tokens, task, metadata=bearer(TOKEN_A))

    assert error.status is Status.PERMISSION_DENIED
    assert "127.0.0.1:50998" in (error.message or "")
    assert "cafe" in (error.message or "")
    assert accepted


async def test_every_method_but_health_needs_a_known_caller(
    kafka_bootstrap: str,
) -> None:
    config = make_config(
        kafka_bootstrap,
        admin={"enabled": True},
        security={
            "callers": [
                {"name": "ops", "token_sha256": sha256(TOKEN_A), "admin": True},
                {"name": "app", "token_sha256": sha256(TOKEN_B)},
            ]
        },
    )

    async with rpc_server(config) as port, Channel("127.0.0.1", port) as channel:
        health = await HealthStub(channel).Check(HealthCheckRequest(), timeout=10)
        admin = AdminStub(channel)
        with pytest.raises(GRPCError) as anonymous:
            await admin.list_pauses(ListPausesRequest(), timeout=10)
        with pytest.raises(GRPCError) as not_admin:
            await admin.list_pauses(
                ListPausesRequest(), timeout=10, metadata=bearer(TOKEN_B)
            )
        pauses = await admin.list_pauses(
            ListPausesRequest(), timeout=10, metadata=bearer(TOKEN_A)
        )
        with pytest.raises(GRPCError) as reflection:
            async with ServerReflectionStub(
                channel
            ).ServerReflectionInfo.open() as stream:
                await stream.send_message(
                    ServerReflectionRequest(list_services=""), end=True
                )
                await stream.recv_message()

    assert health.status is not None
    assert anonymous.value.status is Status.UNAUTHENTICATED
    assert not_admin.value.status is Status.PERMISSION_DENIED
    assert "app" in (not_admin.value.message or "")
    assert list(pauses.pauses) == []
    assert reflection.value.status is Status.UNAUTHENTICATED


# -- the allowlist as add sees it ----------------------------------------------


@pytest.fixture
async def allow_all(kafka_bootstrap: str) -> AsyncIterator[int]:
    # Even a catch-all pattern lets none of the bypasses through.
    config = make_config(kafka_bootstrap, allow=["*:*"])
    async with rpc_server(config) as port:
        yield port


# Refused for their syntax already (INVALID_ARGUMENT); the rest by the allowlist.
SYNTAX = {"ｍetadata.google.internal:80", "[fe80::1%eth0]:80"}


@pytest.mark.parametrize("authority", LITERALS + NAMES)
async def test_add_refuses_bypass_attempts_naming_the_authority(
    allow_all: int, authority: str
) -> None:
    task = good_task()
    task.authority = authority

    error = await refusal(allow_all, task)

    expected = (
        Status.INVALID_ARGUMENT if authority in SYNTAX else Status.PERMISSION_DENIED
    )
    assert error.status is expected, error
    assert authority in (error.message or ""), error.message


async def test_add_enforces_the_method_allowlist(kafka_bootstrap: str) -> None:
    config = make_config(
        kafka_bootstrap,
        allow=[
            {"authority": "127.0.0.1:*", "methods": ["/coffeemachine.CoffeeMachine/*"]}
        ],
    )
    task = good_task()
    task.method = "/admin.Admin/shutdown"

    async with rpc_server(config) as port:
        error = await refusal(port, task)
        accepted = await add(port, good_task())

    assert error.status is Status.PERMISSION_DENIED
    assert "/admin.Admin/shutdown" in (error.message or "")
    assert accepted


# -- topic names Kafka would refuse ---------------------------------------------


async def test_a_name_colliding_with_an_existing_topic_is_an_invalid_argument(
    kafka_bootstrap: str, config: Config
) -> None:
    """A queue made before ``_`` was refused collides with a new one's name."""
    prefix = config.topics.prefix
    legacy = f"{prefix}.h.80.1_q"  # authority h:80, queue 1_q
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(legacy, 1, 1)])
    finally:
        await admin.close()
    colliding = make_config(
        kafka_bootstrap, topics={"prefix": prefix}, allow=["h.80:*"]
    )
    task = good_task()
    task.authority, task.queue = "h.80:1", "q"  # topic PREFIX.h.80.1.q

    async with rpc_server(colliding) as port:
        error = await refusal(port, task)

    assert error.status is Status.INVALID_ARGUMENT, error
    assert "collides" in (error.message or ""), error.message
    assert legacy in (error.message or ""), error.message


# -- secrets stay out of logs and messages -------------------------------------


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Everything at DEBUG, as ``--log-level DEBUG`` would set the loggers."""
    before = {name: logging.getLogger(name).level for name in logs.QUIET_LOGGERS}
    logs.quiet_libraries(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    try:
        yield caplog
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


async def test_no_token_payload_or_metadata_value_in_logs_or_messages(
    with_tokens: int, debug_logs: pytest.LogCaptureFixture
) -> None:
    payload_secret = b"PAYLOAD-SECRET-7f3a"
    metadata_secret = "META-SECRET-91bc"
    wrong_token = "WRONG-TOKEN-SECRET-55aa"
    caplog = debug_logs

    def secret_task() -> Task:
        task = good_task()
        task.argument.value = b"\x0a\x13" + payload_secret
        task.metadata["tenant-key"] = metadata_secret
        return task

    spoiled = [secret_task() for _ in range(4)]
    spoiled[0].method = "bad method"
    spoiled[1].metadata["tenant key"] = metadata_secret
    spoiled[2].metadata["tenant-key"] = f" {metadata_secret}\n"
    spoiled[3].authority = "10.0.0.1:80"
    messages = [
        (
            await refusal(with_tokens, secret_task(), metadata=bearer(wrong_token))
        ).message,
        (await refusal(with_tokens, secret_task())).message,
    ]
    for task in spoiled:
        error = await refusal(with_tokens, task, metadata=bearer(TOKEN_A))
        messages.append(error.message)
    await add(with_tokens, secret_task(), metadata=bearer(TOKEN_A))

    shown = caplog.text + "\n".join(m or "" for m in messages)
    assert "add refused" in caplog.text  # the refusals were logged
    assert "enqueued" in caplog.text
    for secret in (
        TOKEN_A,
        TOKEN_B,
        wrong_token,
        hashlib.sha256(TOKEN_A.encode()).hexdigest(),
        payload_secret.decode(),
        metadata_secret,
    ):
        assert secret not in shown, secret
