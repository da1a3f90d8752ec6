"""Parent chains of differencing images: find the parent (2.6.2.6.3), check that it is the right one.

Search order: a ``--parent`` override when the user gives one (a path or an ``s3://`` URL); else
relative_path against the child's directory (backslashes are separators; for a child in a store, against
its key's "folder" in the same bucket); else absolute_win32_path and volume_path when they name a file that
exists here; else ``url``, the extra key vhdxfs writes for a parent in an object store (the spec requires
parent_linkage and one path entry and forbids no other key). So a downloaded copy of a remote parent that
lies next to the child, where relative_path points, wins over the object itself; either must carry the
DataWriteGuid the child was made from (parent_linkage, or parent_linkage2 during a commit), the same
virtual size and the same logical sector size.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path, PurePosixPath, PureWindowsPath

from ...errors import ParentError, Reason, VhdxError
from ...format.guids import parse_braced
from ...format.metadata import Metadata
from .locations import Location, S3Location, parse

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


URL_KEY = "url"  # where a parent in an object store is: s3://BUCKET/KEY


def candidates(child: Location, meta: Metadata) -> list[Location]:
    entries = meta.parent_locator.entries if meta.parent_locator else {}
    out: list[Location] = []
    rel = entries.get("relative_path")
    if rel:
        try:
            out.append(child.parent / PurePosixPath(rel.replace("\\", "/")))
        except VhdxError:
            pass  # leads out of the child's bucket
    if isinstance(child, Path):
        for key in ("absolute_win32_path", "volume_path"):
            if entries.get(key):
                out.extend(_as_local(entries[key]))
    if entries.get(URL_KEY):
        try:
            out.append(parse(entries[URL_KEY]))
        except VhdxError:
            raise ParentError(f"{URL_KEY} {entries[URL_KEY]!r} is not an s3:// URL", path=child, field="ParentLocator",
                              reason=Reason.CORRUPT_METADATA) from None
    return out


def _there(where: Location) -> str | None:
    """None if the candidate is there (a local file; an object that answers HEAD), else why not."""
    if isinstance(where, Path):
        return None if where.is_file() else "no such file"
    from . import s3client

    try:
        s3client.head(where)
    except VhdxError as exc:
        return exc.message
    except s3client.Transient as exc:
        return str(exc)
    return None


def find_parent(child: Location, meta: Metadata, override: str | os.PathLike[str] | S3Location | None = None
                ) -> Location:
    if override is not None:
        location = parse(override)
        if isinstance(location, Path) and not location.exists():
            raise ParentError(f"parent {location} given with --parent does not exist", path=child)
        return location
    tried = candidates(child, meta)
    why: list[str] = []
    for where in tried:
        missing = _there(where)
        if missing is None:
            return where
        why.append(f"{where} ({missing})" if isinstance(where, S3Location) else str(where))
    names = ", ".join(why) or "no path in the parent locator"
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


def check_parent(child: Location, child_meta: Metadata, parent: Location, parent_meta: Metadata,
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
