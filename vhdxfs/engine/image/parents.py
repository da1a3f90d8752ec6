"""Parent chains of differencing images: find the parent (2.6.2.6.3), check that it is the right one.

Search order: a ``--parent`` override when the user gives one; else relative_path against the child's
directory (backslashes are separators); else absolute_win32_path and volume_path when they name a file
that exists here. The parent must carry the DataWriteGuid the child was made from (parent_linkage, or
parent_linkage2 during a commit), the same virtual size and the same logical sector size.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path, PurePosixPath, PureWindowsPath

from ...errors import ParentError, Reason
from ...format.guids import parse_braced
from ...format.metadata import Metadata

MAX_CHAIN_DEPTH = 64


def _as_local(win_path: str) -> list[Path]:
    """Ways a Windows path stored in a locator may exist on this machine."""
    text = win_path
    for prefix in ("\\\\?\\", "\\\\.\\"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    candidates = [Path(text.replace("\\", "/"))]
    pure = PureWindowsPath(text)
    if pure.drive:  # d:\dir\x.vhdx -> /dir/x.vhdx
        candidates.append(Path("/", *pure.parts[1:]))
    return candidates


def candidates(child: Path, meta: Metadata) -> list[Path]:
    entries = meta.parent_locator.entries if meta.parent_locator else {}
    out: list[Path] = []
    rel = entries.get("relative_path")
    if rel:
        out.append(child.parent / PurePosixPath(rel.replace("\\", "/")))
    for key in ("absolute_win32_path", "volume_path"):
        if entries.get(key):
            out.extend(_as_local(entries[key]))
    return out


def find_parent(child: Path, meta: Metadata, override: str | os.PathLike[str] | None = None) -> Path:
    if override is not None:
        path = Path(override)
        if not path.exists():
            raise ParentError(f"parent {path} given with --parent does not exist", path=child)
        return path
    tried = candidates(child, meta)
    for path in tried:
        if path.is_file():
            return path
    names = ", ".join(str(p) for p in tried) or "no path in the parent locator"
    raise ParentError(f"parent not found (tried {names}); give it with --parent PATH", path=child,
                      field="ParentLocator")


def linkage_guids(meta: Metadata) -> list[uuid.UUID]:
    entries = meta.parent_locator.entries if meta.parent_locator else {}
    out = []
    for key in ("parent_linkage", "parent_linkage2"):
        if entries.get(key):
            try:
                out.append(parse_braced(entries[key]))
            except ValueError:
                raise ParentError(f"{key} {entries[key]!r} is not a GUID", field="ParentLocator",
                                  reason=Reason.CORRUPT_METADATA) from None
    return out


def check_parent(child: Path, child_meta: Metadata, parent: Path, parent_meta: Metadata,
                 parent_data_write_guid: uuid.UUID) -> None:
    expected = linkage_guids(child_meta)
    if parent_data_write_guid not in expected:
        want = " or ".join("{" + str(g) + "}" for g in expected)
        raise ParentError(f"parent {parent} has DataWriteGuid {{{parent_data_write_guid}}} but the child was made "
                          f"from {want}: the parent changed after the child was created", path=child,
                          field="ParentLocator.parent_linkage", reason=Reason.PARENT_MISMATCH)
    if parent_meta.virtual_size != child_meta.virtual_size:
        raise ParentError(f"parent {parent} is {parent_meta.virtual_size} bytes, the child "
                          f"{child_meta.virtual_size}", path=child, field="VirtualDiskSize",
                          reason=Reason.PARENT_MISMATCH)
    if parent_meta.logical_sector_size != child_meta.logical_sector_size:
        raise ParentError(f"parent {parent} has {parent_meta.logical_sector_size}-byte sectors, the child "
                          f"{child_meta.logical_sector_size}", path=child, field="LogicalSectorSize",
                          reason=Reason.PARENT_MISMATCH)
