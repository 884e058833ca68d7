"""Certificates made on the spot, TLS targets, and a guard against stray sockets.

Every address here is loopback: the tests prove refusals by showing that no
connection was even attempted, never by trying one elsewhere.
"""

import asyncio
import datetime
import ipaddress
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpclib.encoding.proto import ProtoStatusDetailsCodec
from grpclib.server import Server

from taskqueue.server.dispatcher import RawCodec
from tests.support import Target

LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
LOOPBACK_V6 = ipaddress.ip_address("::1")


@dataclass
class Authority:
    """A CA: its certificate, its key and where its PEM file is."""

    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    path: Path


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(
        now - datetime.timedelta(minutes=5)
    ).not_valid_after(now + datetime.timedelta(days=1))


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_ca(directory: Path, name: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    )
    cert = builder.sign(key, hashes.SHA256())
    path = directory / f"{name}-ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Authority(name, cert, key, path)


def issue(
    ca: Authority,
    directory: Path,
    name: str,
    *,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    client: bool = False,
) -> Issued:
    """A leaf certificate signed by ``ca`` for ``dns`` names and ``ips``."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    usage = (
        ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    )
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(_name(name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(names), critical=False
        )
    cert = builder.sign(ca.key, hashes.SHA256())
    cert_path = directory / f"{name}.pem"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return Issued(cert_path, key_path)


@dataclass
class Pki:
    ca: Authority
    other_ca: Authority
    server: Issued  # localhost, 127.0.0.1 and ::1
    server_by_name: Issued  # localhost only
    client: Issued
    stranger: Issued  # a client certificate of another CA


def make_pki(directory: Path) -> Pki:
    ca = make_ca(directory, "main")
    other = make_ca(directory, "other")
    return Pki(
        ca=ca,
        other_ca=other,
        server=issue(
            ca, directory, "server", dns=("localhost",), ips=("127.0.0.1", "::1")
        ),
        server_by_name=issue(ca, directory, "by-name", dns=("localhost",)),
        client=issue(ca, directory, "client", dns=("client",), client=True),
        stranger=issue(other, directory, "stranger", client=True),
    )


def server_context(
    issued: Issued, client_ca: Authority | None = None
) -> ssl.SSLContext:
    """A target's context; with ``client_ca`` it wants client certificates."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(issued.cert, issued.key)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca.path)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca: Authority, issued: Issued | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_alpn_protocols(["h2"])
    context.load_verify_locations(cafile=ca.path)
    if issued is not None:
        context.load_cert_chain(issued.cert, issued.key)
    return context


@dataclass
class TlsTarget(Target):
    """A recording target speaking TLS (or mutual TLS) on a loopback address."""

    context: ssl.SSLContext | None = None
    host: str = "127.0.0.1"

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self, port: int = 0) -> None:
        self._server = Server(
            [self], codec=RawCodec(), status_details_codec=ProtoStatusDetailsCodec()
        )
        await self._server.start(self.host, port, ssl=self.context)
        sockets = self._server._server.sockets  # type: ignore[union-attr]
        self.port = sockets[0].getsockname()[1]


def is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host == "localhost"
    return address in LOOPBACK_V4 or address == LOOPBACK_V6


@dataclass
class NetworkGuard:
    """Stands in for the loop's getaddrinfo and create_connection.

    Names in ``dns`` resolve to the given addresses; every other name goes to
    the real resolver. Every connection attempt is recorded, and one to a
    non-loopback address raises before a socket exists, so a test that goes
    wrong still sends nothing off this machine.
    """

    dns: dict[str, list[str]] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)
    connects: list[str] = field(default_factory=list)
    _real_getaddrinfo: Callable[..., Any] | None = None
    _real_connect: Callable[..., Any] | None = None

    def install(self, loop: asyncio.AbstractEventLoop, monkeypatch: Any) -> None:
        self._real_getaddrinfo = loop.getaddrinfo
        self._real_connect = loop.create_connection
        monkeypatch.setattr(loop, "getaddrinfo", self.getaddrinfo)
        monkeypatch.setattr(loop, "create_connection", self.create_connection)

    async def getaddrinfo(self, host: Any, port: Any, **kwargs: Any) -> Any:
        self.lookups.append(str(host))
        if host in self.dns:
            return [
                (
                    _family(a),
                    socket.SOCK_STREAM,
                    socket.IPPROTO_TCP,
                    "",
                    _sockaddr(a, port),
                )
                for a in self.dns[host]
            ]
        assert self._real_getaddrinfo is not None
        return await self._real_getaddrinfo(host, port, **kwargs)

    async def create_connection(
        self, factory: Any, host: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        self.connects.append(str(host))
        if host is not None and not is_loopback(str(host)):
            raise OSError(f"test guard: refused to connect to {host}")
        assert self._real_connect is not None
        return await self._real_connect(factory, host, *args, **kwargs)


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _sockaddr(address: str, port: Any) -> tuple[Any, ...]:
    return (address, int(port), 0, 0) if ":" in address else (address, int(port))


class CountingListener:
    """A plain TCP listener that counts the connections it accepts."""

    def __init__(self, host: str) -> None:
        assert is_loopback(host)
        self.host = host
        self.accepted = 0
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.accepted += 1
        writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
