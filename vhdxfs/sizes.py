"""Parsing and printing of byte sizes with binary suffixes (512M, 10G, 2T)."""

from __future__ import annotations

import re

from .errors import UsageError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    """Turn '10G', '512M', '4096' or '1.5T' into bytes; suffixes are binary (K = 1024)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"{what} {text!r} is not a size (examples: 4096, 512M, 10G, 2T)", field=what)
    number, unit = m.groups()
    value = float(number) * _UNITS[unit.upper()] if "." in number else int(number) * _UNITS[unit.upper()]
    if value != int(value):
        raise UsageError(f"{what} {text!r} is not a whole number of bytes", field=what)
    return int(value)


def format_size(n: int) -> str:
    """Human-readable binary size: 1048576 -> '1 MiB', 1536 -> '1.5 KiB'."""
    for unit, factor in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20),
                         ("KiB", 1 << 10)):
        if n >= factor:
            value = n / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.3g} {unit}"
    return f"{n} B"
