"""Every on-disk structure encodes and decodes to itself, and validation refuses what the spec forbids."""

from __future__ import annotations

import uuid

import pytest

from vhdxfs.errors import CorruptImageError, UnsupportedError
from vhdxfs.format import guids
from vhdxfs.format.bat import Geometry, PayloadState, entry_offset, entry_state, make_entry
from vhdxfs.format.header import Header, check_file_identifier, current_header, encode_file_identifier
from vhdxfs.format.metadata import Metadata, ParentLocator, decode_items, decode_table, encode_region
from vhdxfs.format.region import RegionEntry, RegionTable

MiB = 1 << 20


def header(seq: int = 5, **kw) -> Header:
    fields = dict(sequence_number=seq, file_write_guid=uuid.uuid4(), data_write_guid=uuid.uuid4(),
                  log_guid=guids.NULL_GUID, log_length=MiB, log_offset=MiB)
    fields.update(kw)
    return Header(**fields)


def test_file_identifier_round_trip():
    assert check_file_identifier(encode_file_identifier("tester")) == "tester"


def test_header_round_trip_and_checksum():
    h = header(log_guid=uuid.uuid4())
    raw = h.encode()
    assert len(raw) == 4096 and Header.decode(raw) == h
    flipped = bytearray(raw)
    flipped[100] ^= 1
    assert Header.decode(bytes(flipped)) is None


def test_the_current_header_is_the_valid_one_with_the_higher_sequence():
    a, b = header(7), header(9)
    assert current_header(a.encode(), b.encode()) == (1, b)
    assert current_header(b.encode(), a.encode()) == (0, b)
    broken = bytearray(b.encode())
    broken[0] = 0
    assert current_header(a.encode(), bytes(broken)) == (0, a)
    with pytest.raises(CorruptImageError):
        current_header(bytes(4096), bytes(broken))


def test_header_validation():
    header().validate(4 * MiB)
    with pytest.raises(UnsupportedError):
        header(version=2).validate(4 * MiB)
    with pytest.raises(CorruptImageError):
        header(log_length=MiB + 1).validate(4 * MiB)
    with pytest.raises(CorruptImageError):
        header(log_offset=3 * MiB, log_guid=uuid.uuid4()).validate(3 * MiB)


def regions(*entries) -> RegionTable:
    return RegionTable(tuple(entries))


BAT = RegionEntry(guids.BAT_REGION, 3 * MiB, MiB, True)
META = RegionEntry(guids.METADATA_REGION, 2 * MiB, MiB, True)


def test_region_table_round_trip():
    table = regions(BAT, META)
    assert RegionTable.decode(table.encode()) == table
    damaged = bytearray(table.encode())
    damaged[40] ^= 0xFF
    assert RegionTable.decode(bytes(damaged)) is None


@pytest.mark.parametrize("table,error", [
    (regions(BAT, META, RegionEntry(uuid.uuid4(), 5 * MiB, MiB, True)), UnsupportedError),
    (regions(BAT), CorruptImageError),
    (regions(BAT, RegionEntry(guids.METADATA_REGION, 3 * MiB, MiB, True)), CorruptImageError),
    (regions(BAT, RegionEntry(guids.METADATA_REGION, 2 * MiB + 4096, MiB, True)), CorruptImageError),
    (regions(RegionEntry(guids.BAT_REGION, 30 * MiB, MiB, True), META), CorruptImageError),
    (regions(RegionEntry(guids.BAT_REGION, 3 * MiB, 0, True), META), CorruptImageError),
])
def test_region_table_validation(table, error):
    with pytest.raises(error):
        table.validate(8 * MiB)


def test_unknown_optional_regions_are_kept_not_refused():
    regions(BAT, META, RegionEntry(uuid.uuid4(), 5 * MiB, MiB, False)).validate(8 * MiB)


def meta(**kw) -> Metadata:
    fields = dict(block_size=2 * MiB, virtual_size=10 * MiB, logical_sector_size=512, physical_sector_size=4096,
                  virtual_disk_id=uuid.uuid4())
    fields.update(kw)
    return Metadata(**fields)


def decode_region(region: bytes) -> Metadata:
    return decode_items(decode_table(region[:65536], len(region)), lambda off, n: region[off:off + n])


def test_metadata_round_trip_with_a_parent_locator():
    locator = ParentLocator({"parent_linkage": guids.braced(uuid.uuid4()), "relative_path": "..\\a\\b.vhdx",
                             "absolute_win32_path": "C:\\ü\\b.vhdx"})
    m = meta(has_parent=True, parent_locator=locator, logical_sector_size=4096)
    assert decode_region(encode_region(m, MiB)) == m


@pytest.mark.parametrize("changes", [dict(block_size=3 * MiB), dict(block_size=512 * 1024),
                                     dict(block_size=512 * MiB), dict(logical_sector_size=1024),
                                     dict(physical_sector_size=2048), dict(virtual_size=0),
                                     dict(virtual_size=(64 << 40) + 512), dict(virtual_size=10 * MiB + 100),
                                     dict(has_parent=True)])
def test_metadata_validation(changes):
    with pytest.raises(CorruptImageError):
        meta(**changes).validate()


def test_bat_entries():
    e = make_entry(PayloadState.FULLY_PRESENT, 4093 * MiB)
    assert entry_state(e) == 6 and entry_offset(e) == 4093 * MiB
    assert e & 0xFFFF8 == 0  # reserved bits 3-19 stay zero


SIZES = [1 << k for k in range(20, 29)]


def expected(virtual_size: int, block_size: int, sector: int, differencing: bool) -> dict[str, int]:
    """The formulas of docs/design.md ("BAT geometry"), written out independently of the code under test."""
    chunk_ratio = (2 ** 23 * sector) // block_size
    data_blocks = -(-virtual_size // block_size)
    bitmap_blocks = -(-data_blocks // chunk_ratio)
    total = bitmap_blocks * (chunk_ratio + 1) if differencing else data_blocks + (data_blocks - 1) // chunk_ratio
    return dict(chunk_ratio=chunk_ratio, data_blocks=data_blocks, bitmap_blocks=bitmap_blocks, total=total)


@pytest.mark.parametrize("sector", [512, 4096])
@pytest.mark.parametrize("block_size", SIZES)
def test_geometry_follows_the_spec_at_chunk_boundaries(sector, block_size):
    for differencing in (False, True):
        probe = Geometry(MiB, block_size, sector, differencing)
        ratio = probe.chunk_ratio
        for blocks in (1, ratio - 1, ratio, ratio + 1, 3 * ratio):
            size = blocks * block_size
            g = Geometry(size, block_size, sector, differencing)
            want = expected(size, block_size, sector, differencing)
            assert (g.chunk_ratio, g.data_blocks, g.bitmap_blocks, g.total_entries) == \
                (want["chunk_ratio"], want["data_blocks"], want["bitmap_blocks"], want["total"])
            for block in {0, ratio - 1, ratio, blocks - 1}:
                index = block + block // ratio
                assert g.payload_index(block) == index and g.block_of_index(index) == block
                assert not g.is_bitmap_index(index)
            for chunk in range(g.bitmap_blocks):
                assert g.bitmap_index(chunk) == chunk * (ratio + 1) + ratio and g.is_bitmap_index(g.bitmap_index(chunk))
