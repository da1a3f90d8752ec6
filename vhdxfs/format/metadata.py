"""Metadata region (2.6): the metadata table and the known items, parent locator included."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import CorruptImageError, Reason, UnsupportedError
from . import guids
from .constants import (
    MAX_BLOCK_SIZE,
    MAX_METADATA_ENTRIES,
    MAX_METADATA_ITEM,
    MAX_USER_METADATA_ENTRIES,
    MAX_VIRTUAL_SIZE,
    METADATA_SIGNATURE,
    METADATA_TABLE_SIZE,
    MIN_BLOCK_SIZE,
    SECTOR_SIZES,
)

_TABLE_HEADER = struct.Struct("<8sHH20s")
_ENTRY = struct.Struct("<16sIII4x")
_LOCATOR_HEADER = struct.Struct("<16sHH")
_LOCATOR_ENTRY = struct.Struct("<IIHH")

FLAG_IS_USER = 1
FLAG_IS_VIRTUAL_DISK = 2
FLAG_IS_REQUIRED = 4

KNOWN_ITEMS = {
    guids.FILE_PARAMETERS: ("File Parameters", 8),
    guids.VIRTUAL_DISK_SIZE: ("Virtual Disk Size", 8),
    guids.VIRTUAL_DISK_ID: ("Virtual Disk ID", 16),
    guids.LOGICAL_SECTOR_SIZE: ("Logical Sector Size", 4),
    guids.PHYSICAL_SECTOR_SIZE: ("Physical Sector Size", 4),
    guids.PARENT_LOCATOR: ("Parent Locator", None),
}


def _damaged(message: str, *, field: str) -> CorruptImageError:
    """An error about a damaged metadata (every one has the same typed reason)."""
    return CorruptImageError(message, field=field, reason=Reason.CORRUPT_METADATA)


@dataclass(frozen=True)
class MetadataEntry:
    item_id: uuid.UUID
    offset: int
    length: int
    flags: int

    @property
    def is_user(self) -> bool:
        return bool(self.flags & FLAG_IS_USER)

    @property
    def is_required(self) -> bool:
        return bool(self.flags & FLAG_IS_REQUIRED)


def decode_table(data: bytes, region_length: int) -> list[MetadataEntry]:
    """Parse and validate the 64 KiB metadata table at the start of the metadata region."""
    if len(data) < METADATA_TABLE_SIZE:
        raise _damaged("metadata table is truncated", field="MetadataTable")
    sig, _res, count, _res2 = _TABLE_HEADER.unpack_from(data)
    if sig != METADATA_SIGNATURE:
        raise _damaged("bad metadata table signature", field="MetadataTable.Signature")
    if count > MAX_METADATA_ENTRIES:
        raise _damaged(f"{count} entries, more than {MAX_METADATA_ENTRIES}",
                       field="MetadataTable.EntryCount")
    entries = []
    for i in range(count):
        raw, offset, length, flags = _ENTRY.unpack_from(data, _TABLE_HEADER.size + i * _ENTRY.size)
        entries.append(MetadataEntry(guids.guid_from_bytes(raw), offset, length, flags))
    if sum(e.is_user for e in entries) > MAX_USER_METADATA_ENTRIES:
        raise _damaged("more than 1024 user metadata entries", field="MetadataTable.IsUser")
    keys = set()
    spans = []
    for e in entries:
        key = (e.item_id, e.is_user)
        if key in keys:
            raise _damaged(f"item {e.item_id} listed twice", field="MetadataTable.ItemID")
        keys.add(key)
        if e.length == 0:
            continue
        if e.length > MAX_METADATA_ITEM:
            raise _damaged(f"item {e.item_id} is {e.length} bytes, more than 1 MiB",
                           field="MetadataTable.Length")
        if e.offset < METADATA_TABLE_SIZE or e.offset + e.length > region_length:
            raise _damaged(f"item {e.item_id} at {e.offset}+{e.length} lies outside the metadata "
                           "region", field="MetadataTable.Offset")
        spans.append((e.offset, e.offset + e.length, e.item_id))
    spans.sort()
    for a, b in zip(spans, spans[1:], strict=False):
        if a[1] > b[0]:
            raise _damaged(f"items {a[2]} and {b[2]} overlap", field="MetadataTable.Offset")
    for e in entries:
        if e.is_required and not e.is_user and e.item_id not in KNOWN_ITEMS:
            raise UnsupportedError(f"required metadata item {e.item_id} is not understood",
                                   field="MetadataTable.IsRequired")
        if e.is_required and e.is_user:
            raise UnsupportedError(f"required user metadata item {e.item_id} is not understood",
                                   field="MetadataTable.IsRequired")
    return entries


@dataclass(frozen=True)
class ParentLocator:
    """The VHDX parent locator: a locator type and UTF-16 key/value pairs (2.6.2.6)."""

    entries: dict[str, str]
    locator_type: uuid.UUID = guids.VHDX_LOCATOR_TYPE

    def encode(self) -> bytes:
        pairs = [(k.encode("utf-16-le"), v.encode("utf-16-le")) for k, v in self.entries.items()]
        head = _LOCATOR_HEADER.size + _LOCATOR_ENTRY.size * len(pairs)
        table = bytearray(_LOCATOR_HEADER.pack(guids.guid_to_bytes(self.locator_type), 0, len(pairs)))
        strings = bytearray()
        for key, value in pairs:
            key_at = head + len(strings)
            strings += key
            value_at = head + len(strings)
            strings += value
            table += _LOCATOR_ENTRY.pack(key_at, value_at, len(key), len(value))
        return bytes(table + strings)

    @classmethod
    def decode(cls, data: bytes) -> ParentLocator:
        if len(data) < _LOCATOR_HEADER.size:
            raise _damaged("parent locator is truncated", field="ParentLocator")
        raw_type, _res, count = _LOCATOR_HEADER.unpack_from(data)
        if _LOCATOR_HEADER.size + count * _LOCATOR_ENTRY.size > len(data):
            raise _damaged(f"{count} key/value pairs do not fit in {len(data)} bytes",
                           field="ParentLocator.KeyValueCount")
        entries: dict[str, str] = {}
        for i in range(count):
            ko, vo, kl, vl = _LOCATOR_ENTRY.unpack_from(data, _LOCATOR_HEADER.size + i * _LOCATOR_ENTRY.size)
            if not (ko and vo and kl and vl) or ko + kl > len(data) or vo + vl > len(data) or kl % 2 or vl % 2:
                raise _damaged(f"key/value pair {i} lies outside the item or is empty",
                               field="ParentLocator.Entry")
            try:
                key = data[ko:ko + kl].decode("utf-16-le")
                value = data[vo:vo + vl].decode("utf-16-le")
            except UnicodeDecodeError as exc:
                raise _damaged(f"key/value pair {i} is not UTF-16: {exc}",
                               field="ParentLocator.Entry") from None
            if key in entries:
                raise _damaged(f"key {key!r} appears twice", field="ParentLocator.Entry")
            entries[key] = value
        return cls(entries, guids.guid_from_bytes(raw_type))


@dataclass(frozen=True)
class Metadata:
    """The known system metadata items, validated."""

    block_size: int
    virtual_size: int
    logical_sector_size: int
    physical_sector_size: int
    virtual_disk_id: uuid.UUID
    leave_block_allocated: bool = False
    has_parent: bool = False
    parent_locator: ParentLocator | None = None
    # Items we do not interpret but must keep (user items and unknown optional ones): id -> (flags, bytes).
    extra_items: dict[tuple[uuid.UUID, bool], tuple[int, bytes]] = field(default_factory=dict)

    def validate(self) -> None:
        bs = self.block_size
        if bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
            raise _damaged(f"block size {bs} is not a power of two between 1 MiB and 256 MiB",
                           field="FileParameters.BlockSize")
        if self.logical_sector_size not in SECTOR_SIZES:
            raise _damaged(f"logical sector size {self.logical_sector_size} is not 512 or 4096",
                           field="LogicalSectorSize")
        if self.physical_sector_size not in SECTOR_SIZES:
            raise _damaged(f"physical sector size {self.physical_sector_size} is not 512 or 4096",
                           field="PhysicalSectorSize")
        vs = self.virtual_size
        if vs == 0 or vs > MAX_VIRTUAL_SIZE or vs % self.logical_sector_size:
            raise _damaged(f"virtual size {vs} is not a non-zero multiple of the logical sector "
                           "size up to 64 TiB", field="VirtualDiskSize")
        if self.has_parent:
            if self.parent_locator is None:
                raise _damaged("differencing image without a parent locator", field="ParentLocator")
            if self.parent_locator.locator_type != guids.VHDX_LOCATOR_TYPE:
                raise UnsupportedError(f"parent locator type {self.parent_locator.locator_type} is not VHDX",
                                       field="ParentLocator.LocatorType")
            if "parent_linkage" not in self.parent_locator.entries:
                raise _damaged("parent locator has no parent_linkage", field="ParentLocator")


def _item(items: dict[uuid.UUID, bytes], guid: uuid.UUID) -> bytes:
    name, size = KNOWN_ITEMS[guid]
    data = items.get(guid)
    if data is None:
        raise _damaged(f"required metadata item {name} is missing", field=name)
    if size is not None and len(data) < size:
        raise _damaged(f"metadata item {name} is {len(data)} bytes, expected {size}", field=name)
    return data


def decode_items(entries: list[MetadataEntry], read: Callable[[int, int], bytes]) -> Metadata:
    """Build Metadata from the table; ``read(offset, length)`` returns bytes of the metadata region."""
    system: dict[uuid.UUID, bytes] = {}
    extra: dict[tuple[uuid.UUID, bool], tuple[int, bytes]] = {}
    for e in entries:
        data = read(e.offset, e.length) if e.length else b""
        if not e.is_user and e.item_id in KNOWN_ITEMS:
            system[e.item_id] = data
        else:
            extra[(e.item_id, e.is_user)] = (e.flags, data)
    block_size, flags = struct.unpack_from("<II", _item(system, guids.FILE_PARAMETERS))
    has_parent = bool(flags & 2)
    locator = None
    if guids.PARENT_LOCATOR in system:
        locator = ParentLocator.decode(system[guids.PARENT_LOCATOR])
    meta = Metadata(
        block_size=block_size,
        virtual_size=struct.unpack_from("<Q", _item(system, guids.VIRTUAL_DISK_SIZE))[0],
        logical_sector_size=struct.unpack_from("<I", _item(system, guids.LOGICAL_SECTOR_SIZE))[0],
        physical_sector_size=struct.unpack_from("<I", _item(system, guids.PHYSICAL_SECTOR_SIZE))[0],
        virtual_disk_id=guids.guid_from_bytes(_item(system, guids.VIRTUAL_DISK_ID)[:16]),
        leave_block_allocated=bool(flags & 1),
        has_parent=has_parent,
        parent_locator=locator,
        extra_items=extra,
    )
    meta.validate()
    return meta


def encode_region(meta: Metadata, region_length: int) -> bytes:
    """Lay out the metadata table and items (items from 64 KiB on) into a region of ``region_length``."""
    items: list[tuple[uuid.UUID, int, bytes]] = [
        (guids.FILE_PARAMETERS, FLAG_IS_REQUIRED,
         struct.pack("<II", meta.block_size, int(meta.leave_block_allocated) | (int(meta.has_parent) << 1))),
        (guids.VIRTUAL_DISK_SIZE, FLAG_IS_REQUIRED | FLAG_IS_VIRTUAL_DISK, struct.pack("<Q", meta.virtual_size)),
        (guids.LOGICAL_SECTOR_SIZE, FLAG_IS_REQUIRED | FLAG_IS_VIRTUAL_DISK,
         struct.pack("<I", meta.logical_sector_size)),
        (guids.PHYSICAL_SECTOR_SIZE, FLAG_IS_REQUIRED | FLAG_IS_VIRTUAL_DISK,
         struct.pack("<I", meta.physical_sector_size)),
        (guids.VIRTUAL_DISK_ID, FLAG_IS_REQUIRED | FLAG_IS_VIRTUAL_DISK, guids.guid_to_bytes(meta.virtual_disk_id)),
    ]
    if meta.parent_locator is not None:
        items.append((guids.PARENT_LOCATOR, FLAG_IS_REQUIRED, meta.parent_locator.encode()))
    extra = [(guid, flags, data) for (guid, _user), (flags, data) in meta.extra_items.items()]
    buf = bytearray(region_length)
    all_items = items + extra
    _TABLE_HEADER.pack_into(buf, 0, METADATA_SIGNATURE, 0, len(all_items), b"")
    offset = METADATA_TABLE_SIZE
    for i, (guid, flags, data) in enumerate(all_items):
        at = offset if data else 0
        if at + len(data) > region_length:
            raise _damaged("metadata items do not fit in the metadata region", field="MetadataTable")
        _ENTRY.pack_into(buf, _TABLE_HEADER.size + i * _ENTRY.size, guids.guid_to_bytes(guid), at, len(data),
                         flags)
        buf[at:at + len(data)] = data
        offset += (len(data) + 7) // 8 * 8 if data else 0
    return bytes(buf)
