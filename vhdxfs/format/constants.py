"""Sizes, offsets, signatures and limits of MS-VHDX v1 (spec sections 2.1-2.6)."""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

# Header section (2.2): five 64 KiB items in the first 1 MiB.
HEADER_SECTION_SIZE = 1 * MiB
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
REGION_TABLE_SIZE = 64 * KiB

# Signatures, as the little-endian integers the spec gives.
FILE_SIGNATURE = b"vhdxfile"
HEADER_SIGNATURE = b"head"
REGION_SIGNATURE = b"regi"
LOG_ENTRY_SIGNATURE = b"loge"
ZERO_DESC_SIGNATURE = b"zero"
DATA_DESC_SIGNATURE = b"desc"
DATA_SECTOR_SIGNATURE = b"data"
METADATA_SIGNATURE = b"metadata"

# Limits.
MAX_REGION_ENTRIES = 2047
MAX_METADATA_ENTRIES = 2047
MAX_USER_METADATA_ENTRIES = 1024
METADATA_TABLE_SIZE = 64 * KiB
MAX_METADATA_ITEM = 1 * MiB
MIN_BLOCK_SIZE = 1 * MiB
MAX_BLOCK_SIZE = 256 * MiB
MAX_VIRTUAL_SIZE = 64 * TiB
SECTOR_SIZES = (512, 4096)
SECTORS_PER_BITMAP = 1 << 23  # sectors described by one 1 MiB sector bitmap block
SECTOR_BITMAP_BLOCK_SIZE = 1 * MiB
LOG_SECTOR_SIZE = 4 * KiB
ALIGNMENT = 1 * MiB
