"""Flow control for outgoing calls: global and per-authority limits.

Every call takes a global slot (``worker.concurrency``), a slot of its
authority (``authority_limits``), a token of the authority's rate limit, and
waits out the authority's overload backoff: after ``overload.threshold``
consecutive RESOURCE_EXHAUSTED or UNAVAILABLE answers the authority is left
alone for a while, doubling up to ``overload.max_backoff_s``, instead of
being sent doomed attempts that would only flood the retry tiers. Waiting
jobs stay interruptible; while they wait, their queue's pending count grows
and the worker pauses that queue's partitions, so other authorities go on.
"""

import asyncio
import fnmatch
import logging
import time
from typing import Protocol

from grpclib.const import Status

from taskqueue.server.config import AuthorityLimit, Config, OverloadConfig

log = logging.getLogger(__name__)

OVERLOAD = frozenset({Status.RESOURCE_EXHAUSTED, Status.UNAVAILABLE})
# Gates kept for authorities seen; idle ones are dropped beyond this.
MAX_GATES = 4096


class Waiter(Protocol):
    async def wait(self, seconds: float) -> None:
        """Sleep, or raise if the job is taken back meanwhile."""


class TokenBucket:
    def __init__(self, rate_per_s: float, burst: int) -> None:
        self._rate_per_s = rate_per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._updated = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        elapsed = now - self._updated
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate_per_s)
        self._updated = now

    async def ready(self, waiter: Waiter) -> None:
        """Wait until a token is there, without taking it."""
        self._refill()
        while self._tokens < 1:
            await waiter.wait((1 - self._tokens) / self._rate_per_s)
            self._refill()

    def take_now(self) -> bool:
        self._refill()
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    @property
    def full(self) -> bool:
        self._refill()
        return self._tokens >= self._burst


class Gate:
    """What one authority's calls pass through."""

    def __init__(
        self,
        limit: AuthorityLimit | None,
        overload: OverloadConfig,
        default_concurrency: int,
    ) -> None:
        concurrency = (limit.concurrency if limit else None) or default_concurrency
        self.slots = asyncio.Semaphore(concurrency)
        rate = limit.rate_per_s if limit else None
        self._bucket = TokenBucket(rate, limit.burst) if rate and limit else None
        self._overload = overload
        self._failures = 0
        self._backoff_s = overload.backoff_s
        self._closed_until = 0.0
        self._probing = False
        self.users = 0

    async def wait_open(self, waiter: Waiter) -> None:
        while (left_s := self._closed_until - time.monotonic()) > 0:
            await waiter.wait(left_s)
        if self._failures >= self._overload.threshold and not self._probing:
            # After a back-off one call goes first to see if the authority is
            # back; the others wait for its answer (or the same back-off again)
            # instead of all failing at once and flooding the retry tiers.
            self._probing = True
            self._closed_until = time.monotonic() + self._backoff_s

    async def token_ready(self, waiter: Waiter) -> None:
        if self._bucket is not None:
            await self._bucket.ready(waiter)

    def take_token(self) -> bool:
        return self._bucket is None or self._bucket.take_now()

    def record(self, authority: str, status: Status | None) -> None:
        """Note a call's outcome; back off after too many overload answers."""
        if status not in OVERLOAD:
            self._failures = 0
            self._backoff_s = self._overload.backoff_s
            self._probing = False
            self._closed_until = 0.0
            return
        now = time.monotonic()
        if self._probing:  # the first answer after a back-off: still overloaded
            self._probing = False
            self._back_off(authority, now)
            return
        if self._closed_until > now:
            return  # answers to calls made before the back-off began
        self._failures += 1
        if self._failures >= self._overload.threshold:
            self._back_off(authority, now)

    def _back_off(self, authority: str, now: float) -> None:
        self._closed_until = now + self._backoff_s
        log.warning(
            "authority %s backed off for %.1fs after %d overload answers",
            authority,
            self._backoff_s,
            self._failures,
        )
        self._backoff_s = min(self._backoff_s * 2, self._overload.max_backoff_s)

    @property
    def idle(self) -> bool:
        backed_off = self._closed_until > time.monotonic()
        full = self._bucket is None or self._bucket.full
        return self.users == 0 and not backed_off and full and self._failures == 0


class FlowControl:
    def __init__(self, config: Config) -> None:
        self._limits = config.authority_limits
        self._overload = config.overload
        self._slots = asyncio.Semaphore(config.worker.concurrency)
        self._per_authority = config.worker.max_calls_per_authority
        self._gates: dict[str, Gate] = {}

    def call(self, authority: str, waiter: Waiter) -> "Passage":
        """Hold everything one call to ``authority`` needs while it runs:
        ``async with flow.call(authority, waiter) as gate: ...``."""
        return Passage(self, self._gate(authority), waiter)

    async def _enter(self, gate: Gate, waiter: Waiter) -> None:
        gate.users += 1
        try:
            await gate.wait_open(waiter)
            await gate.slots.acquire()
            try:
                await self._call_slot_and_token(gate, waiter)
            except BaseException:
                gate.slots.release()
                raise
        except BaseException:
            gate.users -= 1
            raise

    def _leave(self, gate: Gate) -> None:
        self._slots.release()
        gate.slots.release()
        gate.users -= 1

    async def _call_slot_and_token(self, gate: Gate, waiter: Waiter) -> None:
        """Take a call slot and a token of the authority's rate limit.

        A call slot is never held while waiting for a token, else the calls
        of one rate-limited authority would take every slot from the others.
        The token is taken only with the slot in hand, so that calls kept
        waiting for a slot cannot start in a burst beyond the rate.
        """
        while True:
            await gate.token_ready(waiter)
            await self._slots.acquire()
            if gate.take_token():
                return
            self._slots.release()  # another call to the authority took it

    def _gate(self, authority: str) -> Gate:
        gate = self._gates.get(authority)
        if gate is None:
            if len(self._gates) >= MAX_GATES:
                self._gates = {a: g for a, g in self._gates.items() if not g.idle}
            gate = self._gates[authority] = Gate(
                self._limit(authority), self._overload, self._per_authority
            )
        return gate

    def _limit(self, authority: str) -> AuthorityLimit | None:
        for limit in self._limits:
            if fnmatch.fnmatchcase(authority.lower(), limit.authority.lower()):
                return limit
        return None


class Passage:
    """One call's way through flow control, as an async context manager.

    A class rather than ``contextlib.asynccontextmanager``: every call to a
    target passes here, and a generator per call costs more.
    """

    __slots__ = ("_flow", "_gate", "_waiter")

    def __init__(self, flow: FlowControl, gate: Gate, waiter: Waiter) -> None:
        self._flow = flow
        self._gate = gate
        self._waiter = waiter

    async def __aenter__(self) -> Gate:
        await self._flow._enter(self._gate, self._waiter)
        return self._gate

    async def __aexit__(self, *exc_info: object) -> None:
        self._flow._leave(self._gate)
