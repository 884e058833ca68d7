"""Which authorities and methods taskqueue may call: the operator's allowlist.

A generic "call this address later" service is otherwise an open door into
the operator's network, so nothing is allowed unless a pattern names it.
Patterns are ``host:port`` shell patterns (``*.svc.local:50051``,
``127.0.0.1:*``, ``[::1]:*``) where only ``*`` and ``?`` are wildcards, so
that the brackets of an IPv6 host are literal. They are matched against the
normalised authority: host lower-cased, trailing dot removed, IPv6 in its
compressed form. An entry may also limit the methods callable there.

Link-local and cloud metadata addresses (and the metadata servers' names) are
refused even when a wildcard pattern matches them: only a pattern naming that
exact host allows one. An address is recognised however it is spelled: an IPv4
address is accepted only as ``a.b.c.d`` (``2852039166``, ``0xA9FEA9FE`` or
``169.254.43518`` would reach the same host through the C resolver), and an
IPv6 address that carries an IPv4 one (``::ffff:169.254.169.254``, NAT64,
6to4, Teredo) counts as that IPv4 address too.

Names are checked again at connection time: :meth:`Allowlist.resolve` refuses
a name when any of its addresses is forbidden and returns the checked
addresses, so that the caller connects to exactly those.
"""

import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from taskqueue.server.errors import AuthorityNotAllowed, ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# loop.getaddrinfo, or a stand-in with its signature.
Resolver = Callable[..., Awaitable[list[tuple[Any, ...]]]]

# Never a gRPC target of an ordinary deployment, and what SSRF goes after.
FORBIDDEN_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in (
        "169.254.0.0/16",  # IPv4 link-local, the home of most metadata servers
        "fe80::/10",  # IPv6 link-local
        "0.0.0.0/8",  # "this host": reaches the worker's own services
        "::/128",
    )
)
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle...
        "169.254.170.2",  # AWS ECS task credentials
        "fd00:ec2::254",  # AWS over IPv6
        "fd20:ce::254",  # GCP over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (older instances)
        "168.63.129.16",  # Azure WireServer
    )
)
METADATA_NAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.tencentyun.com",
    }
)
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
IPV4_TRANSLATED_PREFIX = ipaddress.ip_network("::ffff:0:0:0/96")
IPV4_COMPATIBLE_PREFIX = ipaddress.ip_network("::/96")

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# What inet_aton(3), and so getaddrinfo(3), takes as one part of an IPv4
# address: hexadecimal, octal or decimal.
_PORT = re.compile(r"[0-9]{1,5}")
_IPV4_PART = re.compile(r"0x[0-9a-f]+|0[0-7]*|[1-9][0-9]*")
MAX_SHOWN = 300


class AllowEntry(Protocol):
    """An ``allow`` entry of the configuration that also limits methods."""

    @property
    def authority(self) -> str: ...

    @property
    def methods(self) -> Sequence[str] | None: ...


@dataclass(frozen=True, slots=True)
class Target:
    """An authority as the allowlist sees it."""

    host: str  # normalised: lower-case, no trailing dot, IPv6 as [compressed]
    port: int
    address: IPAddress | None  # when the host is an IP address
    # False for an IPv4 address written other than a.b.c.d.
    canonical: bool = True


def _shown(authority: str) -> str:
    return repr(authority[:MAX_SHOWN])


def normalise(authority: str) -> str:
    host, _, port = authority.rpartition(":")
    return f"{_normalise_host(host)}:{port}"


def _normalise_host(host: str) -> str:
    host = host.lower().removesuffix(".")
    if host.startswith("[") and host.endswith("]") and "%" not in host:
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            return host
    return host


def parse_ipv4_loose(text: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address ``text`` means to inet_aton(3), None when it is a name.

    ``2852039166``, ``0xa9fea9fe``, ``0251.0376.0251.0376`` and
    ``169.254.43518`` all mean 169.254.169.254 there.
    """
    parts = text.lower().split(".")
    if len(parts) > 4 or not all(_IPV4_PART.fullmatch(p) for p in parts):
        return None
    values = [_ipv4_part(p) for p in parts]
    *head, last = values
    if any(v > 0xFF for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = last
    for index, value in enumerate(head):
        number |= value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def _ipv4_part(part: str) -> int:
    if part.startswith("0x"):
        return int(part[2:], 16)
    if part.startswith("0"):
        return int(part, 8)
    return int(part)


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for on the way, if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    teredo = address.teredo
    translated = (
        address in NAT64_PREFIX
        or address in IPV4_TRANSLATED_PREFIX
        or (address in IPV4_COMPATIBLE_PREFIX and int(address) > 1)
    )
    last32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    carried = (
        address.ipv4_mapped,
        address.sixtofour,
        teredo[1] if teredo else None,
        last32 if translated else None,
    )
    return next((each for each in carried if each is not None), None)


def _aliases(address: IPAddress) -> set[IPAddress]:
    """``address`` and the IPv4 address it carries, if any."""
    embedded = embedded_ipv4(address)
    return {address} if embedded is None else {address, embedded}


def is_forbidden(address: IPAddress) -> bool:
    """Link-local, unspecified or a cloud metadata server, however spelled."""
    for each in _aliases(address):
        if each in METADATA_ADDRESSES:
            return True
        if any(
            each in net for net in FORBIDDEN_NETWORKS if net.version == each.version
        ):
            return True
    return False


def parse(authority: str) -> Target:
    """Split and normalise ``authority``; refuse what we cannot check."""
    host, sep, port_text = authority.rpartition(":")
    port = int(port_text) if _PORT.fullmatch(port_text) else 0
    if not sep or not 0 < port < 65536:
        raise AuthorityNotAllowed(f"authority {_shown(authority)} is not host:port")
    # Non-ASCII names reach the resolver through IDNA, which folds some of
    # them into others (fullwidth letters into ASCII ones): never accepted.
    if not host.isascii():
        raise AuthorityNotAllowed(
            f"authority {_shown(authority)} has no valid host name"
        )

    host = host.lower().removesuffix(".")
    if host.startswith("["):
        host, address = _parse_ipv6(authority, host)
        return Target(host, port, address)
    loose = parse_ipv4_loose(host)
    if loose is not None:
        return Target(host, port, loose, canonical=str(loose) == host)
    if len(host) > 253 or not all(_LABEL.fullmatch(x) for x in host.split(".")):
        raise AuthorityNotAllowed(
            f"authority {_shown(authority)} has no valid host name"
        )
    return Target(host, port, None)


def _parse_ipv6(authority: str, host: str) -> tuple[str, IPAddress]:
    # A zone ("%eth0") only means something on one host: never accepted.
    if not host.endswith("]") or "%" in host:
        raise AuthorityNotAllowed(
            f"authority {_shown(authority)} has no valid IPv6 address"
        )
    try:
        address = ipaddress.IPv6Address(host[1:-1])
    except ValueError:
        raise AuthorityNotAllowed(
            f"authority {_shown(authority)} has no valid IPv6 address"
        ) from None
    return f"[{address.compressed}]", address


def _glob(pattern: str) -> re.Pattern[str]:
    """``*`` and ``?`` are wildcards; every other character stands for itself."""
    parts = {"*": ".*", "?": "."}
    return re.compile("".join(parts.get(c, re.escape(c)) for c in pattern), re.DOTALL)


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled ``host:port`` pattern."""

    text: str
    host: re.Pattern[str]
    port: re.Pattern[str]
    # The host when the pattern names one exactly (no wildcard).
    exact_host: str | None
    exact_address: IPAddress | None

    @classmethod
    def compile(cls, text: str, where: str = "allow") -> "Pattern":
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port:
            raise ConfigError(f"{where}: {text!r} is not a host:port pattern")
        host = _normalise_host(host)
        loose = parse_ipv4_loose(host)
        if loose is not None and str(loose) != host:
            raise ConfigError(
                f"{where}: in {text!r}, write the IPv4 address as {loose}"
            )
        exact = None if "*" in host or "?" in host else host
        return cls(text, _glob(host), _glob(port), exact, _address_of(exact))

    def matches(self, target: Target) -> bool:
        return bool(
            self.host.fullmatch(target.host) and self.port.fullmatch(str(target.port))
        )

    def names_exactly(
        self, host: str | None, address: IPAddress | None, port: int
    ) -> bool:
        """Whether this pattern names ``host`` (or ``address``) without wildcards."""
        if not self.port.fullmatch(str(port)):
            return False
        if host is not None and self.exact_host == host:
            return True
        if address is None or self.exact_address is None:
            return False
        return bool(_aliases(address) & _aliases(self.exact_address))


def _address_of(host: str | None) -> IPAddress | None:
    if host is None:
        return None
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Rule:
    pattern: Pattern
    methods: tuple[re.Pattern[str], ...] | None  # None: every method

    def allows_method(self, method: str) -> bool:
        return self.methods is None or any(m.fullmatch(method) for m in self.methods)


def _rule(entry: "str | AllowEntry", where: str) -> Rule:
    if isinstance(entry, str):
        return Rule(Pattern.compile(entry, where), None)
    pattern = Pattern.compile(entry.authority, where)
    if entry.methods is None:
        return Rule(pattern, None)
    for method in entry.methods:
        if not method.startswith("/"):
            raise ConfigError(
                f"{where}: method pattern {method!r} of {entry.authority!r} does "
                "not start with / (like /package.Service/*)"
            )
    return Rule(pattern, tuple(_glob(m) for m in entry.methods))


# Verdicts an Allowlist remembers before it starts over.
MAX_VERDICTS = 10_000


class Allowlist:
    def __init__(
        self, entries: Iterable["str | AllowEntry"], where: str = "allow"
    ) -> None:
        self._rules = [_rule(entry, where) for entry in entries]
        # Verdicts by (authority, method): the rules never change, and every
        # call asks again. A refusal is kept as its message.
        self._verdicts: dict[tuple[str, str | None], Target | str] = {}

    def allows(self, authority: str, method: str | None = None) -> bool:
        try:
            self.check(authority, method)
        except AuthorityNotAllowed:
            return False
        return True

    def check(self, authority: str, method: str | None = None) -> Target:
        """Refuse ``authority`` (and ``method`` there) unless allowed."""
        key = (authority, method)
        verdict = self._verdicts.get(key)
        if verdict is None:
            try:
                verdict = self._check(authority, method)
            except AuthorityNotAllowed as exc:
                verdict = str(exc)
            if len(self._verdicts) >= MAX_VERDICTS:
                self._verdicts.clear()  # bounded: names come from callers
            self._verdicts[key] = verdict
        if isinstance(verdict, str):
            raise AuthorityNotAllowed(verdict)
        return verdict

    def _check(self, authority: str, method: str | None) -> Target:
        target = parse(authority)
        self._check_special(authority, target)
        if not target.canonical:
            raise AuthorityNotAllowed(
                f"authority {_shown(authority)} spells the IPv4 address "
                f"{target.address} in another form; write it as {target.address}"
            )
        rules = [r for r in self._rules if r.pattern.matches(target)]
        if not rules:
            raise AuthorityNotAllowed(
                f"authority {_shown(authority)} is not allowed by this server's "
                "configuration (allow)"
            )
        if method is not None and not any(r.allows_method(method) for r in rules):
            raise AuthorityNotAllowed(
                f"method {method[:MAX_SHOWN]!r} is not allowed for authority "
                f"{_shown(authority)} by this server's configuration (allow)"
            )
        return target

    def matches(self, authority: str) -> bool:
        """Whether a pattern matches ``authority``; no other check."""
        try:
            target = parse(authority)
        except AuthorityNotAllowed:
            return False
        return target.canonical and any(r.pattern.matches(target) for r in self._rules)

    def check_address(self, authority: str, address: IPAddress, port: int) -> None:
        """Refuse a forbidden address that no pattern names exactly."""
        if is_forbidden(address) and not self._names(None, address, port):
            embedded = embedded_ipv4(address)
            shown = f"{address} ({embedded})" if embedded else str(address)
            raise AuthorityNotAllowed(
                f"authority {_shown(authority)} leads to {shown}, a link-local, "
                "unspecified or cloud metadata address; only an allow pattern "
                "naming that address exactly allows it"
            )

    async def resolve(self, authority: str, resolver: Resolver) -> list[str]:
        """The addresses to connect to for ``authority``, each one checked.

        An IP address is checked as it is, and a metadata server's name
        refused, without any lookup; any other name is refused when any of its
        addresses is forbidden, since which one a connection would reach is
        not ours to choose.
        """
        target = parse(authority)
        self._check_special(authority, target)
        if target.address is not None:
            return [str(target.address)]

        infos = await resolver(
            target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        addresses: list[str] = []
        for info in infos:
            text = str(info[4][0])
            try:
                address = ipaddress.ip_address(text.partition("%")[0])
            except ValueError:
                raise AuthorityNotAllowed(
                    f"authority {_shown(authority)} resolved to {text[:80]!r}, "
                    "not an IP address"
                ) from None
            self.check_address(authority, address, target.port)
            if text not in addresses:
                addresses.append(text)
        if not addresses:
            raise OSError(f"{target.host} has no address")
        return addresses

    def _check_special(self, authority: str, target: Target) -> None:
        if target.address is not None:
            self.check_address(authority, target.address, target.port)
        elif target.host in METADATA_NAMES and not self._names(
            target.host, None, target.port
        ):
            raise AuthorityNotAllowed(
                f"authority {_shown(authority)} names a cloud metadata server; "
                "only an allow pattern naming it exactly allows it"
            )

    def _names(self, host: str | None, address: IPAddress | None, port: int) -> bool:
        return any(r.pattern.names_exactly(host, address, port) for r in self._rules)
