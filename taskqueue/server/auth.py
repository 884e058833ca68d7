"""Who may call the rpc server: bearer tokens, and what each caller may do.

With no caller configured every caller is anonymous and may use everything
served; only the allowlist applies. Otherwise every request but a health check
must carry ``authorization: Bearer <token>`` metadata with a token whose
SHA-256 the configuration lists (or that one of its token files holds); a
caller may be held to some authorities, and only callers marked ``admin`` may
use the admin service. Only digests are kept in memory and compared, in
constant time; neither tokens nor digests ever reach a log line or an error
message.
"""

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from taskqueue.server.allowlist import Allowlist
from taskqueue.server.config import CallerConfig
from taskqueue.server.errors import CallerNotAllowed, ConfigError, Unauthenticated

AUTHORIZATION = "authorization"
BEARER = "bearer"


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    # None: every authority the allowlist allows.
    authorities: Allowlist | None = None
    admin: bool = False

    def check_authority(self, authority: str) -> None:
        if self.authorities is not None and not self.authorities.matches(authority):
            raise CallerNotAllowed(
                f"authority {authority[:300]!r} is not allowed for caller "
                f"{self.name!r} (security.callers)"
            )

    def check_admin(self) -> None:
        if not self.admin:
            raise CallerNotAllowed(
                f"caller {self.name!r} may not use the admin service "
                "(security.callers: admin)"
            )


# Without configured callers, whoever reaches the port may use all it serves.
ANONYMOUS = Caller("anonymous", admin=True)


@dataclass(frozen=True, slots=True)
class _Known:
    digest: bytes
    caller: Caller


class Callers:
    def __init__(self, configs: list[CallerConfig]) -> None:
        self._known = [_known(config, index) for index, config in enumerate(configs)]

    @property
    def required(self) -> bool:
        return bool(self._known)

    def identify(self, metadata: Mapping[str, object]) -> Caller:
        """The caller presenting ``metadata``; raises Unauthenticated."""
        if not self._known:
            return ANONYMOUS
        token = _bearer_token(metadata.get(AUTHORIZATION))
        digest = hashlib.sha256(token).digest()
        found = None
        # Every digest is compared, so timing tells nothing about which one
        # came close.
        for known in self._known:
            if hmac.compare_digest(digest, known.digest):
                found = known.caller
        if found is None:
            raise Unauthenticated("the bearer token is not one this server knows")
        return found


def _bearer_token(value: object) -> bytes:
    if not isinstance(value, str):
        raise Unauthenticated(
            "add needs metadata 'authorization: Bearer <token>' on this server"
        )
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != BEARER or not token:
        raise Unauthenticated("the authorization metadata is not 'Bearer <token>'")
    return token.encode()


def _known(config: CallerConfig, index: int) -> _Known:
    where = f"security.callers[{index}]"
    if config.token_sha256 is not None:
        digest = bytes.fromhex(config.token_sha256)
    elif config.token_file is not None:
        digest = hashlib.sha256(_read_token(config.token_file, where)).digest()
    else:
        raise ConfigError(f"{where}: set one of token_sha256 and token_file")
    authorities = None
    if config.authorities:
        authorities = Allowlist(config.authorities, where=f"{where}.authorities")
    return _Known(digest, Caller(config.name, authorities, config.admin))


def _read_token(path: str, where: str) -> bytes:
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(
            f"{where}.token_file: cannot read {path}: {exc.strerror}"
        ) from None
    if not token:
        raise ConfigError(f"{where}.token_file: {path} is empty")
    return token
