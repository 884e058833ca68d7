"""Who may be called: the allowlist, and the dispatcher's check at connection time.

No test here sends anything off loopback: refusals are shown to happen before
any lookup or connection (NetworkGuard records every attempt, and refuses one
to a non-loopback address before a socket exists).
"""

import asyncio
import ipaddress
import socket
import sys
from collections.abc import AsyncIterator

import grpclib.server
import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskqueue.server.allowlist import (
    METADATA_ADDRESSES,
    Allowlist,
    is_forbidden,
    parse_ipv4_loose,
)
from taskqueue.server.config import from_dict
from taskqueue.server.dispatcher import Call, Dispatcher
from taskqueue.server.errors import AuthorityNotAllowed, ConfigError
from tests.security_support import CountingListener, NetworkGuard
from tests.support import Target

METHOD = Target.methods[0]
EVERYTHING = Allowlist(["*:*"])

# Each spells a link-local, unspecified or metadata address, or is refused
# before any lookup for what it is.
LITERALS = [
    "169.254.169.254:80",
    "169.254.169.254.:80",
    "2852039166:80",
    "0xA9FEA9FE:80",
    "0xa9.0xfe.0xa9.0xfe:80",
    "0251.0376.0251.0376:80",
    "169.254.43518:80",
    "169.16689662:80",
    "[::ffff:169.254.169.254]:80",
    "[::FFFF:A9FE:A9FE]:80",
    "[0:0:0:0:0:ffff:a9fe:a9fe]:80",
    "[0000:0000:0000:0000:0000:ffff:169.254.169.254]:80",
    "[::ffff:0:a9fe:a9fe]:80",
    "[64:ff9b::a9fe:a9fe]:80",
    "[2002:a9fe:a9fe::1]:80",
    "[::a9fe:a9fe]:80",
    "[fe80::1]:80",
    "[FE80:0:0:0:0:0:0:1]:80",
    "[fd00:ec2::254]:80",
    "[fd00:ec2:0:0:0:0:0:254]:80",
    "[fd20:ce::254]:80",
    "100.100.100.200:80",
    "192.0.0.192:80",
    "168.63.129.16:80",
    "169.254.170.2:80",
    "0.0.0.0:80",
    "0:80",
    "[::]:80",
    "ｍetadata.google.internal:80",  # fullwidth m: IDNA would fold it
    "[fe80::1%eth0]:80",
]
# The metadata servers' names.
NAMES = [
    "metadata.google.internal:80",
    "METADATA.Google.Internal.:80",
    "metadata:80",
    "metadata.goog:80",
    "instance-data.ec2.internal:80",
]
BYPASSES = LITERALS + NAMES


@pytest.mark.parametrize("authority", BYPASSES)
def test_bypass_attempts_are_refused_even_by_a_catch_all_pattern(
    authority: str,
) -> None:
    with pytest.raises(AuthorityNotAllowed) as raised:
        EVERYTHING.check(authority)

    assert repr(authority) in str(raised.value)
    assert not EVERYTHING.allows(authority)


@pytest.mark.parametrize(
    ("pattern", "authority"),
    [
        ("169.254.169.254:80", "169.254.169.254:80"),
        ("169.254.169.254:*", "169.254.169.254:8080"),
        ("[fd00:ec2::254]:80", "[fd00:ec2:0::254]:80"),
        ("[fe80::1]:*", "[fe80::0001]:50051"),
        ("metadata.google.internal:80", "METADATA.google.internal.:80"),
    ],
)
def test_a_pattern_naming_the_exact_address_allows_it(
    pattern: str, authority: str
) -> None:
    assert Allowlist([pattern]).allows(authority)


@pytest.mark.parametrize(
    ("pattern", "authority"),
    [
        ("169.254.*:*", "169.254.169.254:80"),
        ("169.254.169.25?:80", "169.254.169.254:80"),
        ("169.254.169.254:81", "169.254.169.254:80"),
        ("*.internal:80", "metadata.google.internal:80"),
        ("[fe80::*]:*", "[fe80::1]:80"),
    ],
)
def test_wildcards_never_reach_a_forbidden_address(
    pattern: str, authority: str
) -> None:
    assert not Allowlist([pattern]).allows(authority)


def test_non_standard_ipv4_spellings_are_refused_even_when_harmless() -> None:
    allowlist = Allowlist(["127.0.0.1:*", "*:50051"])

    assert allowlist.allows("127.0.0.1:80")
    for spelling in ("2130706433:80", "0x7f000001:80", "127.1:80", "0177.0.0.1:80"):
        with pytest.raises(AuthorityNotAllowed, match=r"write it as 127\.0\.0\.1"):
            allowlist.check(spelling)
    assert not allowlist.allows("2130706433:50051")


def test_ipv6_brackets_in_patterns_are_literal() -> None:
    # fnmatch would read "[::1]" as a character class matching ":" or "1".
    allowlist = Allowlist(["[::1]:*"])

    assert allowlist.allows("[::1]:50051")
    assert allowlist.allows("[0:0:0:0:0:0:0:1]:50051")
    assert not allowlist.allows("1:50051")
    assert not allowlist.allows(":1:50051")


def test_case_and_trailing_dot_do_not_matter() -> None:
    allowlist = Allowlist(["Cafe.SRV.prod.:50051"])

    assert allowlist.allows("cafe.srv.prod:50051")
    assert allowlist.allows("CAFE.srv.PROD.:50051")
    assert not allowlist.allows("cafe.srv.prod:50052")


def test_methods_can_be_limited_per_authority() -> None:
    config = from_dict(
        {
            "allow": [
                {
                    "authority": "127.0.0.1:*",
                    "methods": ["/coffeemachine.CoffeeMachine/*"],
                },
                "localhost:*",
            ]
        }
    )
    allowlist = Allowlist(config.allow)

    assert allowlist.allows("127.0.0.1:1", "/coffeemachine.CoffeeMachine/make_latte")
    assert not allowlist.allows("127.0.0.1:1", "/admin.Admin/shutdown")
    assert allowlist.allows("localhost:1", "/admin.Admin/shutdown")
    with pytest.raises(AuthorityNotAllowed, match=r"method '/admin\.Admin/shutdown'"):
        allowlist.check("127.0.0.1:1", "/admin.Admin/shutdown")


@pytest.mark.parametrize(
    "allow",
    [
        ["no-port"],
        [":80"],
        ["2852039166:*"],
        [{"authority": "h:1", "methods": ["no-slash"]}],
        [{"authority": "h:1", "methods": []}],
        [{"authority": "h:1", "method": ["/a.B/c"]}],
    ],
)
def test_bad_allow_entries_stop_start_up(allow: list[object]) -> None:
    with pytest.raises(ConfigError, match="allow"):
        from_dict({"allow": allow})


# -- numeric IPv4 forms: the same reading as the C library's ------------------

ipv4_ish = st.text(alphabet="0123456789abcdefxX.", min_size=1, max_size=24)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc inet_aton")
@given(ipv4_ish)
def test_loose_ipv4_reading_agrees_with_inet_aton(text: str) -> None:
    try:
        expected = ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        expected = None

    assert parse_ipv4_loose(text) == expected


def _spellings(address: ipaddress.IPv4Address) -> list[str]:
    number = int(address)
    a, b, c, d = address.packed
    return [
        str(address),
        f"{address}.",
        str(number),
        hex(number),
        hex(number).upper().replace("0X", "0x"),
        oct(number).replace("0o", "0"),
        ".".join(f"0{x:o}" for x in address.packed),
        ".".join(hex(x) for x in address.packed),
        f"{a}.{b}.{(c << 8) | d}",
        f"{a}.{(b << 16) | (c << 8) | d}",
        f"[::ffff:{address}]",
        f"[::ffff:{a:02x}{b:02x}:{c:02x}{d:02x}]",
        f"[0:0:0:0:0:ffff:{address}]",
        f"[64:ff9b::{address}]",
    ]


forbidden_ipv4 = st.one_of(
    st.sampled_from(sorted(a for a in METADATA_ADDRESSES if a.version == 4)),
    st.integers(0xA9FE0000, 0xA9FEFFFF).map(ipaddress.IPv4Address),
)


@given(forbidden_ipv4, st.integers(1, 65535))
def test_every_spelling_of_a_forbidden_address_is_refused(
    address: ipaddress.IPv4Address, port: int
) -> None:
    assert is_forbidden(address)
    for host in _spellings(address):
        assert not EVERYTHING.allows(f"{host}:{port}"), host


# -- the dispatcher: refused before any lookup or connection ------------------


@pytest.fixture
async def guard(monkeypatch: pytest.MonkeyPatch) -> NetworkGuard:
    installed = NetworkGuard()
    installed.install(asyncio.get_running_loop(), monkeypatch)
    return installed


@pytest.fixture
async def listener() -> AsyncIterator[CountingListener]:
    # 127.0.0.2: a loopback address no test connects to on purpose.
    counting = CountingListener("127.0.0.2")
    await counting.start()
    try:
        yield counting
    finally:
        await counting.stop()


def call_to(authority: str, method: str = METHOD) -> Call:
    return Call(authority, method, b"\x08\x01", {}, deadline_s=5.0)


async def test_dispatcher_refuses_forbidden_literals_without_lookup_or_connection(
    guard: NetworkGuard,
) -> None:
    # No allowlist at all: the address check stands on its own.
    dispatcher = Dispatcher()
    try:
        failures = [await dispatcher.call(call_to(a)) for a in BYPASSES]
    finally:
        await dispatcher.close()

    assert all(f is not None and f.status.name == "PERMISSION_DENIED" for f in failures)
    assert guard.lookups == []
    assert guard.connects == []


async def test_dispatcher_refuses_a_name_with_any_forbidden_address(
    guard: NetworkGuard, listener: CountingListener
) -> None:
    port = listener.port
    guard.dns["two-faced.test"] = ["127.0.0.2", "169.254.169.254"]
    guard.dns["mapped.test"] = ["::ffff:169.254.169.254"]
    guard.dns["link-local.test"] = ["fe80::1"]
    dispatcher = Dispatcher(allowlist=Allowlist(["*.test:*"]))
    try:
        failures = {
            name: await dispatcher.call(call_to(f"{name}:{port}")) for name in guard.dns
        }
    finally:
        await dispatcher.close()

    for name, failure in failures.items():
        assert failure is not None, name
        assert failure.status.name == "PERMISSION_DENIED", failure
        assert name in failure.message
    assert sorted(guard.lookups) == sorted(guard.dns)
    assert guard.connects == []
    await asyncio.sleep(0.1)
    assert listener.accepted == 0


async def test_dispatcher_connects_to_the_checked_address_not_the_name(
    guard: NetworkGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name resolves to loopback once, then to metadata."""
    answers = iter([["127.0.0.1"]])
    real_lookup = guard.getaddrinfo

    async def rebinding(host: str, port: int, **kwargs: object) -> object:
        if host == "rebind.test":
            guard.dns[host] = next(answers, ["169.254.169.254"])
        return await real_lookup(host, port, **kwargs)

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", rebinding)
    target = Target()
    await target.start()
    dispatcher = Dispatcher(allowlist=Allowlist(["rebind.test:*"]))
    authority = f"rebind.test:{target.port}"
    try:
        first = await dispatcher.call(call_to(authority))
        second = await dispatcher.call(call_to(authority))
        await dispatcher.close()  # the next call needs a new connection
        third = await dispatcher.call(call_to(authority))
    finally:
        await dispatcher.close()
        await target.stop()

    assert (first, second) == (None, None)
    assert len(target.calls) == 2
    # Connected to the address that was checked, never handed the name.
    assert guard.connects == ["127.0.0.1"]
    assert third is not None and third.status.name == "PERMISSION_DENIED"
    assert "169.254.169.254" in third.message


async def test_dispatcher_keeps_the_name_as_authority_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[str] = []
    handler = grpclib.server.request_handler

    async def recording(
        mapping: object, stream: object, headers: object, *rest: object
    ) -> None:
        seen.append(dict(headers)[":authority"])  # type: ignore[call-overload]
        await handler(mapping, stream, headers, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(grpclib.server, "request_handler", recording)
    target = Target()
    await target.start()
    dispatcher = Dispatcher(allowlist=Allowlist(["localhost:*"]))
    try:
        failure = await dispatcher.call(call_to(f"localhost:{target.port}"))
    finally:
        await dispatcher.close()
        await target.stop()

    assert failure is None
    assert seen == [f"localhost:{target.port}"]


async def test_dispatcher_checks_method_and_authority_before_each_call(
    guard: NetworkGuard,
) -> None:
    target = Target()
    await target.start()
    allowlist = Allowlist(
        [_Entry(f"127.0.0.1:{target.port}", ["/coffeemachine.CoffeeMachine/*"])]
    )
    dispatcher = Dispatcher(allowlist=allowlist)
    try:
        allowed = await dispatcher.call(call_to(target.authority))
        wrong_method = await dispatcher.call(call_to(target.authority, "/a.B/c"))
        wrong_port = await dispatcher.call(call_to(f"127.0.0.1:{target.port + 1}"))
    finally:
        await dispatcher.close()
        await target.stop()

    assert allowed is None
    assert wrong_method is not None and wrong_method.status.name == "PERMISSION_DENIED"
    assert wrong_port is not None and wrong_port.status.name == "PERMISSION_DENIED"
    assert len(target.calls) == 1
    assert guard.connects == ["127.0.0.1"]


class _Entry:
    def __init__(self, authority: str, methods: list[str] | None) -> None:
        self.authority = authority
        self.methods = methods
