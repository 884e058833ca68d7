"""Retry policy: whether and when a failed call is tried again.

The decision lives here, on the failure and the policy, rather than in ``if``
chains through the worker. A task's own ``RetryPolicy`` fields override its
queue's defaults from the configuration.
"""

import math
from dataclasses import dataclass
from typing import Literal

from google.protobuf.duration_pb2 import Duration
from grpclib.const import Status

from taskqueue.protobuf.service_pb2 import RetryPolicy, Task
from taskqueue.server.config import QueueConfig
from taskqueue.server.validation import MAX_DELAY_S


@dataclass(frozen=True, slots=True)
class Failure:
    """How one call failed."""

    status: Status
    message: str
    # The target's google.rpc.RetryInfo, when it sent one.
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    delay_s: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: str


Decision = Retry | GiveUp


@dataclass(frozen=True, slots=True)
class Policy:
    max_attempts: int
    backoff_s: tuple[float, ...]
    initial_backoff_s: float | None
    multiplier: float
    max_backoff_s: float | None
    max_age_s: float | None
    retryable: frozenset[Status]

    @classmethod
    def for_task(cls, task: Task, queue: QueueConfig) -> "Policy":
        own = task.retry if task.HasField("retry") else RetryPolicy()
        defaults = queue.retry

        return cls(
            max_attempts=own.max_attempts or defaults.max_attempts,
            backoff_s=tuple(d.ToNanoseconds() / 1e9 for d in own.backoff)
            or tuple(defaults.backoff_s),
            initial_backoff_s=_seconds(own, "initial_backoff")
            if not own.backoff
            else None,
            multiplier=own.multiplier or 2.0,
            max_backoff_s=_seconds(own, "max_backoff"),
            max_age_s=_seconds(own, "max_age") or defaults.max_age_s,
            retryable=frozenset(Status[name] for name in defaults.retryable),
        )

    def decide(self, failure: Failure, attempt: int, age_s: float) -> Decision:
        """What to do after call number ``attempt`` failed, ``age_s`` after add."""
        if failure.status not in self.retryable:
            return GiveUp(f"{failure.status.name} is not retried")
        if attempt >= self.max_attempts:
            return GiveUp(f"gave up after {attempt} attempts")

        delay_s = failure.retry_after_s
        if delay_s is None:
            delay_s = self.backoff(attempt)
        if math.isnan(delay_s):  # nothing a target sends may pin a record
            delay_s = 0.0
        delay_s = min(max(delay_s, 0.0), MAX_DELAY_S)
        if self.max_age_s is not None and age_s + delay_s > self.max_age_s:
            return GiveUp(f"next attempt would pass max_age {self.max_age_s:g}s")
        return Retry(delay_s)

    def backoff(self, attempt: int) -> float:
        """Delay before attempt ``attempt + 1``."""
        if self.initial_backoff_s is not None:
            try:
                delay_s = self.initial_backoff_s * self.multiplier ** (attempt - 1)
            except OverflowError:  # a large multiplier, a late attempt
                delay_s = MAX_DELAY_S
            if self.max_backoff_s is not None:
                delay_s = min(delay_s, self.max_backoff_s)
            return min(delay_s, MAX_DELAY_S)
        return self.backoff_s[min(attempt, len(self.backoff_s)) - 1]


def _seconds(
    retry: RetryPolicy, name: Literal["initial_backoff", "max_backoff", "max_age"]
) -> float | None:
    if not retry.HasField(name):
        return None
    duration: Duration = getattr(retry, name)
    return duration.ToNanoseconds() / 1e9
