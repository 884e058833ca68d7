"""Which authorities taskqueue may call: the operator's allowlist.

A generic "call this address later" service is otherwise an open door into
the operator's network, so nothing is allowed unless a pattern names it.
Patterns are ``host:port`` shell patterns (``*.svc.local:50051``,
``127.0.0.1:*``, ``[::1]:*``), matched against the normalised authority:
host lower-cased, trailing dot removed, IPv6 in its compressed form.
"""

import contextlib
import fnmatch
import ipaddress

from taskqueue.server.errors import AuthorityNotAllowed


def normalise(authority: str) -> str:
    host, _, port = authority.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        with contextlib.suppress(ValueError):
            host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
    return f"{host.lower().rstrip('.')}:{port}"


class Allowlist:
    def __init__(self, patterns: list[str]) -> None:
        self._patterns = [normalise(p) for p in patterns]

    def allows(self, authority: str) -> bool:
        candidate = normalise(authority)
        return any(fnmatch.fnmatchcase(candidate, p) for p in self._patterns)

    def check(self, authority: str) -> None:
        if not self.allows(authority):
            raise AuthorityNotAllowed(
                f"authority {authority!r} is not allowed by this server's "
                "configuration (allow)"
            )
