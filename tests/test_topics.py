"""Topic names: one name per (authority, queue, tier), always legal for Kafka."""

import ipaddress
import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from taskqueue.server.config import TopicsConfig
from taskqueue.server.errors import InvalidTask
from taskqueue.server.topics import (
    DLQ,
    MAX_TOPIC_LENGTH,
    QUEUE_RE,
    Topics,
    base_of,
    is_reserved_queue,
    tier_of,
)
from taskqueue.server.validation import check_authority, check_queue

KAFKA_LEGAL = re.compile(r"[A-Za-z0-9._-]+")
DEFAULT_TIERS = [f"retry-{t}" for t in TopicsConfig().tiers]
# The longest tier name the delay ladder accepts.
LONGEST_TIER = "retry-99999d"
TOPICS = Topics()

# Canonical form of an authority: what the encoding must tell apart.
Host = str | ipaddress.IPv4Address | ipaddress.IPv6Address
Key = tuple[Host, int, str, str | None]

label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
# A dotted quad is an IPv4 address, drawn as such below.
dns_name = (
    st.lists(label, min_size=1, max_size=5)
    .map(".".join)
    .filter(lambda name: not re.fullmatch(r"[0-9]+(\.[0-9]+){3}", name))
)
ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
host = st.one_of(dns_name, ipv4, ipv6)
port = st.integers(min_value=1, max_value=65535)
queue = st.from_regex(QUEUE_RE, fullmatch=True).filter(
    lambda q: not is_reserved_queue(q)
)
tier = st.one_of(st.none(), st.sampled_from([*DEFAULT_TIERS, LONGEST_TIER, DLQ]))
key = st.tuples(host, port, queue, tier)


def authority_of(host: Host, port: int, exploded: bool = False) -> str:
    if isinstance(host, ipaddress.IPv6Address):
        return f"[{host.exploded if exploded else host.compressed}]:{port}"
    return f"{host}:{port}"


def topic_of(key: Key, exploded: bool = False) -> str:
    host, port, queue, tier = key
    authority = authority_of(host, port, exploded)
    if tier is None:
        return TOPICS.main(authority, queue)
    return TOPICS.tier(authority, queue, tier)


def decode(topic: str) -> Key:
    """Read a topic name back, following only the rules the docstring states."""
    prefix, _, rest = topic.partition(".")
    assert prefix == "taskqueue"
    last = rest.rpartition(".")[2]
    tier = last if last == DLQ or re.fullmatch(r"retry-[0-9]+[smhd]", last) else None
    if tier is not None:
        rest = rest.rpartition(".")[0]
    rest, _, queue = rest.rpartition(".")
    host_text, _, port = rest.rpartition(".")
    host: Host
    if host_text.startswith("_ip6_"):
        host = ipaddress.IPv6Address(host_text.removeprefix("_ip6_").replace("_", ":"))
    elif re.fullmatch(r"[0-9]+(\.[0-9]+){3}", host_text):
        host = ipaddress.IPv4Address(host_text)
    else:
        host = host_text
    return host, int(port), queue, tier


def test_promised_example() -> None:
    assert (
        TOPICS.main("greeter.srv.prod:50051", "default")
        == "taskqueue.greeter.srv.prod.50051.default"
    )
    assert (
        TOPICS.tier("greeter.srv.prod:50051", "default", "retry-5s")
        == "taskqueue.greeter.srv.prod.50051.default.retry-5s"
    )
    assert (
        TOPICS.dlq("greeter.srv.prod:50051", "default")
        == "taskqueue.greeter.srv.prod.50051.default.dlq"
    )


def test_ipv6_has_one_name_whatever_its_spelling() -> None:
    names = {
        TOPICS.main(authority, "q")
        for authority in ("[::1]:80", "[0:0:0:0:0:0:0:1]:80", "[0000::0001]:80")
    }
    assert names == {"taskqueue._ip6_0000_0000_0000_0000_0000_0000_0000_0001.80.q"}


@given(key)
@example(("h.80", 1, "q", None))
@example(("h", 80, "1_q", None))
@example((ipaddress.IPv4Address("1.2.3.4"), 5, "q", "dlq"))
@example(("1.2.3", 4, "q", "retry-5s"))
def test_a_topic_name_reads_back_as_what_made_it(key: Key) -> None:
    # A left inverse exists, so no two keys share a name.
    assert decode(topic_of(key)) == key
    assert topic_of(key, exploded=True) == topic_of(key)


@given(st.lists(key, min_size=2, max_size=30, unique=True))
def test_distinct_keys_give_distinct_names(keys: list[Key]) -> None:
    names = [topic_of(k) for k in keys]

    assert len(set(names)) == len(names)


@given(key)
def test_patterns_tell_main_tier_and_dead_letter_topics_apart(key: Key) -> None:
    topic = topic_of(key)
    tier = key[3]

    is_main = re.match(TOPICS.main_pattern(), topic) is not None
    is_tier = re.match(TOPICS.tier_pattern(), topic) is not None
    is_dlq = re.match(TOPICS.dlq_pattern(), topic) is not None

    assert is_main == (tier is None)
    assert is_tier == (tier is not None and tier != DLQ)
    assert is_dlq == (tier == DLQ)
    assert tier_of(topic) == tier
    assert base_of(topic) == topic_of((*key[:3], None))


@pytest.mark.parametrize(
    "topic",
    [
        "other.greeter.50051.default",
        "taskqueue2.greeter.50051.default",
        "taskqueue",
        "taskqueue.",
        "xtaskqueue.greeter.50051.default.retry-5s",
    ],
)
def test_patterns_ignore_other_prefixes(topic: str) -> None:
    for pattern in (TOPICS.main_pattern(), TOPICS.tier_pattern()):
        assert re.match(pattern, topic) is None


def test_patterns_follow_the_prefix() -> None:
    topics = Topics("tq-staging")
    main = topics.main("a:1", "q")

    assert main == "tq-staging.a.1.q"
    assert re.match(topics.main_pattern(), main)
    assert not re.match(TOPICS.main_pattern(), main)
    assert re.match(topics.tier_pattern(), topics.tier("a:1", "q", "retry-1m"))
    assert not re.match(topics.tier_pattern(), topics.dlq("a:1", "q"))


# Authorities as a caller may send them: valid ones, near misses and junk.
port_text = st.one_of(
    port.map(str),
    st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=5),
)
host_text = st.one_of(
    dns_name,
    st.from_regex(r"[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63}){0,5}\.?", fullmatch=True),
    ipv4.map(str),
    ipv6.map(lambda a: f"[{a}]"),
    st.tuples(ipv6, st.text(min_size=1, max_size=8)).map(lambda a: f"[{a[0]}%{a[1]}]"),
    st.text(max_size=40),
)
any_authority = st.one_of(
    st.tuples(host_text, port_text).map(":".join),
    st.text(max_size=60),
)


@given(any_authority, st.one_of(queue, st.text(max_size=70)))
@example("[fe80::1%eth0]:80", "default")
@example("cafe:٨٠", "default")
@example("cafe:²", "default")
@example("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + ":65535", "q" * 64)
def test_names_of_accepted_tasks_are_legal_kafka_topics(
    authority: str, queue: str
) -> None:
    try:
        check_authority(authority)
        check_queue(queue, len(TOPICS.main(authority, queue)))
    except InvalidTask:
        return

    names = [TOPICS.main(authority, queue), TOPICS.dlq(authority, queue)]
    names += [TOPICS.tier(authority, queue, t) for t in [*DEFAULT_TIERS, LONGEST_TIER]]
    for name in names:
        assert KAFKA_LEGAL.fullmatch(name), name
        assert len(name) <= MAX_TOPIC_LENGTH, name


def test_validation_refuses_a_topic_name_that_would_be_too_long() -> None:
    authority = "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + ":65535"
    queue = "q" * 64

    with pytest.raises(InvalidTask, match="longer than 249"):
        check_queue(queue, len(TOPICS.main(authority, queue)))


@pytest.mark.parametrize("queue", ["dlq", "retry-5s", "retry-14d", "a.b", "", "ü"])
def test_queue_names_that_would_confuse_the_tier_suffix_are_refused(
    queue: str,
) -> None:
    with pytest.raises(InvalidTask, match="queue"):
        check_queue(queue, 20)


def kafka_collision_form(topic: str) -> str:
    """What Kafka compares names by: '.' and '_' are the same to it."""
    return topic.replace(".", "_")


@given(st.lists(key, min_size=2, max_size=30, unique=True))
@example([("h", 80, "1-q", None), ("h.80", 1, "q", None)])
@example([("h", 80, "q-retry-5s", None), ("h", 80, "q", "retry-5s")])
@example([(ipaddress.IPv6Address("::1"), 80, "q", None), ("ip6.0000", 1, "q", None)])
def test_no_two_names_collide_for_kafka(keys: list[Key]) -> None:
    names = [topic_of(k) for k in keys] + [TOPICS.replayed()]

    assert len({kafka_collision_form(n) for n in names}) == len(names)


def test_the_collision_underscores_made_is_refused() -> None:
    # Authority h:80 with queue 1_q, and h.80:1 with queue q.
    first, second = TOPICS.main("h:80", "1_q"), TOPICS.main("h.80:1", "q")
    assert first != second
    assert kafka_collision_form(first) == kafka_collision_form(second)

    with pytest.raises(InvalidTask, match="queue"):
        check_queue("1_q", len(first))
    check_queue("q", len(second))


@given(queue)
def test_accepted_queue_names_have_no_underscore_or_dot(name: str) -> None:
    check_queue(name, 20)

    assert "_" not in name
    assert "." not in name
