"""A process that runs a disk under load with live operations, to be killed at a random moment
(tests/crash/test_live_kill.py): ``python -m tests.crash.live_driver IMAGE SEED OPS``.

A writer task writes 4 KiB slots, each write a new generation of its slot (the data names slot and
generation), and flushes now and then; an operator task runs live operations (OPS: checkpoint, merge, or
both) one after the other. Everything the test needs to judge the survivors goes to stdout, one line per
event, flushed at once:

- ``flushed G0,G1,...``: per slot, the generation every write up to the flush that just returned made
  durable (a floor: after a kill each slot must hold this generation or a later one it was given);
- ``issued SLOT GEN`` before each write, so the test knows the newest generation a slot may hold;
- ``checkpoint-begin G0,...`` (generations acknowledged when the checkpoint began) and
  ``checkpoint-done PATH G0,...`` (generations issued when it returned): the frozen layer PATH must hold,
  per slot, a generation between the two;
- ``merge-begin LAYER PARENT`` and ``merge-done LAYER``: from the beginning on, PARENT no longer holds the
  point in time a checkpoint froze in it (a merge gives it up).
"""

from __future__ import annotations

import random
import struct
import sys

import trio

from vhdxfs.engine.aio import AsyncDisk
from vhdxfs.engine.live import checkpoint, merge

SLOT = 4096
SLOTS = 48
MAX_LAYERS = 16
STRIDE = 331 * SLOT  # slots spread over many blocks (and sector bitmap chunks) of a small disk


def slot_offset(slot: int) -> int:
    return slot * STRIDE


def slot_data(slot: int, gen: int) -> bytes:
    return struct.pack("<QQ", slot, gen) * (SLOT // 16)


def slot_gen(slot: int, data: bytes) -> int:
    """The generation a slot holds (0: never written), or -1 when it holds anything else."""
    if data == bytes(SLOT):
        return 0
    if data != struct.pack("<QQ", slot, struct.unpack_from("<QQ", data)[1]) * (SLOT // 16):
        return -1
    return int(struct.unpack_from("<QQ", data)[1])


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def gens(values: list[int]) -> str:
    return ",".join(map(str, values))


async def run(image: str, seed: int, ops: str) -> None:
    rnd = random.Random(seed)
    acked = [0] * SLOTS
    issued = [0] * SLOTS
    async with await AsyncDisk.open(image) as disk:
        async def writer() -> None:
            gen = 0
            while True:
                gen += 1
                slot = rnd.randrange(SLOTS)
                issued[slot] = gen
                say(f"issued {slot} {gen}")
                await disk.write(slot_offset(slot), slot_data(slot, gen))
                acked[slot] = gen
                if rnd.random() < 0.1:
                    floor = list(acked)
                    await disk.flush()
                    say(f"flushed {gens(floor)}")
                await trio.sleep(0)

        async def operator() -> None:
            kinds = ops.split(",")
            while True:
                chain = disk.chain()
                kind = rnd.choice(kinds)
                if len(chain) >= MAX_LAYERS:  # deep enough: merges only (or, without them, just writes)
                    kind = "merge" if "merge" in kinds else "wait"
                if kind == "wait":
                    await trio.sleep(0.05)
                elif kind == "checkpoint" or len(chain) < 2:
                    say(f"checkpoint-begin {gens(acked)}")
                    top = await checkpoint(disk)
                    say(f"checkpoint-done {chain[0]} {gens(issued)}")
                    del top
                else:
                    place = rnd.randrange(len(chain) - 1)
                    layer = chain[place]
                    say(f"merge-begin {layer} {chain[place + 1]}")
                    await merge(disk, layer)
                    say(f"merge-done {layer}")
                await trio.sleep(rnd.uniform(0, 0.02))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(operator)


if __name__ == "__main__":
    trio.run(run, sys.argv[1], int(sys.argv[2]), sys.argv[3])
