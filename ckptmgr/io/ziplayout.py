"""The byte layout of a stored (uncompressed) zip, fixed before any data exists.

A ``.keras`` archive is a zip of stored members. Knowing every member's name
and size is enough to place every byte: local headers, data, data
descriptors, the central directory. Only the CRC32 values are unknown until
the data has streamed, and they sit in fixed-width fields written *after* the
data (data descriptors, central directory). That is what lets the archive be
streamed in one pass and, later, written by several writers at once: each
knows its byte range in advance, and CRC32s of ranges combine
(``crc32_combine``) into the member's CRC.

The records follow APPNOTE 6.3 as Python's ``zipfile`` writes them for a
non-seekable stream (general purpose flag bit 3 for members streamed with a
data descriptor; ZIP64 extra fields and end records when sizes or offsets
pass 2 GiB), so ``zipfile`` and stock Keras read the result.
"""

from __future__ import annotations

import datetime
import struct
from dataclasses import dataclass

_ZIP64_LIMIT = (1 << 31) - 1  # what zipfile uses: beyond it, ZIP64 records
_LOCAL = struct.Struct("<4s2B4HL2L2H")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_END = struct.Struct("<4s4H2LH")
_END64 = struct.Struct("<4sQ2H2L4Q")
_END64_LOCATOR = struct.Struct("<4sLQL")
_DESCRIPTOR = struct.Struct("<4sLLL")
_DESCRIPTOR64 = struct.Struct("<4sLQQ")
_STREAMED = 0x08  # flag bit 3: CRC and sizes follow the data
_UTF8 = 0x800
_EXTERNAL_ATTR = 0o644 << 16


@dataclass(frozen=True)
class Member:
    """One stored member: its name, size and, if known before writing, CRC32."""

    name: str
    size: int
    crc: int | None = None  # None: streamed, CRC in a data descriptor after the data

    @property
    def streamed(self) -> bool:
        return self.crc is None

    @property
    def zip64(self) -> bool:
        return self.size > _ZIP64_LIMIT


@dataclass(frozen=True)
class Placed:
    """Where one member's records and data lie in the archive."""

    member: Member
    header_offset: int
    header: bytes  # the local header, name and extra field
    data_offset: int
    descriptor_offset: int  # == data end; the descriptor (if any) starts here

    @property
    def data_end(self) -> int:
        return self.data_offset + self.member.size


class ZipLayout:
    """Every record's offset, from names and sizes alone."""

    def __init__(self, members: list[Member], when: datetime.datetime | None = None):
        self.members = members
        self._dos_time, self._dos_date = _dos_time_date(when or datetime.datetime.now())
        self.placed: list[Placed] = []
        offset = 0
        for member in members:
            header = self._local_header(member)
            data_offset = offset + len(header)
            self.placed.append(Placed(member, offset, header, data_offset, data_offset + member.size))
            offset = data_offset + member.size + self._descriptor_size(member)
        self.central_offset = offset

    def member(self, name: str) -> Placed:
        for placed in self.placed:
            if placed.member.name == name:
                return placed
        raise KeyError(name)

    # -- records -------------------------------------------------------------
    def _local_header(self, member: Member) -> bytes:
        name, flags = _name_and_flags(member)
        if member.zip64:
            extra = struct.pack("<HHQQ", 1, 16, 0 if member.streamed else member.size,
                                0 if member.streamed else member.size)
            size32 = 0xFFFFFFFF
        else:
            extra, size32 = b"", 0 if member.streamed else member.size
        crc = 0 if member.streamed else member.crc
        return _LOCAL.pack(
            b"PK\x03\x04", 45 if member.zip64 else 20, 0, flags, 0,
            self._dos_time, self._dos_date, crc, size32, size32, len(name), len(extra),
        ) + name + extra

    @staticmethod
    def _descriptor_size(member: Member) -> int:
        if not member.streamed:
            return 0
        return (_DESCRIPTOR64 if member.zip64 else _DESCRIPTOR).size

    def descriptor(self, name: str, crc: int) -> bytes:
        """The data descriptor that follows a streamed member's data."""
        member = self.member(name).member
        if member.zip64:
            return _DESCRIPTOR64.pack(b"PK\x07\x08", crc, member.size, member.size)
        return _DESCRIPTOR.pack(b"PK\x07\x08", crc, member.size, member.size)

    def central_directory(self, crcs: dict[str, int]) -> bytes:
        """Central directory and end records; ``crcs`` has every streamed member's CRC."""
        records = [self._central_record(p, crcs.get(p.member.name, p.member.crc)) for p in self.placed]
        body = b"".join(records)
        return body + self._end_records(len(records), len(body))

    def _central_record(self, placed: Placed, crc: int | None) -> bytes:
        member = placed.member
        if crc is None:
            raise ValueError(f"no CRC32 for streamed member {member.name!r}")
        name, flags = _name_and_flags(member)
        values = []
        size32 = member.size
        offset32 = placed.header_offset
        if member.zip64:
            values += [member.size, member.size]
            size32 = 0xFFFFFFFF
        if placed.header_offset > _ZIP64_LIMIT:
            values.append(placed.header_offset)
            offset32 = 0xFFFFFFFF
        extra = struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""
        version = 45 if values else 20
        return _CENTRAL.pack(
            b"PK\x01\x02", version, 3, version, 0, flags, 0, self._dos_time, self._dos_date,
            crc, size32, size32, len(name), len(extra), 0, 0, 0, _EXTERNAL_ATTR, offset32,
        ) + name + extra

    def _end_records(self, count: int, size: int) -> bytes:
        offset = self.central_offset
        if offset > _ZIP64_LIMIT or size > _ZIP64_LIMIT or count > 0xFFFF:
            end64_offset = offset + size
            zip64 = _END64.pack(b"PK\x06\x06", _END64.size - 12, 45, 45, 0, 0, count, count, size, offset)
            locator = _END64_LOCATOR.pack(b"PK\x06\x07", 0, end64_offset, 1)
            return zip64 + locator + _END.pack(
                b"PK\x05\x06", 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                min(size, 0xFFFFFFFF), min(offset, 0xFFFFFFFF), 0)
        return _END.pack(b"PK\x05\x06", 0, 0, count, count, size, offset, 0)


def _name_and_flags(member: Member) -> tuple[bytes, int]:
    """Encoded name and flag bits, as zipfile sets them (UTF-8 flag only if needed)."""
    flags = _STREAMED if member.streamed else 0
    try:
        return member.name.encode("ascii"), flags
    except UnicodeEncodeError:
        return member.name.encode("utf-8"), flags | _UTF8


def _dos_time_date(when: datetime.datetime) -> tuple[int, int]:
    year = max(when.year, 1980)
    return ((when.hour << 11) | (when.minute << 5) | (when.second // 2),
            ((year - 1980) << 9) | (when.month << 5) | when.day)
