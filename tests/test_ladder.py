"""The delay ladder: which tier a wait goes to, and how a long wait is climbed."""

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from taskqueue.server.config import TopicsConfig
from taskqueue.server.errors import ConfigError
from taskqueue.server.ladder import Ladder, Tier, parse_delay_s

DAY_S = 86400.0
DEFAULT = Ladder(TopicsConfig().tiers)

tier_text = st.tuples(
    st.integers(min_value=1, max_value=999), st.sampled_from("smhd")
).map(lambda t: f"{t[0]}{t[1]}")
tier_lists = st.lists(tier_text, min_size=1, max_size=8)
waits_s = st.floats(min_value=0, max_value=3 * 365 * DAY_S, allow_nan=False)


def climb(ladder: Ladder, wait_s: float, lateness_s: list[float]) -> tuple[int, float]:
    """Follow a task hop by hop: (hops, time left when the ladder lets go).

    Each hop writes the task to the tier ``tier_for`` picks; the record is
    read back that tier's delay later, plus the given consumer lateness.
    """
    now_s = 0.0
    hops = 0
    while (tier := ladder.tier_for(wait_s - now_s)) is not None:
        now_s += tier.delay_s
        assert now_s <= wait_s, f"hop {hops + 1} to {tier.name} is due early"
        now_s += lateness_s[hops % len(lateness_s)] if lateness_s else 0.0
        hops += 1
    return hops, wait_s - now_s


def test_default_tiers() -> None:
    assert [t.name for t in DEFAULT.tiers] == [
        "retry-5s",
        "retry-1m",
        "retry-10m",
        "retry-1h",
        "retry-8h",
        "retry-2d",
        "retry-14d",
    ]
    assert DEFAULT.smallest_s == 5.0


@pytest.mark.parametrize(
    ("wait_s", "expected"),
    [
        (0.0, None),
        (4.999, None),
        (5.0, "retry-5s"),
        (59.9, "retry-5s"),
        (60.0, "retry-1m"),
        (3599.0, "retry-10m"),
        (3600.0, "retry-1h"),
        (2 * DAY_S - 1, "retry-8h"),
        (14 * DAY_S, "retry-14d"),
        (1000 * 365 * DAY_S, "retry-14d"),
        (-3.0, None),
    ],
)
def test_tier_for_examples(wait_s: float, expected: str | None) -> None:
    tier = DEFAULT.tier_for(wait_s)

    assert (tier.name if tier else None) == expected


@given(tier_lists, waits_s)
@example(["5s", "1m"], 60.0)
@example(["1m", "60s"], 59.0)
def test_tier_for_is_the_largest_tier_not_longer_than_the_wait(
    tiers: list[str], wait_s: float
) -> None:
    ladder = Ladder(tiers)
    delays = sorted({parse_delay_s(t) for t in tiers})

    tier = ladder.tier_for(wait_s)

    fitting = [d for d in delays if d <= wait_s]
    if not fitting:
        assert tier is None
        assert wait_s < ladder.smallest_s
        return
    assert tier is not None
    assert tier.delay_s <= wait_s
    assert tier.delay_s == max(fitting)
    assert ladder.delay_s(tier.name) == tier.delay_s


@given(waits_s, st.lists(st.floats(min_value=0, max_value=5), max_size=5))
def test_climbing_is_never_early_and_ends_below_the_smallest_tier(
    wait_s: float, lateness_s: list[float]
) -> None:
    hops, left_s = climb(DEFAULT, wait_s, lateness_s)

    # What is left is waited out by a timer: less than the smallest tier.
    assert left_s < DEFAULT.smallest_s
    if not lateness_s or max(lateness_s) == 0:
        assert left_s >= 0
    assert hops <= wait_s // (14 * DAY_S) + 43


@pytest.mark.parametrize(
    ("wait_s", "max_hops"),
    [(30 * DAY_S, 4), (365 * DAY_S, 30), (30 * DAY_S + 3599, 30)],
)
def test_long_waits_take_few_hops(wait_s: float, max_hops: int) -> None:
    hops, left_s = climb(DEFAULT, wait_s, [])

    assert 0 <= left_s < 5
    assert 1 <= hops <= max_hops


def test_thirty_days_exactly() -> None:
    hops, left_s = climb(DEFAULT, 30 * DAY_S, [])

    assert (hops, left_s) == (3, 0.0)  # 14d, 14d, 2d


def test_tiers_are_sorted_and_deduplicated() -> None:
    ladder = Ladder(["1h", "5s", "60s", "1m", "retry-10m"])

    assert ladder.tiers == [
        Tier("retry-5s", 5.0),
        Tier("retry-1m", 60.0),
        Tier("retry-10m", 600.0),
        Tier("retry-1h", 3600.0),
    ]


def test_delay_of_a_topic_tier() -> None:
    assert DEFAULT.delay_s(None) == 0.0
    assert DEFAULT.delay_s("dlq") == 0.0
    assert DEFAULT.delay_s("retry-1m") == 60.0
    # A tier taken out of the config still drains at its own delay.
    assert DEFAULT.delay_s("retry-7s") == 7.0


def test_an_empty_ladder_routes_nothing() -> None:
    assert Ladder([]).tier_for(365 * DAY_S) is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5s", 5.0),
        ("1m", 60.0),
        ("2h", 7200.0),
        ("14d", 14 * DAY_S),
        ("retry-5s", 5.0),
        ("05s", 5.0),
        ("99999d", 99999 * DAY_S),
    ],
)
def test_parse_delay(text: str, seconds: float) -> None:
    assert parse_delay_s(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        "5",
        "s",
        "0s",
        "0d",
        "5w",
        "-5s",
        "1.5h",
        " 5s",
        "5s ",
        "5S",
        "retry-",
        "retry-retry-5s",
        "٥s",
        # Would not leave the room validation keeps for a tier suffix.
        "100000d",
    ],
)
def test_parse_errors_name_the_tier_and_the_origin(text: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_delay_s(text, "config.yaml@prod")

    assert str(raised.value).startswith("config.yaml@prod: ")
    assert repr(text) in str(raised.value)


def test_a_ladder_refuses_a_bad_tier() -> None:
    with pytest.raises(ConfigError, match="'5w'"):
        Ladder(["5s", "5w"])
