"""Outgoing calls over TLS and mutual TLS, to targets on loopback.

Certificates are made by the tests. A target's certificate names only
``localhost``, so a call that succeeds while the dispatcher connects to the
checked address (127.0.0.1 or ::1) shows that the certificate was verified
against the authority's name, not against the address.
"""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpclib.const import Status

from taskqueue.server.config import from_dict
from taskqueue.server.dispatcher import Call, Dispatcher
from taskqueue.server.errors import ConfigError
from taskqueue.server.tls import OutgoingTls
from tests.security_support import Pki, TlsTarget, make_pki, server_context

METHOD = TlsTarget.methods[0]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


@pytest.fixture
async def tls_target(pki: Pki) -> AsyncIterator[TlsTarget]:
    target = TlsTarget(context=server_context(pki.server_by_name))
    await target.start()
    try:
        yield target
    finally:
        await target.stop()


@pytest.fixture
async def mtls_target(pki: Pki) -> AsyncIterator[TlsTarget]:
    target = TlsTarget(context=server_context(pki.server_by_name, client_ca=pki.ca))
    await target.start()
    try:
        yield target
    finally:
        await target.stop()


def dispatcher_for(*rules: dict[str, object]) -> Dispatcher:
    config = from_dict(
        {"allow": ["localhost:*", "127.0.0.1:*"], "security": {"outgoing_tls": rules}}
    )
    return Dispatcher(tls=OutgoingTls(config.security.outgoing_tls))


async def call(dispatcher: Dispatcher, authority: str) -> Status | None:
    try:
        failure = await dispatcher.call(Call(authority, METHOD, b"\x08\x01", {}, 5.0))
    finally:
        await dispatcher.close()
    return None if failure is None else failure.status


async def test_tls_call_verifies_the_target_by_its_name(
    pki: Pki, tls_target: TlsTarget
) -> None:
    dispatcher = dispatcher_for({"authority": "localhost:*", "ca": str(pki.ca.path)})

    assert await call(dispatcher, f"localhost:{tls_target.port}") is None
    assert len(tls_target.calls) == 1


async def test_server_name_overrides_the_name_checked(
    pki: Pki, tls_target: TlsTarget
) -> None:
    checked_as_localhost = dispatcher_for(
        {"authority": "127.0.0.1:*", "ca": str(pki.ca.path), "server_name": "localhost"}
    )
    checked_as_address = dispatcher_for(
        {"authority": "127.0.0.1:*", "ca": str(pki.ca.path)}
    )

    assert await call(checked_as_localhost, tls_target.authority) is None
    # The certificate has no IP address in it.
    assert await call(checked_as_address, tls_target.authority) is Status.UNAVAILABLE
    assert len(tls_target.calls) == 1


async def test_a_target_signed_by_another_ca_is_refused(
    pki: Pki, tls_target: TlsTarget
) -> None:
    dispatcher = dispatcher_for(
        {"authority": "localhost:*", "ca": str(pki.other_ca.path)}
    )

    assert await call(dispatcher, f"localhost:{tls_target.port}") is Status.UNAVAILABLE
    assert tls_target.calls == []


async def test_without_a_rule_the_call_is_plaintext_and_fails_on_a_tls_target(
    pki: Pki, tls_target: TlsTarget
) -> None:
    dispatcher = dispatcher_for({"authority": "other:*", "ca": str(pki.ca.path)})

    assert await call(dispatcher, f"localhost:{tls_target.port}") is not None
    assert tls_target.calls == []


async def test_mutual_tls_with_a_client_certificate(
    pki: Pki, mtls_target: TlsTarget
) -> None:
    authority = f"localhost:{mtls_target.port}"
    with_cert = dispatcher_for(
        {
            "authority": "localhost:*",
            "ca": str(pki.ca.path),
            "cert": str(pki.client.cert),
            "key": str(pki.client.key),
        }
    )
    without_cert = dispatcher_for({"authority": "localhost:*", "ca": str(pki.ca.path)})
    stranger = dispatcher_for(
        {
            "authority": "localhost:*",
            "ca": str(pki.ca.path),
            "cert": str(pki.stranger.cert),
            "key": str(pki.stranger.key),
        }
    )

    assert await call(with_cert, authority) is None
    assert await call(without_cert, authority) is Status.UNAVAILABLE
    assert await call(stranger, authority) is Status.UNAVAILABLE
    assert len(mtls_target.calls) == 1


def test_first_matching_rule_wins(pki: Pki) -> None:
    config = from_dict(
        {
            "security": {
                "outgoing_tls": [
                    {"authority": "*.internal:*", "ca": str(pki.ca.path)},
                    {"authority": "*:*", "server_name": "fallback"},
                ]
            }
        }
    )
    rules = OutgoingTls(config.security.outgoing_tls)

    first = rules.for_authority("cafe.internal:50051")
    second = rules.for_authority("cafe.example:50051")
    assert first is not None and first.server_name is None
    assert second is not None and second.server_name == "fallback"


@pytest.mark.parametrize(
    ("rule", "named"),
    [
        ({"authority": "h:*", "ca": "/nonexistent/ca.pem"}, "outgoing_tls[0].ca"),
        ({"authority": "h:*", "cert": "x.pem"}, "outgoing_tls[0]"),
        ({"authority": "no-port"}, "outgoing_tls[0].authority"),
    ],
)
def test_bad_outgoing_rules_stop_start_up(rule: dict[str, str], named: str) -> None:
    with pytest.raises(
        ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")
    ):
        from_dict({"security": {"outgoing_tls": [rule]}})


def test_a_file_that_is_no_certificate_is_named_without_its_content(
    tmp_path: Path,
) -> None:
    secret = "-----BEGIN PRIVATE KEY-----\nTOP-SECRET-BYTES\n"
    bogus = tmp_path / "ca.pem"
    bogus.write_text(secret)
    config = from_dict(
        {"security": {"outgoing_tls": [{"authority": "h:*", "ca": str(bogus)}]}}
    )

    with pytest.raises(ConfigError) as raised:
        OutgoingTls(config.security.outgoing_tls)

    assert str(bogus) in str(raised.value)
    assert "TOP-SECRET" not in str(raised.value)
