"""Reading fetched Kafka batches whose header names are not valid UTF-8.

Kafka lets a record header's name be any bytes, and other clients (librdkafka,
Java) can write such a name. aiokafka decodes header names as strict UTF-8
while it parses a fetched batch, so one such record makes ``getmany`` raise,
in the middle of a fetch: the consumer (a worker, ``taskqueue dlq``,
``taskqueue queues``) stops, and on the next ``getmany`` aiokafka has already
moved its position past the records it parsed before the bad one without
handing them out.

:func:`install` makes every consumer of the process read such a record like
any other: aiokafka parses each batch as usual (its fast C parser), and only
when that fails on a header name is the rest of that batch parsed again here,
with the name decoded with ``errors="backslashreplace"``. That keeps the
invalid bytes visible to an operator (``\\xff``); the name stays valid UTF-8,
so it can be logged, shown as JSON and written back to Kafka (a dead letter
copies a record's other headers; ``surrogateescape`` would keep the bytes
exactly but make that write fail); and it always holds a backslash, so it is
never mistaken for one of our ``tq-`` names.

This leans on aiokafka internals, as they are in aiokafka 0.14:

- ``aiokafka.consumer.fetcher`` builds ``MemoryRecords(raw_bytes)`` for each
  fetched partition through that module's global name, which
  :func:`install` replaces;
- the fetcher uses ``has_next``, ``next_batch`` and ``size_in_bytes`` of it,
  and of each batch ``validate_crc``, its offsets and flags, iteration and
  ``next`` (the abort marker of a control batch);
- a batch starts with its base offset (int64) and length (int32), so it spans
  12 + length bytes, and its magic byte is at offset 16 (the v2 format has 2);
- the failure is a ``UnicodeDecodeError`` from the C parser, or a
  ``CorruptRecordException`` caused by one from the pure-Python parser.

``tests/test_kafka_batches.py`` and ``tests/test_header_names_kafka.py`` pin
these: should aiokafka change, they fail. :func:`install` itself leaves
aiokafka alone (and logs a warning) rather than replace a name it does not
recognise.
"""

import logging
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from aiokafka.codec import gzip_decode, lz4_decode, snappy_decode, zstd_decode
from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record.memory_records import MemoryRecords

from taskqueue.server.errors import UnreadableBatch

log = logging.getLogger(__name__)

HEADER_NAME_ERRORS: Final = "backslashreplace"

LENGTH_OFFSET: Final = 8  # after the base offset (int64)
LOG_OVERHEAD: Final = 12  # base offset and length: the bytes length leaves out
MAGIC_OFFSET: Final = 16  # after the length and the partition leader epoch
V2: Final = 2

# The v2 batch header, up to and including the record count.
BATCH_HEADER: Final = struct.Struct(">qiibIhiqqqhii")
CODEC_MASK: Final = 0x07
LOG_APPEND_TIME_FLAG: Final = 0x08
CREATE_TIME, LOG_APPEND_TIME = 0, 1

_DECOMPRESS: Final[dict[int, Callable[[bytes], bytes]]] = {
    1: gzip_decode,
    2: snappy_decode,
    3: lz4_decode,
    4: zstd_decode,
}


@dataclass(frozen=True, slots=True)
class LenientRecord:
    """One record of a v2 batch, as aiokafka's fetcher reads a record."""

    offset: int
    timestamp: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]

    @property
    def checksum(self) -> None:
        return None  # v2 records have none of their own: the batch has a CRC


@dataclass(frozen=True, slots=True)
class _BatchHeader:
    base_offset: int
    attributes: int
    first_timestamp: int
    max_timestamp: int
    count: int

    @property
    def timestamp_type(self) -> int:
        if self.attributes & LOG_APPEND_TIME_FLAG:
            return LOG_APPEND_TIME
        return CREATE_TIME

    def timestamp(self, delta: int) -> int:
        if self.timestamp_type == LOG_APPEND_TIME:
            return self.max_timestamp
        return self.first_timestamp + delta


class _Reader:
    """A cursor over a record section; running past its end is a ValueError."""

    __slots__ = ("_data", "pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.pos = 0

    @property
    def at_end(self) -> bool:
        return self.pos == len(self._data)

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if size < 0 or end > len(self._data):
            raise ValueError(f"{size} bytes wanted at {self.pos}, past the end")
        chunk = self._data[self.pos : end]
        self.pos = end
        return chunk

    def varint(self) -> int:
        """A zig-zag varint, as the v2 record format writes its numbers."""
        value, shift = 0, 0
        while True:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return (value >> 1) ^ -(value & 1)
            shift += 7
            if shift > 63:
                raise ValueError(f"varint longer than 10 bytes at {self.pos}")

    def nullable_bytes(self) -> bytes | None:
        size = self.varint()
        return None if size < 0 else self.take(size)


def read_batch(raw: bytes) -> list[LenientRecord]:
    """The records of one v2 batch, header names decoded leniently.

    Raises :class:`UnreadableBatch` when the batch is malformed.
    """
    try:
        header = _read_header(raw)
        reader = _Reader(_records_section(raw, header.attributes))
        records = [_read_record(reader, header) for _ in range(header.count)]
    except (ValueError, IndexError, struct.error) as exc:
        raise UnreadableBatch(f"cannot read record batch: {exc}") from exc
    if not reader.at_end:
        raise UnreadableBatch("bytes left over after the batch's last record")
    return records


def _read_header(raw: bytes) -> _BatchHeader:
    fields = BATCH_HEADER.unpack_from(raw)
    if fields[3] != V2:
        raise ValueError(f"record batch of magic {fields[3]}, not {V2}")
    return _BatchHeader(
        base_offset=fields[0],
        attributes=fields[5],
        first_timestamp=fields[7],
        max_timestamp=fields[8],
        count=fields[12],
    )


def _records_section(raw: bytes, attributes: int) -> bytes:
    """The records, decompressed with the codec aiokafka uses for them."""
    section = raw[BATCH_HEADER.size :]
    codec = attributes & CODEC_MASK
    if not codec:
        return section
    decompress = _DECOMPRESS.get(codec)
    if decompress is None:
        raise ValueError(f"unknown compression codec {codec}")
    return decompress(section)


def _read_record(reader: _Reader, header: _BatchHeader) -> LenientRecord:
    length = reader.varint()
    start = reader.pos
    reader.take(1)  # the record's attributes: none are defined yet
    timestamp_delta = reader.varint()
    offset_delta = reader.varint()
    key = reader.nullable_bytes()
    value = reader.nullable_bytes()
    headers = _read_headers(reader)
    if reader.pos - start != length:
        raise ValueError(f"record of {reader.pos - start} bytes, said {length}")
    return LenientRecord(
        offset=header.base_offset + offset_delta,
        timestamp=header.timestamp(timestamp_delta),
        timestamp_type=header.timestamp_type,
        key=key,
        value=value,
        headers=headers,
    )


def _read_headers(reader: _Reader) -> list[tuple[str, bytes | None]]:
    count = reader.varint()
    if count < 0:
        raise ValueError(f"negative header count {count}")
    headers = []
    for _ in range(count):
        name_size = reader.varint()
        if name_size < 0:
            raise ValueError(f"negative header name size {name_size}")
        name = reader.take(name_size).decode("utf-8", HEADER_NAME_ERRORS)
        headers.append((name, reader.nullable_bytes()))
    return headers


def is_header_name_error(exc: BaseException) -> bool:
    """Whether aiokafka failed on a name that is not UTF-8, not on bad data."""
    if isinstance(exc, CorruptRecordException):
        exc = exc.__cause__ or exc  # the pure-Python parser wraps the error
    return isinstance(exc, UnicodeDecodeError)


class LenientBatch:
    """A v2 batch aiokafka parsed, parsed here again only if a name is bad."""

    __slots__ = ("_batch", "_raw")

    def __init__(self, batch: Any, raw: memoryview) -> None:
        self._batch = batch
        self._raw = raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)

    def __iter__(self) -> Iterator[Any]:
        return self._records()

    def __next__(self) -> Any:
        return next(self._batch)

    def _records(self) -> Iterator[Any]:
        # One generator level over aiokafka's iterator: this is every record's
        # path, so it must stay this thin.
        done = 0
        try:
            for record in self._batch:
                yield record
                done += 1
        except (UnicodeDecodeError, CorruptRecordException) as exc:
            if not is_header_name_error(exc):
                raise
            # aiokafka's iterator cannot go past the record it failed on.
            log.debug(
                "record batch at offset %d holds a header name that is not "
                "UTF-8; reading it leniently from record %d",
                self._batch.base_offset,
                done,
            )
            yield from read_batch(bytes(self._raw))[done:]


class LenientMemoryRecords:
    """aiokafka's ``MemoryRecords`` of one fetch, handing out lenient batches.

    It walks the fetched bytes in step with aiokafka's object to know which
    bytes make each batch, and wraps v2 batches only; older formats are
    handed out untouched (their parser reads no header names).
    """

    __slots__ = ("_data", "_pos", "_records")

    def __init__(self, data: bytes) -> None:
        self._records = MemoryRecords(data)
        self._data = memoryview(data)
        self._pos = 0

    def size_in_bytes(self) -> int:
        return int(self._records.size_in_bytes())

    def has_next(self) -> bool:
        return bool(self._records.has_next())

    def next_batch(self) -> Any:
        batch = self._records.next_batch()
        if batch is None:
            return None
        start = self._pos
        length = int.from_bytes(
            self._data[start + LENGTH_OFFSET : start + LOG_OVERHEAD], "big", signed=True
        )
        self._pos = start + LOG_OVERHEAD + length
        if self._data[start + MAGIC_OFFSET] < V2:
            return batch
        return LenientBatch(batch, self._data[start : self._pos])


def install() -> None:
    """Make every aiokafka consumer of this process read batches leniently."""
    current = getattr(fetcher, "MemoryRecords", None)
    if current is LenientMemoryRecords:
        return
    if current is not MemoryRecords:
        log.warning(
            "aiokafka's fetcher no longer reads batches where taskqueue expects; "
            "a record whose header name is not UTF-8 will stop a consumer"
        )
        return
    fetcher.MemoryRecords = LenientMemoryRecords
