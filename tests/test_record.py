"""The Kafka record format: headers <-> State, and the Task value."""

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskqueue.protobuf.service_pb2 import AT_MOST_ONCE, Task
from taskqueue.server.errors import BadRecord
from taskqueue.server.record import (
    MAX_COUNT,
    MAX_MESSAGE_CHARS,
    Headers,
    State,
    decode_task,
    encode_task,
    from_headers,
    read_headers,
    to_headers,
)

INT64 = st.integers(min_value=0, max_value=2**63 - 1)
# Text as it survives UTF-8 (no lone surrogates).
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=MAX_MESSAGE_CHARS)
states = st.builds(
    State,
    id=st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True),
    due_ms=INT64,
    added_ms=INT64,
    attempt=st.integers(min_value=0, max_value=1000),
    first_attempt_ms=st.none() | INT64,
    last_attempt_ms=st.none() | INT64,
    last_status=st.none() | st.sampled_from(["UNAVAILABLE", "INTERNAL"]),
    last_message=st.none() | text,
    origin=st.none() | st.from_regex(r"[a-z0-9._-]{1,60}/[0-9]{1,3}/[0-9]{1,9}"),
    reason=st.none() | text,
    replays=st.integers(min_value=0, max_value=100),
)


def size(headers: Headers) -> int:
    return sum(len(name) + len(value) for name, value in headers)


@given(states)
def test_headers_round_trip(state: State) -> None:
    headers = to_headers(state)

    assert from_headers(headers) == state
    names = [name for name, _ in headers]
    assert len(names) == len(set(names))
    assert all(name.startswith("tq-") for name in names)


def test_header_names_and_values() -> None:
    state = State(id="t1", due_ms=20, added_ms=10, last_status="UNAVAILABLE")

    assert to_headers(state) == [
        ("tq-id", b"t1"),
        ("tq-due-ms", b"20"),
        ("tq-added-ms", b"10"),
        ("tq-attempt", b"0"),
        ("tq-last-status", b"UNAVAILABLE"),
        ("tq-replays", b"0"),
    ]


def test_unknown_tq_headers_and_foreign_headers_are_ignored() -> None:
    state = State(id="t1", due_ms=20, added_ms=10, attempt=2)
    headers = [
        ("traceparent", b"00-abc-01"),
        *to_headers(state),
        ("tq-written-by-a-newer-version", b"whatever"),
        ("tq-", b"x"),
        ("TQ-ATTEMPT", b"not a number either"),
    ]

    assert from_headers(headers) == state


@pytest.mark.parametrize("value", [b"", b"two", b"1.5", b"0x10", b"\xff"])
@pytest.mark.parametrize("name", ["tq-attempt", "tq-due-ms", "tq-replays"])
def test_a_non_integer_header_is_a_bad_record(name: str, value: bytes) -> None:
    headers = [(n, v) for n, v in to_headers(State(id="t", due_ms=1, added_ms=1))]
    headers = [(n, value if n == name else v) for n, v in headers]

    with pytest.raises(BadRecord, match=f"header {name} is not an integer"):
        from_headers(headers)


def with_header(name: str, value: bytes) -> Headers:
    """A valid record's headers with one of them replaced (or added)."""
    headers = to_headers(State(id="t", due_ms=1, added_ms=1, attempt=2, replays=1))
    return [(n, v) for n, v in headers if n != name] + [(name, value)]


# What int() would take but the ASCII format does not: other scripts' digits,
# separators, spaces, signs and more characters than any int64 needs.
NOT_ASCII_DECIMAL = [
    "١٢٣".encode(),  # Arabic-Indic digits
    "１２".encode(),  # fullwidth digits
    "²".encode(),
    b"1_000",
    b" 2 ",
    b"2\n",
    b"+2",
    b"--2",
    b"-",
    b"1" * 21,
    str(10**30).encode(),
]


@pytest.mark.parametrize("value", NOT_ASCII_DECIMAL)
@pytest.mark.parametrize(
    "name",
    ["tq-due-ms", "tq-added-ms", "tq-last-attempt-ms", "tq-attempt", "tq-replays"],
)
def test_an_integer_not_in_ascii_decimal_is_a_bad_record(
    name: str, value: bytes
) -> None:
    with pytest.raises(BadRecord, match=f"header {name} is not an integer"):
        from_headers(with_header(name, value))


@pytest.mark.parametrize("value", [b"-5", b"-0", b"-1"])
@pytest.mark.parametrize("name", ["tq-attempt", "tq-replays"])
def test_a_count_with_a_sign_is_a_bad_record(name: str, value: bytes) -> None:
    with pytest.raises(BadRecord, match=f"header {name} is not an integer"):
        from_headers(with_header(name, value))


@pytest.mark.parametrize("value", [str(MAX_COUNT + 1).encode(), b"9" * 20])
@pytest.mark.parametrize("name", ["tq-attempt", "tq-replays"])
def test_a_count_above_its_bound_is_a_bad_record(name: str, value: bytes) -> None:
    with pytest.raises(BadRecord, match=f"header {name} must be an integer from 0"):
        from_headers(with_header(name, value))


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    [
        ("tq-due-ms", b"-9223372036854775808", "due_ms", -(2**63)),
        ("tq-added-ms", b"-62135596800000", "added_ms", -62_135_596_800_000),
        ("tq-due-ms", b"99999999999999999999", "due_ms", 10**20 - 1),
        ("tq-attempt", str(MAX_COUNT).encode(), "attempt", MAX_COUNT),
        ("tq-replays", b"0", "replays", 0),
        ("tq-id", b"x" * 128, "id", "x" * 128),
        ("tq-id", b"Az09._:-", "id", "Az09._:-"),
    ],
)
def test_the_extremes_of_each_form_are_read(
    name: str, value: bytes, field: str, expected: object
) -> None:
    assert getattr(from_headers(with_header(name, value)), field) == expected


@pytest.mark.parametrize(
    "value", [b"", b"x" * 129, b"a b", b"a/b", b"t\n", "é".encode(), b"\xff"]
)
def test_a_task_id_add_would_refuse_is_a_bad_record(value: bytes) -> None:
    with pytest.raises(BadRecord, match="header tq-id must be 1-128 of"):
        from_headers(with_header("tq-id", value))


def test_a_null_task_id_is_a_bad_record() -> None:
    state = State(id="t", due_ms=1, added_ms=1)
    raw: list[tuple[str, bytes | None]] = [("tq-id", None)]
    raw += [(n, v) for n, v in to_headers(state) if n != "tq-id"]

    with pytest.raises(BadRecord, match="header tq-id must be 1-128 of"):
        from_headers(read_headers(raw))


@pytest.mark.parametrize("missing", ["tq-id", "tq-due-ms", "tq-added-ms"])
def test_a_missing_required_header_is_a_bad_record(missing: str) -> None:
    headers = to_headers(State(id="t", due_ms=1, added_ms=1))

    with pytest.raises(BadRecord, match=f"header {missing} is missing"):
        from_headers([(n, v) for n, v in headers if n != missing])


def test_no_headers_at_all_is_a_bad_record() -> None:
    with pytest.raises(BadRecord):
        from_headers([])


@pytest.mark.parametrize("field", ["last_message", "reason"])
def test_messages_are_capped(field: str) -> None:
    long = "é" * (MAX_MESSAGE_CHARS * 3)
    state = msgspec.structs.replace(
        State(id="t", due_ms=1, added_ms=1), **{field: long}
    )

    headers = dict(to_headers(state))
    decoded = getattr(from_headers(list(headers.items())), field)

    assert decoded == "é" * MAX_MESSAGE_CHARS
    assert len(headers["tq-" + field.replace("_", "-")]) == 2 * MAX_MESSAGE_CHARS


def test_re_encoding_a_state_many_times_does_not_grow_it() -> None:
    state = State(id="t", due_ms=1, added_ms=1, last_message="x" * 5000)
    first = to_headers(state)

    headers = first
    for _ in range(200):
        headers = to_headers(from_headers(headers))

    assert headers == first


def test_size_stays_bounded_over_many_hops() -> None:
    # Each hop writes a fresh set of headers; even a target whose error message
    # quotes the previous one cannot make a record grow without bound.
    state = State(id="t" * 128, due_ms=1, added_ms=1, origin="t" * 249 + "/99/1")
    sizes = []
    for hop in range(1, 501):
        previous = state.last_message or ""
        state = msgspec.structs.replace(
            from_headers(to_headers(state)),
            attempt=hop,
            due_ms=state.due_ms + 60_000,
            last_attempt_ms=state.due_ms,
            last_status="UNAVAILABLE",
            last_message=f"attempt {hop} failed after: {previous}",
            reason=f"gave up: {previous}",
            replays=hop // 10,
        )
        sizes.append(size(to_headers(state)))

    # Two capped messages, the id, the origin and a few numbers.
    assert max(sizes) <= 2 * MAX_MESSAGE_CHARS + 128 + 255 + 250
    # Once the messages hit the cap only the numbers' digits change.
    assert max(sizes[100:]) - min(sizes[100:]) < 8


def test_task_value_round_trip() -> None:
    task = Task(
        authority="cafe:50051",
        method="/coffeemachine.CoffeeMachine/make_latte",
        queue="orders",
        delivery=AT_MOST_ONCE,
        metadata={"b": "2", "a": "1"},
        id="t1",
    )
    task.eta.FromMilliseconds(1_700_000_000_123)

    value = encode_task(task)

    assert decode_task(value) == task
    assert encode_task(decode_task(value)) == value


@pytest.mark.parametrize("value", [None, b"\xff\xff\xff", b"\x0a\x05ab"])
def test_an_undecodable_value_is_a_bad_record(value: bytes | None) -> None:
    with pytest.raises(BadRecord):
        decode_task(value)
