"""Offset tracking for out-of-order completion (CASES.md C12, unit part)."""

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskqueue.server.tracker import OffsetTracker

# Increasing offsets with gaps (compacted or transactional partitions skip some).
offsets = st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=40).map(
    lambda steps: [sum(steps[: i + 1]) for i in range(len(steps))]
)


def expected_committable(taken: list[int], finished: set[int]) -> int | None:
    unfinished = [o for o in taken if o not in finished]
    if unfinished:
        return min(unfinished)
    return taken[-1] + 1 if taken else None


@given(st.data(), offsets)
def test_committable_is_always_the_lowest_unfinished_offset(
    data: st.DataObject, all_offsets: list[int]
) -> None:
    tracker = OffsetTracker()
    taken: list[int] = []
    finished: set[int] = set()

    while len(finished) < len(all_offsets):
        can_take = len(taken) < len(all_offsets)
        open_offsets = sorted(set(taken) - finished)
        if can_take and (not open_offsets or data.draw(st.booleans())):
            offset = all_offsets[len(taken)]
            tracker.take(offset)
            taken.append(offset)
        else:
            offset = data.draw(st.sampled_from(open_offsets))
            tracker.finish(offset)
            finished.add(offset)

        assert tracker.committable() == expected_committable(taken, finished)
        assert tracker.pending == len(taken) - len(finished)


@given(offsets.flatmap(lambda o: st.tuples(st.just(o), st.permutations(o))))
def test_all_taken_then_finished_in_any_order(
    case: tuple[list[int], list[int]],
) -> None:
    taken, order = case
    tracker = OffsetTracker()
    for offset in taken:
        tracker.take(offset)

    for i, offset in enumerate(order):
        tracker.finish(offset)
        assert tracker.committable() == expected_committable(taken, set(order[: i + 1]))

    assert tracker.committable() == taken[-1] + 1
    assert tracker.pending == 0


def test_a_slow_record_holds_the_commit_back() -> None:
    # C12: offsets 0..9, offset 3 is slow and the rest finish first.
    tracker = OffsetTracker()
    for offset in range(10):
        tracker.take(offset)

    for offset in (0, 1, 2, 4, 5, 6, 7, 8, 9):
        tracker.finish(offset)
        assert tracker.committable() <= 3  # type: ignore[operator]

    assert tracker.committable() == 3
    assert tracker.pending == 1
    tracker.finish(3)
    assert tracker.committable() == 10
    assert tracker.pending == 0


def test_nothing_taken_means_nothing_to_commit() -> None:
    assert OffsetTracker().committable() is None
    assert OffsetTracker().pending == 0


def test_offsets_must_not_go_backwards() -> None:
    tracker = OffsetTracker()
    tracker.take(5)

    with pytest.raises(ValueError, match="offset 4"):
        tracker.take(4)
    with pytest.raises(ValueError, match="offset 5"):
        tracker.take(5)


def test_finishing_twice_counts_once() -> None:
    # An at-most-once record is finished when it is claimed and again when its
    # call returns; the second must not make room for an extra record.
    tracker = OffsetTracker()
    for offset in range(3):
        tracker.take(offset)

    tracker.finish(0)
    tracker.finish(0)
    tracker.finish(2)
    tracker.finish(2)

    assert tracker.pending == 1
    assert tracker.committable() == 1
    tracker.finish(1)
    assert tracker.pending == 0
    assert tracker.committable() == 3


def test_finishing_an_offset_never_taken_changes_nothing() -> None:
    tracker = OffsetTracker()
    tracker.take(0)
    tracker.take(2)

    tracker.finish(1)
    tracker.finish(7)

    assert tracker.pending == 2
    assert tracker.committable() == 0


async def test_reached_wakes_a_waiter_once_the_commit_gets_there() -> None:
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.take(offset)
    waiter = asyncio.create_task(tracker.reached(3))

    tracker.finish(1)
    tracker.finish(2)
    await asyncio.sleep(0)
    assert not waiter.done()

    tracker.finish(0)
    await asyncio.wait_for(waiter, timeout=1)
    assert tracker.committable() == 3


async def test_reached_wakes_only_the_waiters_it_passed() -> None:
    tracker = OffsetTracker()
    for offset in range(4):
        tracker.take(offset)
    near = asyncio.create_task(tracker.reached(1))
    far = asyncio.create_task(tracker.reached(4))
    await asyncio.sleep(0)

    tracker.finish(0)
    await asyncio.wait_for(near, timeout=1)
    await asyncio.sleep(0)
    assert not far.done()

    for offset in (3, 2, 1):
        tracker.finish(offset)
    await asyncio.wait_for(far, timeout=1)


async def test_reached_returns_at_once_when_already_there() -> None:
    tracker = OffsetTracker()
    tracker.take(0)
    tracker.finish(0)

    await asyncio.wait_for(tracker.reached(1), timeout=1)
    await asyncio.wait_for(tracker.reached(0), timeout=1)


async def test_a_cancelled_waiter_does_not_break_the_others() -> None:
    tracker = OffsetTracker()
    tracker.take(0)
    gone = asyncio.create_task(tracker.reached(1))
    kept = asyncio.create_task(tracker.reached(1))
    await asyncio.sleep(0)
    gone.cancel()

    tracker.finish(0)

    await asyncio.wait_for(kept, timeout=1)
    assert gone.cancelled()
