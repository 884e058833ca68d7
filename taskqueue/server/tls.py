"""TLS contexts: the rpc server's (TLS, mutual TLS) and the outgoing calls'.

Contexts are built once at start-up from the ``security`` section; a file that
cannot be loaded stops start-up with a :class:`ConfigError` naming the key and
the file, never the file's content.
"""

import ssl
from dataclasses import dataclass

from taskqueue.server.allowlist import Allowlist
from taskqueue.server.config import OutgoingTlsConfig, RpcTlsConfig
from taskqueue.server.errors import ConfigError

ALPN = ["h2"]


def server_context(config: RpcTlsConfig) -> ssl.SSLContext | None:
    """The rpc server's context; None when TLS is not configured."""
    if config.cert is None or config.key is None:
        return None
    # Not ssl.create_default_context(CLIENT_AUTH): it trusts the system's CAs
    # for client certificates, so with mutual TLS any certificate a public CA
    # signed would be let in. Only client_ca is trusted here.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN)
    _load_chain(context, "security.tls", config.cert, config.key)
    if config.client_ca is not None:
        _load_ca(context, "security.tls.client_ca", config.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def describe(config: RpcTlsConfig) -> str:
    """What callers of the rpc server must speak, for the start-up log."""
    if config.cert is None:
        return "plaintext"
    return "TLS, client certificates required" if config.client_ca else "TLS"


def client_context(config: OutgoingTlsConfig, where: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies name and chain
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN)
    if config.ca is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _load_ca(context, f"{where}.ca", config.ca)
    if config.cert is not None and config.key is not None:
        _load_chain(context, where, config.cert, config.key)
    return context


@dataclass(frozen=True, slots=True)
class Tls:
    """How to speak TLS to one authority."""

    context: ssl.SSLContext
    # The name its certificate must carry; None: the authority's host.
    server_name: str | None


class OutgoingTls:
    """The ``security.outgoing_tls`` rules; the first that matches wins."""

    def __init__(self, rules: list[OutgoingTlsConfig]) -> None:
        self._rules: list[tuple[Allowlist, Tls]] = []
        for index, rule in enumerate(rules):
            where = f"security.outgoing_tls[{index}]"
            pattern = Allowlist([rule.authority], where=f"{where}.authority")
            tls = Tls(client_context(rule, where), rule.server_name)
            self._rules.append((pattern, tls))

    def for_authority(self, authority: str) -> Tls | None:
        for pattern, tls in self._rules:
            if pattern.matches(authority):
                return tls
        return None


def _load_chain(context: ssl.SSLContext, where: str, cert: str, key: str) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{where}: cannot load the certificate {cert} with the key {key}: "
            f"{_reason(exc)}"
        ) from None


def _load_ca(context: ssl.SSLContext, where: str, path: str) -> None:
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: cannot load {path}: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    # ssl errors carry OpenSSL's reason code; never anything of the file.
    return str(getattr(exc, "reason", None) or exc.strerror or type(exc).__name__)
