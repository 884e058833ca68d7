"""Topic names: ``PREFIX.<authority>.<queue>[.<tier>]``.

``greeter.srv.prod:50051`` appears as ``greeter.srv.prod.50051``; a bracketed
IPv6 host as ``_ip6_`` and its eight groups joined by ``_`` (hostnames never
contain ``_``, so the two forms cannot meet). Queue names have no dots and are
never a tier name, so the last component of a topic tells its tier:
``retry-5s``, ``retry-1m``... for the delay ladder, ``dlq`` for dead letters,
anything else for the main topic. ``PREFIX.__<name>`` is taskqueue's own
(``PREFIX.__replayed``, the marks of ``taskqueue dlq replay``): host names never
start with ``_`` and an IPv6 host starts with ``_ip6_``, so no queue meets it.

Kafka refuses a topic whose name differs from an existing one only by ``.``
against ``_`` (both become ``_`` in its metric names). Queue names therefore
have no ``_`` either: outside the fixed-length ``_ip6_`` form no component of a
name holds ``_``, so turning each ``.`` into ``_`` loses nothing and two of our
names never collide. (Without the rule, authority ``h:80`` with queue ``1_q``
and ``h.80:1`` with queue ``q`` would.) Queues named with ``_`` before the rule
keep working in the workers; ``add`` refuses new tasks to them.
"""

import contextlib
import ipaddress
import re
from dataclasses import dataclass

DLQ = "dlq"
# The first characters of taskqueue's own topics after ``PREFIX.``.
INTERNAL = "__"
TIER_RE = re.compile(r"retry-[0-9]+[smhd]")
QUEUE_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
MAX_TOPIC_LENGTH = 249


def encode_authority(authority: str) -> str:
    """``host:port`` as it appears in a topic name (host lower-cased)."""
    host, _, port = authority.rpartition(":")
    if host.startswith("["):
        address = ipaddress.IPv6Address(host[1:-1])
        host = "_ip6_" + address.exploded.replace(":", "_")
    return f"{host.lower().rstrip('.')}.{port}"


def decode_authority(encoded: str) -> str:
    """The inverse of :func:`encode_authority`, IPv6 in its compressed form."""
    host, _, port = encoded.rpartition(".")
    if host.startswith("_ip6_"):
        groups = host.removeprefix("_ip6_").replace("_", ":")
        with contextlib.suppress(ValueError):  # not ours: shown as it is
            host = f"[{ipaddress.IPv6Address(groups).compressed}]"
    return f"{host}:{port}"


def is_reserved_queue(queue: str) -> bool:
    return queue == DLQ or TIER_RE.fullmatch(queue) is not None


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str = "taskqueue"

    def main(self, authority: str, queue: str) -> str:
        return f"{self.prefix}.{encode_authority(authority)}.{queue}"

    def tier(self, authority: str, queue: str, tier: str) -> str:
        return f"{self.main(authority, queue)}.{tier}"

    def dlq(self, authority: str, queue: str) -> str:
        return self.tier(authority, queue, DLQ)

    def replayed(self) -> str:
        """The compacted topic of replay marks (see ``replay.py``)."""
        return f"{self.prefix}.{INTERNAL}replayed"

    def main_pattern(self) -> str:
        """Regex of every main topic (no tier or dead-letter suffix)."""
        tiers = f"{TIER_RE.pattern}|{DLQ}"
        return rf"^{re.escape(self.prefix)}\.(?!{INTERNAL})(?!.*\.(?:{tiers})$)[^.].*$"

    def tier_pattern(self) -> str:
        """Regex of every ladder tier topic (never a dead-letter topic)."""
        return rf"^{re.escape(self.prefix)}\..+\.{TIER_RE.pattern}$"

    def dlq_pattern(self) -> str:
        return rf"^{re.escape(self.prefix)}\..+\.{DLQ}$"

    def authority_and_queue(self, topic: str) -> tuple[str, str]:
        """The normalised ``host:port`` and the queue a topic of ours belongs to."""
        rest = base_of(topic).removeprefix(f"{self.prefix}.")
        host_port, _, queue = rest.rpartition(".")
        return decode_authority(host_port), queue


def tier_of(topic: str) -> str | None:
    """The tier suffix of a topic (``retry-5s``, ``dlq``), None for a main topic."""
    last = topic.rpartition(".")[2]
    if last == DLQ or TIER_RE.fullmatch(last):
        return last
    return None


def base_of(topic: str) -> str:
    """The main topic a tier or dead-letter topic belongs to."""
    return topic.rpartition(".")[0] if tier_of(topic) else topic
