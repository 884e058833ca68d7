"""Fetched batches with a header name that is not UTF-8 (kafka_batches.py).

Batches are built with aiokafka's own pure-Python builder: it encodes a header
name with ``name.encode("utf-8")``, which :class:`RawName` answers with any
bytes, so a batch gets the name another client could have written.
"""

import inspect
import logging
import struct
from typing import Any

import pytest
from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import (
    _DefaultRecordBatchBuilderPy,
    _DefaultRecordBatchPy,
)
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c

from taskqueue.server import kafka_batches
from taskqueue.server.errors import UnreadableBatch
from taskqueue.server.kafka_batches import (
    LenientBatch,
    LenientMemoryRecords,
    read_batch,
)

BAD_NAME = b"\xff\xfe-bad"
SHOWN_AS = "\\xff\\xfe-bad"
GZIP = 1
ATTRIBUTES_AT, CRC_AT, MAX_TIMESTAMP_AT = 21, 17, 35

Headers = list[tuple[str, bytes | None]]
Record = tuple[bytes | None, bytes | None, Headers]


class RawName(str):
    """A header name that aiokafka's Python builder writes as ``raw``."""

    raw: bytes

    def __new__(cls, raw: bytes) -> "RawName":
        name = super().__new__(cls, raw.decode("latin-1"))
        name.raw = raw
        return name

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


def build(
    records: list[Record], *, base_offset: int = 0, compression: int = 0
) -> bytes:
    """A v2 batch as a broker hands it out, records 1 ms apart from 1000."""
    builder = _DefaultRecordBatchBuilderPy(2, compression, 0, -1, -1, 0, 1 << 20)
    for delta, (key, value, headers) in enumerate(records):
        builder.append(delta, 1000 + delta, key, value, headers)
    raw = bytearray(builder.build())
    struct.pack_into(">q", raw, 0, base_offset)  # the CRC does not cover it
    return bytes(raw)


def stamped(raw: bytes, append_ms: int) -> bytes:
    """The batch as a LogAppendTime topic stores it (the broker's rewrite)."""
    out = bytearray(raw)
    (attributes,) = struct.unpack_from(">h", out, ATTRIBUTES_AT)
    struct.pack_into(">h", out, ATTRIBUTES_AT, attributes | 0x08)
    struct.pack_into(">q", out, MAX_TIMESTAMP_AT, append_ms)
    struct.pack_into(">I", out, CRC_AT, calc_crc32c(bytes(out[ATTRIBUTES_AT:])))
    return bytes(out)


def plain(value: bytes) -> Record:
    return b"key", value, [("tq-id", value)]


def odd(value: bytes) -> Record:
    return b"key", value, [("tq-id", value), (RawName(BAD_NAME), b"x")]


def fetch(data: bytes) -> list[Any]:
    """Every record of a fetch, taken the way aiokafka's fetcher takes them."""
    records = LenientMemoryRecords(data)
    taken = []
    while records.has_next():
        batch = records.next_batch()
        assert batch.validate_crc()
        taken.extend(batch)
    return taken


def fields(record: Any) -> tuple[object, ...]:
    return (
        record.offset,
        record.timestamp,
        record.timestamp_type,
        record.key,
        record.value,
        list(record.headers),
        record.checksum,
    )


@pytest.mark.parametrize("log_append_time", [False, True])
def test_a_valid_batch_reads_as_aiokafka_reads_it(log_append_time: bool) -> None:
    raw = build(
        [
            (b"k", b"v", [("tq-id", b"a"), ("empty", None)]),
            (None, None, []),
            (b"", b"x" * 300, [("tq-due-ms", b"12")]),
        ],
        base_offset=70,
    )
    if log_append_time:
        raw = stamped(raw, 9999)

    ours = read_batch(raw)
    theirs = list(MemoryRecords(raw).next_batch())

    assert [fields(r) for r in ours] == [fields(r) for r in theirs]
    assert [r.offset for r in ours] == [70, 71, 72]
    if log_append_time:
        assert {r.timestamp for r in ours} == {9999}


@pytest.mark.parametrize("compression", [0, GZIP])
def test_every_record_of_a_fetch_is_read_once_around_a_bad_name(
    compression: int,
) -> None:
    data = b"".join(
        [
            build([plain(b"a")], base_offset=0),
            build(
                [plain(b"b"), odd(b"c"), plain(b"d")],
                base_offset=1,
                compression=compression,
            ),
            build([plain(b"e")], base_offset=4),
            build([plain(b"f")], base_offset=5)[:-5],  # cut off by the fetch size
        ]
    )

    taken = fetch(data)

    assert [(r.offset, r.value) for r in taken] == [
        (0, b"a"),
        (1, b"b"),
        (2, b"c"),
        (3, b"d"),
        (4, b"e"),
    ]
    assert taken[2].headers == [("tq-id", b"c"), (SHOWN_AS, b"x")]
    assert taken[2].timestamp == 1001
    assert taken[3].headers == [("tq-id", b"d")]


def test_a_bad_name_in_the_first_record_is_read_too() -> None:
    raw = stamped(build([odd(b"a"), plain(b"b")], base_offset=8), 4242)

    taken = fetch(raw)

    assert [(r.offset, r.timestamp, r.timestamp_type) for r in taken] == [
        (8, 4242, 1),
        (9, 4242, 1),
    ]
    assert taken[0].headers[1] == (SHOWN_AS, b"x")


def test_the_pure_python_parser_failing_on_the_name_is_handled_too() -> None:
    raw = build([plain(b"a"), odd(b"b"), plain(b"c")])

    batch = LenientBatch(_DefaultRecordBatchPy(raw), memoryview(raw))

    assert [r.value for r in batch] == [b"a", b"b", b"c"]


def test_a_malformed_batch_still_fails_as_a_corrupt_batch() -> None:
    raw = build([plain(b"a"), odd(b"b")])

    with pytest.raises(UnreadableBatch) as caught:
        read_batch(raw[:-3])

    assert isinstance(caught.value, CorruptRecordException)


def test_other_failures_of_aiokafka_pass_through_untouched() -> None:
    class Broken:
        base_offset = 0

        def __iter__(self) -> "Broken":
            return self

        def __next__(self) -> object:
            raise CorruptRecordException("bad CRC")

    raw = build([plain(b"a")])

    with pytest.raises(CorruptRecordException, match="bad CRC"):
        list(LenientBatch(Broken(), memoryview(raw)))


def test_aiokafka_still_works_the_way_the_module_assumes() -> None:
    """Fails when an aiokafka upgrade moves what kafka_batches hooks into."""
    fetch_source = inspect.getsource(fetcher.Fetcher._proc_fetch_request)
    raw = build([odd(b"a")])
    batch = MemoryRecords(raw).next_batch()

    # Installed when taskqueue.server was imported, used for each fetch.
    assert fetcher.MemoryRecords is LenientMemoryRecords
    assert "MemoryRecords(part_data[-1])" in fetch_source
    # Still strict: once aiokafka reads such names, kafka_batches can go.
    with pytest.raises((UnicodeDecodeError, CorruptRecordException)) as caught:
        list(batch)
    assert kafka_batches.is_header_name_error(caught.value)


def test_install_leaves_a_reader_it_does_not_know_alone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Unknown:
        pass

    monkeypatch.setattr(fetcher, "MemoryRecords", Unknown)

    with caplog.at_level(logging.WARNING, logger=kafka_batches.__name__):
        kafka_batches.install()

    assert fetcher.MemoryRecords is Unknown
    assert "no longer reads batches" in caplog.text
