"""Topic names: ``PREFIX.<authority>.<queue>[.<tier>]``.

``greeter.srv.prod:50051`` appears as ``greeter.srv.prod.50051``; a bracketed
IPv6 host as ``_ip6_`` and its eight groups joined by ``_`` (hostnames never
contain ``_``, so the two forms cannot meet). Queue names have no dots and are
never a tier name, so the last component of a topic tells its tier:
``retry-5s``, ``retry-1m``... for the delay ladder, ``dlq`` for dead letters,
anything else for the main topic.
"""

import ipaddress
import re
from dataclasses import dataclass

DLQ = "dlq"
TIER_RE = re.compile(r"retry-[0-9]+[smhd]")
QUEUE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOPIC_LENGTH = 249


def encode_authority(authority: str) -> str:
    """``host:port`` as it appears in a topic name (host lower-cased)."""
    host, _, port = authority.rpartition(":")
    if host.startswith("["):
        address = ipaddress.IPv6Address(host[1:-1])
        host = "_ip6_" + address.exploded.replace(":", "_")
    return f"{host.lower().rstrip('.')}.{port}"


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

    def main_pattern(self) -> str:
        """Regex of every main topic (no tier or dead-letter suffix)."""
        tiers = f"{TIER_RE.pattern}|{DLQ}"
        return rf"^{re.escape(self.prefix)}\.(?!.*\.(?:{tiers})$)[^.].*$"

    def tier_pattern(self) -> str:
        """Regex of every ladder tier topic (never a dead-letter topic)."""
        return rf"^{re.escape(self.prefix)}\..+\.{TIER_RE.pattern}$"

    def dlq_pattern(self) -> str:
        return rf"^{re.escape(self.prefix)}\..+\.{DLQ}$"


def tier_of(topic: str) -> str | None:
    """The tier suffix of a topic (``retry-5s``, ``dlq``), None for a main topic."""
    last = topic.rpartition(".")[2]
    if last == DLQ or TIER_RE.fullmatch(last):
        return last
    return None


def base_of(topic: str) -> str:
    """The main topic a tier or dead-letter topic belongs to."""
    return topic.rpartition(".")[0] if tier_of(topic) else topic
