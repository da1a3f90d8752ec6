"""What a running disk is and does, as JSON-ready dicts: its chain, its I/O, what is waiting, what runs.

``vhdxfs status`` and ``vhdxfs checkpoints`` print these (and Prometheus reads them in its text format,
which the front end writes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..aio import AsyncDisk
from ..disk.core import DiskCore
from .layers import layers
from .state import running


def layer_info(layer: DiskCore, top: bool) -> dict[str, Any]:
    """One layer: its file, its role, what it takes on the host and what it holds (blocking: a BAT scan)."""
    host: dict[str, Any] = {}
    try:
        if isinstance(layer.path, Path):
            st = os.stat(layer.path)
            host = {"file-size": st.st_size, "host-bytes": st.st_blocks * 512, "modified": st.st_mtime}
    except OSError:
        pass
    return {"path": str(layer.path), "role": "top" if top else "frozen", "depth": layer.depth,
            "writable": not layer.read_only, "virtual-size": layer.size, "block-size": layer.block_size,
            "type": layer.image.disk_type, "allocated-bytes": sum(n for _o, n, _i in layer.bat.allocated_ranges()),
            "data-write-guid": str(layer.image.header.data_write_guid), **host}


def chain_info(disk: AsyncDisk) -> list[dict[str, Any]]:
    """The running chain, top first."""
    return [layer_info(layer, i == 0) for i, layer in enumerate(layers(disk))]


def disk_status(disk: AsyncDisk) -> dict[str, Any]:
    """The disk's chain, its I/O counters, its write-back queue and metadata waiting for a flush, and the
    live operation running."""
    top = disk.core
    writeback = disk.host_of(top).writeback
    operation = running(disk)
    return {
        "path": str(disk.path), "virtual-size": disk.size, "read-only": disk.read_only,
        "chain": chain_info(disk),
        "io": disk.stats.snapshot(),
        "requests-inside": disk.gate.inside,
        "paused": disk.gate.shut,
        "writeback": {"queued-bytes": writeback.queued_bytes if writeback is not None else 0,
                      "limit-bytes": writeback.limit if writeback is not None else 0},
        "pending-metadata-pages": sum(len(source.dirty) for source in top.flusher.sources()),
        "operation": operation.snapshot() if operation is not None else None,
    }
