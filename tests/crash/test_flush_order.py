"""A flush journals only what its data sync made durable: a write racing the flush waits for the next one.

The race: a differencing child over a parent with non-zero data; a flush waits for the queued writes to
drain (or for its fdatasync); meanwhile a write W2 to other sectors described by the same sector-bitmap
page is queued and marks its sectors present. If the flush took the dirty pages after its data sync, its log
entry would mark W2's sectors present while W2's data is not in the file, and after a power cut they would
read as zeros: neither the parent's old data nor W2's new data.

The host holds pwrites to chosen virtual ranges on gates, so W2's data certainly reaches the medium only
after the flush returned; the image a power cut leaves is then built from the durable bytes alone.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from tests.crash.powercut import Disk, PowerCutHost
from tests.helpers import make_image
from vhdxfs.engine import PosixFile, create_child
from vhdxfs.engine.aio import AsyncDisk

MiB = 1 << 20
SIZE = 4 * MiB
TIMEOUT = 2
OLD = b"P"  # the parent's data everywhere
W1 = (0, b"1" * 4096)  # (virtual offset, data); W2 is the racing write


class Gate:
    """Holds the pwrites of one write's data (told by its bytes: each write here is unique) until ``release``
    is set."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reached = threading.Event()
        self.release = threading.Event()


class GatedHost(PowerCutHost):
    """PowerCutHost whose pwrites to a gated range wait; with ``hold_sync`` set, fdatasync waits too."""

    def __init__(self, path, *, writable: bool, disk: Disk) -> None:
        super().__init__(path, writable=writable, disk=disk)
        self.gates: list[Gate] = []
        self.hold_sync: Gate | None = None

    def pwrite(self, offset, data) -> None:
        for gate in self.gates:
            if bytes(data) == gate.data:
                gate.reached.set()
                assert gate.release.wait(TIMEOUT), "a gated write was never released"
        super().pwrite(offset, data)

    def fdatasync(self) -> None:
        if (gate := self.hold_sync) is not None:
            self.hold_sync = None
            gate.reached.set()
            assert gate.release.wait(TIMEOUT), "a held fdatasync was never released"
        super().fdatasync()

    def release_all(self) -> None:
        for gate in [*self.gates, self.hold_sync]:
            if gate is not None:
                gate.release.set()


@pytest.mark.parametrize("racer_at", [8192, 1 * MiB + 8192], ids=["same block", "next block"])
@pytest.mark.parametrize("flush_waits_for", ["W1's data", "its fdatasync"])
async def test_a_write_racing_a_flush_is_not_journaled_before_its_data(tmp_path, racer_at, flush_waits_for):
    base = make_image(tmp_path / "base.vhdx", SIZE, block_size=1 * MiB)
    async with await AsyncDisk.open(base) as parent:
        await parent.write(0, OLD * SIZE)
    child = tmp_path / "child.avhdx"
    create_child(child, base, block_size=1 * MiB)
    medium = Disk(child.read_bytes(), cut_at=None, rnd=random.Random(1))
    hosts: list[GatedHost] = []

    def factory(path, writable):
        if Path(path) != child:
            return PosixFile(path, writable=writable)
        hosts.append(GatedHost(path, writable=writable, disk=medium))
        return hosts[-1]

    w2 = (racer_at, b"2" * 4096)
    disk = await AsyncDisk.open(child, host_factory=factory)
    host = hosts[0]
    # Both writes land in chunk 0's sector bitmap (a chunk spans 2**23 sectors), whose first 4 KiB page
    # covers the first 16 MiB.
    assert max(W1[0], w2[0]) < 16 * MiB
    racer = Gate(w2[1])
    host.gates.append(racer)
    if flush_waits_for == "W1's data":
        waits = Gate(W1[1])
        host.gates.append(waits)
    try:
        with trio.fail_after(TIMEOUT):
            await disk.write(*W1)  # queued (and held, or not); marks its sectors in the bitmap page
            if flush_waits_for == "its fdatasync":
                waits = host.hold_sync = Gate(b"")  # armed only now: the write above syncs the header
            async with trio.open_nursery() as nursery:
                nursery.start_soon(disk.flush)
                assert await trio.to_thread.run_sync(waits.reached.wait, TIMEOUT)
                await wait_all_tasks_blocked()  # the flush waits for the host now
                await disk.write(*w2)  # queued behind the flush's data sync; marks sectors in the same page
                waits.release.set()
            # The flush has returned, and W2's data has not reached the medium at all.
            assert await trio.to_thread.run_sync(racer.reached.wait, TIMEOUT)
            assert not racer.release.is_set()
        survivor = tmp_path / "survivor.avhdx"
        survivor.write_bytes(bytes(medium.durable))  # what a power cut now leaves
        async with await AsyncDisk.open(survivor, read_only=True, parent=base) as after:
            assert await after.read(W1[0], len(W1[1])) == W1[1], "a flushed write was lost"
            got = bytes(await after.read(w2[0], len(w2[1])))
        assert got in (OLD * len(w2[1]), w2[1]), "the log marks sectors present whose data was never written"
    finally:
        host.release_all()
        await disk.close()
