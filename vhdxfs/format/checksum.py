"""CRC-32C checksums with the checksum field taken as zero (headers, region tables, log entries)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import struct
from pathlib import Path
from typing import Protocol, cast


class _Crc32c(Protocol):
    def crc32c(self, data: bytes | bytearray | memoryview, value: int = 0, /) -> int: ...


def _load_crc32c() -> _Crc32c:
    """The crc32c package's C extension, loaded without the package's __init__, which looks up its own
    version through importlib.metadata: about 20 ms of every `vhdxfs info` start (docs/commands.md, "Start-up").
    Falls back to the plain import wherever the extension is not where the package keeps it."""
    try:
        spec = importlib.util.find_spec("crc32c")
        for folder in (spec.submodule_search_locations if spec else None) or ():
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                path = Path(folder) / f"_crc32c{suffix}"
                if path.is_file():
                    loader = importlib.machinery.ExtensionFileLoader("crc32c._crc32c", str(path))
                    found = importlib.util.spec_from_loader(loader.name, loader)
                    if found is None:
                        break
                    module = importlib.util.module_from_spec(found)
                    loader.exec_module(module)
                    return cast(_Crc32c, module)
    except (ImportError, AttributeError, OSError):
        pass
    import crc32c

    return cast(_Crc32c, crc32c)


_crc32c = _load_crc32c()


def checksum_with_zeroed_field(data: bytes | bytearray | memoryview, field_offset: int) -> int:
    """CRC-32C of ``data`` as if its 4-byte checksum field at ``field_offset`` were zero."""
    view = memoryview(data)
    crc = _crc32c.crc32c(view[:field_offset])
    crc = _crc32c.crc32c(b"\0\0\0\0", crc)
    return _crc32c.crc32c(view[field_offset + 4:], crc)


def stored_checksum(data: bytes | bytearray | memoryview, field_offset: int) -> int:
    value: int = struct.unpack_from("<I", data, field_offset)[0]
    return value


def seal(buf: bytearray, field_offset: int) -> None:
    """Write the checksum of ``buf`` into its checksum field (in place)."""
    struct.pack_into("<I", buf, field_offset, 0)
    struct.pack_into("<I", buf, field_offset, _crc32c.crc32c(buf))


def verify(data: bytes | bytearray | memoryview, field_offset: int) -> bool:
    return checksum_with_zeroed_field(data, field_offset) == stored_checksum(data, field_offset)
