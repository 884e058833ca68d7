"""The delay ladder: fixed-delay tier topics that hold retries and scheduled tasks.

Every record on tier ``retry-D`` becomes eligible D after it was written, so
along a partition eligibility never goes backwards and a consumer can pause the
partition until its head is eligible. A task is put on the largest tier whose
delay does not exceed the time left until it is due; from there it is either
called or routed onward. Time left below the smallest tier is waited out with a
timer in the worker, which keeps every call from being early or late by more
than scheduling noise.
"""

import re
from dataclasses import dataclass

from taskqueue.server.errors import ConfigError
from taskqueue.server.topics import Topics

_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# At most 5 digits: validation keeps room for ".retry-99999d" in a topic name.
_DELAY_RE = re.compile(r"([0-9]{1,5})([smhd])")


def parse_delay_s(tier: str, origin: str = "<config>") -> float:
    """``5s``, ``1m``, ``2h``, ``14d`` in seconds."""
    match = _DELAY_RE.fullmatch(tier.removeprefix("retry-"))
    if match is None or int(match[1]) == 0:
        raise ConfigError(f"{origin}: tier {tier!r} is not like 5s, 1m, 2h or 14d")
    return float(int(match[1]) * _UNITS_S[match[2]])


@dataclass(frozen=True, slots=True)
class Tier:
    name: str  # the topic suffix, e.g. "retry-5s"
    delay_s: float


class Ladder:
    def __init__(self, tiers: list[str]) -> None:
        parsed = {parse_delay_s(t): t.removeprefix("retry-") for t in tiers}
        self.tiers = [Tier(f"retry-{parsed[d]}", d) for d in sorted(parsed)]
        self._by_name = {tier.name: tier for tier in self.tiers}

    @property
    def smallest_s(self) -> float:
        return self.tiers[0].delay_s if self.tiers else float("inf")

    def tier_for(self, remaining_s: float) -> Tier | None:
        """The largest tier not longer than ``remaining_s``; None below the first."""
        chosen = None
        for tier in self.tiers:
            if tier.delay_s > remaining_s:
                break
            chosen = tier
        return chosen

    def topic_for(
        self, topics: Topics, authority: str, queue: str, wait_s: float
    ) -> str:
        """Where a task due ``wait_s`` from now is written: its main topic when
        no tier fits (the worker waits out the rest), else the tier chosen."""
        tier = self.tier_for(wait_s)
        if tier is None:
            return topics.main(authority, queue)
        return topics.tier(authority, queue, tier.name)

    def delay_s(self, tier_name: str | None) -> float:
        """Delay of a topic's tier: 0 for a main topic or an unknown tier."""
        if tier_name is None:
            return 0.0
        tier = self._by_name.get(tier_name)
        if tier is None:
            # A tier removed from the config still drains at its own delay.
            return parse_delay_s(tier_name) if tier_name != "dlq" else 0.0
        return tier.delay_s
