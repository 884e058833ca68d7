"""Per-partition offset bookkeeping for out-of-order completion.

Records of a partition are taken in offset order but finish in any order. The
offset that may be committed is the lowest one not finished yet (or the next
one to take when all are finished): committing past an unfinished record would
lose it if the worker died.
"""

import asyncio
from collections import deque


class OffsetTracker:
    def __init__(self) -> None:
        self._taken: deque[int] = deque()
        self._open: set[int] = set()  # taken and not finished yet
        self._next: int | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def take(self, offset: int) -> None:
        if self._next is not None and offset < self._next:
            raise ValueError(f"offset {offset} taken after {self._next - 1}")
        self._taken.append(offset)
        self._open.add(offset)
        self._next = offset + 1

    def finish(self, offset: int) -> None:
        # Only the first finish counts: an at-most-once record is finished
        # when it is claimed and again when its call returns.
        if offset not in self._open:
            return
        self._open.discard(offset)
        while self._taken and self._taken[0] not in self._open:
            self._taken.popleft()
        self._wake()

    @property
    def next_offset(self) -> int | None:
        """The offset after the last one taken."""
        return self._next

    @property
    def pending(self) -> int:
        return len(self._open)

    def committable(self) -> int | None:
        """Offset to commit: every record below it is finished."""
        return self._taken[0] if self._taken else self._next

    async def reached(self, offset: int) -> None:
        """Wait until ``committable()`` is at least ``offset``."""
        current = self.committable()
        if current is not None and current >= offset:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((offset, future))
        await future

    def _wake(self) -> None:
        current = self.committable()
        if current is None:
            return
        still = []
        for offset, future in self._waiters:
            if offset <= current:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((offset, future))
        self._waiters = still
