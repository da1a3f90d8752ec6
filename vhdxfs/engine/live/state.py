"""One live operation at a time per running disk, and what it is doing (for ``vhdxfs status``).

A checkpoint, a merge and a resize each change the chain; two at once could interleave their steps, so
the second is refused at once (the caller says so; nobody waits behind a merge of many GiB). The record
of the one running, with its progress, is what status reports.
"""

from __future__ import annotations

import contextlib
import errno
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ...errors import Reason, VhdxError
from ..aio import AsyncDisk


@dataclass
class Operation:
    """The live operation running on a disk."""

    name: str  # checkpoint | merge | resize
    target: str  # what it works on (the layer merged, the new size...)
    started: float = field(default_factory=time.time)
    done: int = 0  # bytes of its work done so far (a merge's copy)
    total: int = 0  # bytes of its work in all (0: not known, or nothing to count)
    phase: str = "starting"

    def snapshot(self) -> dict[str, Any]:
        return {"operation": self.name, "target": self.target, "phase": self.phase, "started": self.started,
                "done-bytes": self.done, "total-bytes": self.total}


_running: weakref.WeakKeyDictionary[AsyncDisk, Operation] = weakref.WeakKeyDictionary()


def running(disk: AsyncDisk) -> Operation | None:
    return _running.get(disk)


@contextlib.contextmanager
def exclusive(disk: AsyncDisk, name: str, target: str) -> Iterator[Operation]:
    """Run ``name`` on ``disk`` alone: refused with EBUSY while another live operation runs."""
    if disk.read_only:
        raise VhdxError(f"cannot {name}: the disk is served read-only", path=disk.path, errno=errno.EROFS,
                        reason=Reason.READ_ONLY)
    if disk.closed:
        raise VhdxError(f"cannot {name}: the disk is closed", path=disk.path, reason=Reason.CLOSED)
    other = _running.get(disk)
    if other is not None:
        raise VhdxError(f"cannot {name} now: a {other.name} of {other.target} is running (started "
                        f"{time.strftime('%H:%M:%S', time.localtime(other.started))}, {other.phase})",
                        path=disk.path, errno=errno.EBUSY, reason=Reason.LOCKED)
    operation = _running[disk] = Operation(name, target)
    try:
        yield operation
    finally:
        del _running[disk]
