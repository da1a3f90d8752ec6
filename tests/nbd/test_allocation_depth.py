"""``qemu:allocation-depth`` with real clients, and the incremental backup it is for.

A layer of a differencing chain, served read-only, tells which blocks it holds itself (depth 1), which its
parent holds (2), its grandparent (3), and which no layer holds (0). nbdinfo maps it, qemu-img reads it
through its x-dirty-bitmap trick, and a backup that copies only the depth-1 extents of a layer onto a copy
of its parent reproduces the layer byte for byte:

- offline: a base with data, a child written by qemu-io over NBD, the child then served read-only;
- live: a running disk checkpointed twice while it writes; the frozen middle layer is served read-only
  while the disk goes on writing into the new top, and the backup of it holds exactly what was written
  between the two checkpoints.

Every expectation comes from a model of the writes (tests/nbd/chain.py), never from the images.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import trio

from tests.helpers import make_image, run, vhdxfs
from tests.nbd.chain import (
    BLOCK,
    SECTOR,
    SIZE,
    Chain,
    MiB,
    allocation_depths,
    make_chain,
    make_deep_chain,
    merged,
    ranges_of,
)
from tests.nbd.conftest import Server, serving
from tests.nbd.rawclient import RawClient
from vhdxfs.engine import Disk
from vhdxfs.engine.aio import AsyncDisk
from vhdxfs.engine.live import checkpoint
from vhdxfs.nbd import protocol as p

DEPTH = p.ALLOCATION_DEPTH
KiB = 1 << 10
COPY_CHUNK = 32 * MiB  # the largest READ the server answers


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Chain:
    return make_chain(tmp_path_factory.mktemp("chain"))


def nbdinfo_map(uri: str, context: str = DEPTH) -> list[dict]:
    result = run("nbdinfo", "--json", f"--map={context}", uri)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def depth_map(uri: str) -> list[tuple[int, int, int]]:
    """nbdinfo's map of qemu:allocation-depth, as merged (offset, length, depth) runs."""
    return merged((e["offset"], e["length"], e["type"]) for e in nbdinfo_map(uri))


def vhdxfs_map_depths(image: Path) -> list[tuple[int, int, int]]:
    """`vhdxfs map --json` names the layer of each extent: the same depths, counted from 1."""
    result = vhdxfs("map", "--json", image)
    assert result.returncode == 0, result.stderr
    return merged((e["start"], e["length"], e["depth"] + 1 if e["present"] else 0) for e in json.loads(result.stdout))


def copy_ranges(server: Server, ranges: list[tuple[int, int]], target: Path) -> int:
    """Read ``ranges`` of the server's export over NBD and write them in place into ``target``: the
    incremental step of a backup. The bytes copied."""
    copied = 0
    with RawClient(server.socket) as c, open(target, "r+b") as out:
        c.connect(structured=True)
        for offset, length in ranges:
            for at in range(offset, offset + length, COPY_CHUNK):
                n = min(COPY_CHUNK, offset + length - at)
                reply = c.read(at, n)
                assert reply.error == 0 and len(reply.data) == n, reply
                out.seek(at)
                out.write(reply.data)
                copied += n
    return copied


def full_copy(server: Server, target: Path) -> bytes:
    result = run("nbdcopy", server.uri(), str(target))
    assert result.returncode == 0, result.stderr
    return target.read_bytes()


# -- real clients against each layer of a chain -----------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 2], ids=["base", "mid", "top"])
def test_nbdinfo_maps_the_allocation_depth_of_any_layer(serve, chain, k):
    layer = chain.layers[k].path
    with serve("-o", "ro", layer) as server:
        extents = nbdinfo_map(server.uri())
        info = json.loads(run("nbdinfo", "--json", server.uri()).stdout)
    assert merged((e["offset"], e["length"], e["type"]) for e in extents) == chain.depths(k)
    assert vhdxfs_map_depths(layer) == chain.depths(k)
    names = {1: "local", 2: "backing depth 2", 3: "backing depth 3"}
    for e in extents:
        if e["type"] in names:
            assert e["description"] == names[e["type"]], e
    assert {e["type"] for e in extents} == {0, *range(1, k + 2)}
    [export] = info["exports"]
    assert set(export["contexts"]) == {p.BASE_ALLOCATION, DEPTH}


def test_a_twenty_layer_chain_maps_alike_over_nbd_in_vhdxfs_map_and_in_the_model(serve, tmp_path):
    """Both answers come from the chain map (vhdxfs/engine/disk/chainmap.py); the model from the writes."""
    deep = make_deep_chain(tmp_path)
    top = deep.layers[-1].path
    expected = deep.depths(len(deep.layers) - 1)
    assert max(depth for _o, _l, depth in expected) > 10  # the test reaches deep into the chain
    with serve("-o", "ro", top) as server:
        assert depth_map(server.uri()) == expected
        assert full_copy(server, tmp_path / "copy.raw") == deep.content(len(deep.layers) - 1)
    assert vhdxfs_map_depths(top) == expected


@pytest.mark.parametrize("k", [1, 2], ids=["mid", "top"])
def test_qemu_img_map_reads_the_depth_through_x_dirty_bitmap(serve, chain, k):
    """QEMU's client reads another context as if it were base:allocation (bit 0 HOLE, bit 1 ZERO), so
    qemu-img map shows depth 0 as data, 1 as neither, 2 as data and zero. Depth 3 (HOLE|ZERO) qemu-img 7.2
    shows as data and zero too: the trick tells apart 0, 1 and 2 or more."""
    decode = {(True, False): 0, (False, False): 1, (True, True): 2}
    layer = chain.layers[k].path
    with serve("-o", "ro", layer) as server:
        result = run("qemu-img", "map", "--output=json", "--image-opts",
                     f"driver=nbd,server.type=unix,server.path={server.socket},export={layer.stem},"
                     f"x-dirty-bitmap={DEPTH}")
    assert result.returncode == 0, result.stderr
    mapped = merged((e["start"], e["length"], decode[e["data"], e["zero"]]) for e in json.loads(result.stdout))
    assert mapped == merged((offset, length, min(depth, 2)) for offset, length, depth in chain.depths(k))
    assert {depth for _, _, depth in mapped} == {0, 1, 2}


def test_a_frozen_inner_layer_while_the_top_is_served_writable(serve, chain, tmp_path):
    """The middle layer, served read-only beside a server that writes a child of it (a new one, not the
    module's top, so that the chain stays as the model says): its depths do not move."""
    top = tmp_path / "top.avhdx"
    result = vhdxfs("create", "--parent", chain.layers[1].path, "--block-size", "1M", top)
    assert result.returncode == 0, result.stderr
    with serve(top) as writer, serve("-o", "ro", chain.layers[1].path) as frozen:
        before = depth_map(frozen.uri())
        result = run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 8M", "-c", "write -z 16M 4M", writer.uri())
        assert result.returncode == 0, result.stdout + result.stderr
        assert depth_map(frozen.uri()) == before == chain.depths(1)
        written = depth_map(writer.uri())
    assert written[0] == (0, 8 * MiB, 1)


# -- incremental backups ----------------------------------------------------------------------------------
CHILD_WRITES = [  # qemu-io commands into the child, and the (offset, length) each allocates there
    ("write -P 0x11 0 4k", (0, 4 * KiB)),
    ("write -P 0x22 1m 64k", (MiB, 64 * KiB)),  # inside a block of the base's data
    ("write -P 0x33 3m 2m", (3 * MiB, 2 * MiB)),  # whole blocks, over the base's data and past it
    ("write -P 0x44 9m 512", (9 * MiB, 512)),  # one sector where the base has nothing
    ("write -P 0x55 12582400 1000", (12 * MiB - 512, 1000)),  # unaligned: the model widens it to sectors
    ("write -P 0x66 30m 1m", (30 * MiB, MiB)),
]
CHILD_DISCARDS = [(6 * MiB, MiB)]  # a whole block over the base's data: zeros that hide it
BASE_DATA = [(0, 6 * MiB + 4 * KiB), (20 * MiB, 3 * MiB)]


def test_incremental_backup_of_a_child_copies_only_what_it_holds(serve, tmp_path):
    size = 32 * MiB
    base = make_image(tmp_path / "base.vhdx", size, block_size=BLOCK)
    rnd = random.Random(5)
    with Disk.open(base) as disk:
        for offset, length in BASE_DATA:
            disk.write(offset, rnd.randbytes(length))
    backup = tmp_path / "backup.raw"
    with serve("-o", "ro", base) as server:  # the full backup, at the time the child was made
        full_copy(server, backup)
    child = tmp_path / "child.avhdx"
    result = vhdxfs("create", "--parent", base, "--block-size", "1M", child)
    assert result.returncode == 0, result.stderr
    with serve(child) as server:  # the disk runs: a client writes into the child
        commands = [arg for command, _ in CHILD_WRITES for arg in ("-c", command)]
        commands += [arg for offset, length in CHILD_DISCARDS for arg in ("-c", f"discard {offset} {length}")]
        result = run("qemu-io", "-f", "raw", "-d", "unmap", *commands, server.uri())
        assert result.returncode == 0 and "error" not in (result.stdout + result.stderr).lower(), result.stdout
    expected = allocation_depths(size, [(BASE_DATA, []), ([r for _, r in CHILD_WRITES], CHILD_DISCARDS)])
    with serve("-o", "ro", child) as server:
        depths = depth_map(server.uri())
        assert depths == expected
        changed = ranges_of(depths, 1)
        copied = copy_ranges(server, changed, backup)
        whole = full_copy(server, tmp_path / "child.raw")
    assert copied == sum(length for _, length in ranges_of(expected, 1)) < size // 4
    assert backup.read_bytes() == whole  # the base's copy plus the child's extents is the child
    assert whole[9 * MiB:9 * MiB + 512] == b"\x44" * 512
    assert whole[6 * MiB:7 * MiB] == bytes(MiB)  # the discarded block: zeros, over the base's data
    assert vhdxfs("check", child).returncode == 0


async def test_incremental_backup_between_two_checkpoints_of_a_running_disk(tmp_path, nbd_tools):
    """The disk runs (an AsyncDisk, as a mount or a server holds it) and writes; a checkpoint freezes the
    base (the full backup reads it); more writes; a second checkpoint freezes those in the middle layer.
    Served read-only while the disk goes on writing into the new top, the middle layer's depth-1 extents
    are exactly what was written between the two checkpoints, and copied onto the full backup they give the
    disk as it was at the second checkpoint."""
    rnd = random.Random(11)
    base = make_image(tmp_path / "disk.vhdx", SIZE, block_size=BLOCK)
    model = bytearray(SIZE)
    base_writes: list[tuple[int, int]] = []
    changes: list[tuple[int, int]] = []
    discards: list[tuple[int, int]] = []

    async def put(disk: AsyncDisk, offset: int, length: int, log: list[tuple[int, int]] | None) -> None:
        data = rnd.randbytes(length)
        await disk.write(offset, data)
        if log is not None:
            model[offset:offset + length] = data
            log.append((offset, length))

    def serve_ro(image: Path, name: str):
        return serving("-o", "ro", image, socket_path=tmp_path / f"{name}.sock")

    async with await AsyncDisk.open(base) as disk:
        for offset, length in [(0, 5 * MiB), (17 * MiB + 4096, 4096), (40 * MiB, 8 * MiB)]:
            await put(disk, offset, length, base_writes)
        monday = await checkpoint(disk, "monday")
        backup = tmp_path / "backup.raw"

        def full_backup() -> None:
            with serve_ro(base, "base") as server:
                assert full_copy(server, backup) == model

        await trio.to_thread.run_sync(full_backup)
        for _ in range(40):  # sector-aligned writes of 512 B to 256 KiB anywhere
            length = rnd.randrange(1, 513) * SECTOR
            await put(disk, rnd.randrange(0, (SIZE - length) // SECTOR) * SECTOR, length, changes)
        child_block = 2 * MiB  # a checkpoint's child has Hyper-V's 2 MiB blocks
        await disk.discard(42 * MiB, child_block)  # zeros over the base's data
        model[42 * MiB:42 * MiB + child_block] = bytes(child_block)
        discards.append((42 * MiB, child_block))
        at_tuesday = bytes(model)
        tuesday = await checkpoint(disk, "tuesday")
        assert disk.chain() == [tuesday, monday, base]

        result: dict[str, object] = {}

        def incremental_backup() -> None:
            with serve_ro(monday, "monday") as server:
                depths = depth_map(server.uri())
                result["depths"] = depths
                result["copied"] = copy_ranges(server, ranges_of(depths, 1), backup)

        async with trio.open_nursery() as nursery:
            async def keep_writing() -> None:  # into the new top, while the backup runs
                while True:
                    await put(disk, rnd.randrange(0, SIZE // MiB) * MiB, MiB, None)
                    await trio.sleep(0.01)

            nursery.start_soon(keep_writing)
            await trio.to_thread.run_sync(incremental_backup)
            nursery.cancel_scope.cancel()
        assert disk.chain() == [tuesday, monday, base]

    expected = allocation_depths(SIZE, [(base_writes, []), (changes, discards)])
    assert result["depths"] == expected
    assert result["copied"] == sum(length for _, length in ranges_of(expected, 1))
    assert backup.read_bytes() == at_tuesday
