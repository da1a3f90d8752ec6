"""The torture tests' model: who owns which sector, what each sector may hold, and the clients' operations.

Ownership (``Layout``): every logical sector of the disk belongs to exactly one client, so clients never
race on a sector but do race on payload blocks, BAT pages and sector-bitmap chunks. Each block is either
owned by one client alone (the only blocks a whole-block discard may hit), or shared: sector i of the
block belongs to client (i + r) % N ("stride"), or runs of k sectors go round the clients ("runs").

Contents (``Model``): a client's operations are sequential, so each 512-byte unit of the disk has a linear
history of values (the initial one, then one per write, discard or write-zeroes touching it). A value is
*started* when its operation is issued and *done* when the operation returned. Checks:

- a client reading its own sectors must get exactly their newest value;
- a client reading other clients' sectors must get, per unit, a value from the one done when the read
  began to the newest started (a racing write may show partly: then per byte);
- after a power cut every unit must hold its value as of the last completed flush (the newest value
  done before that flush began, by any client) or a later one; nothing else (the ledger of
  tests/crash/test_power_cut.py, per unit and for many clients).

Data is self-describing (``Patterns``): 16-byte cells of (a tag of the cell's own disk position, a
generation), so a unit holding another place's data says where it came from.
"""

from __future__ import annotations

import random
import sys
import threading
from array import array
from dataclasses import dataclass, field

UNIT = 512
CELL = 16
_MIX = 0x9E3779B97F4A7C15
_INV = pow(_MIX, -1, 1 << 64)
_M64 = (1 << 64) - 1

assert sys.byteorder == "little", "the cell layout is written for little-endian hosts"


def _tags(cells: int, salt: int) -> array:
    """(tag, 0) for every 16-byte cell of a disk of ``cells`` cells: one multiply-and-add per cell. Not
    cached: its Patterns keeps it, and a cache keyed by each seed's salt kept a disk's size per seed."""
    out = array("Q", bytes(16 * cells))
    out[0::2] = array("Q", [(c * _MIX + salt) & _M64 for c in range(cells)])
    return out


class Patterns:
    """The bytes a write of generation ``gen`` puts at a place: a function of the place and ``gen``."""

    def __init__(self, size: int, salt: int) -> None:
        assert size % CELL == 0
        self.size = size
        self.salt = salt
        self._tags = _tags(size // CELL, salt)

    def data(self, offset: int, length: int, gen: int) -> bytes:
        first, last = offset // CELL, -(-(offset + length) // CELL)
        cells = self._tags[2 * first:2 * last]
        cells[1::2] = array("Q", [gen]) * (last - first)
        skip = offset - first * CELL
        return cells.tobytes()[skip:skip + length]

    def origin(self, cell: bytes) -> tuple[int, int] | None:
        """(disk offset, generation) a written 16-byte cell was made for; None for zeros or foreign bytes."""
        if not any(cell):
            return None
        tag, gen = int.from_bytes(cell[:8], "little"), int.from_bytes(cell[8:], "little")
        origin = ((tag - self.salt) * _INV & _M64) * CELL
        return (origin, gen) if origin < self.size else None

    def describe(self, offset: int, data: bytes) -> str:
        """What ``data`` (found at disk ``offset``) is made of: zeros, or whose cells of which generations."""
        parts: list[str] = []
        for pos in range(0, len(data) - CELL + 1, CELL):
            cell = data[pos:pos + CELL]
            found = self.origin(cell)
            if not any(cell):
                what = "zeros"
            elif found is None:
                what = "foreign bytes"
            elif found[0] == offset + pos:
                what = f"own place gen {found[1]}"
            else:
                what = f"data of offset {found[0]} gen {found[1]}"
            if parts and parts[-1].endswith(what):
                continue
            parts.append(f"+{pos}: {what}")
        return "; ".join(parts[:8]) + (" ..." if len(parts) > 8 else "")


# -- ownership ---------------------------------------------------------------------------------------------
@dataclass
class Layout:
    size: int
    block_size: int
    sector: int
    clients: int
    kinds: list[str]  # per block: "sole:c", "stride", "runs:k"
    owner: list[int]  # per logical sector
    runs: list[list[tuple[int, int]]] = field(default_factory=list)  # per client: maximal own byte ranges

    def sole_blocks(self, client: int) -> list[int]:
        return [b for b, k in enumerate(self.kinds) if k == f"sole:{client}"]

    def owner_of(self, offset: int) -> int:
        return self.owner[offset // self.sector]


def make_layout(rnd: random.Random, size: int, block_size: int, sector: int, clients: int) -> Layout:
    """Ownership of every sector: at least two shared blocks (stride, runs) and two blocks owned alone,
    now and then two neighbours owned alone by the same client (a discard spanning both unmaps both)."""
    blocks = -(-size // block_size)
    spb = block_size // sector
    kinds: list[str] = []
    forced = ["stride", "runs", "sole", "sole"] + [None] * max(0, blocks - 4)
    rnd.shuffle(forced)
    for b in range(blocks):
        kind = forced[b] or rnd.choice(["sole", "sole", "stride", "runs"])
        if kind == "sole":
            if b and kinds[-1].startswith("sole:") and rnd.random() < 0.5:
                kinds.append(kinds[-1])
            else:
                kinds.append(f"sole:{rnd.randrange(clients)}")
        elif kind == "runs":
            kinds.append(f"runs:{rnd.choice([2, 8, 64] if sector == 512 else [2, 8, 32])}")
        else:
            kinds.append("stride")
    owner: list[int] = []
    for b, kind in enumerate(kinds):
        rot = rnd.randrange(clients)
        n = min(spb, (size - b * block_size) // sector)
        if kind.startswith("sole:"):
            owner += [int(kind[5:])] * n
        elif kind == "stride":
            owner += [(i + rot) % clients for i in range(n)]
        else:
            k = int(kind[5:])
            owner += [(i // k + rot) % clients for i in range(n)]
    layout = Layout(size, block_size, sector, clients, kinds, owner)
    layout.runs = [[] for _ in range(clients)]
    start = 0
    for s in range(1, len(owner) + 1):
        if s == len(owner) or owner[s] != owner[start]:
            layout.runs[owner[start]].append((start * sector, s * sector))
            start = s
    return layout


# -- operations --------------------------------------------------------------------------------------------
@dataclass
class Op:
    kind: str  # write, discard, zeroes, zeroes-unmap, read, foreign-read, extents, flush
    offset: int = 0
    length: int = 0
    gen: int = 0


OP_WEIGHTS = {"write": 40, "read": 12, "discard": 9, "zeroes": 6, "zeroes-unmap": 6, "foreign-read": 8,
              "extents": 4, "flush": 7}
MAX_LENGTH = 5 << 19  # 2.5 MiB


def pick_range(rnd: random.Random, layout: Layout, client: int, *, unaligned: bool,
               whole: bool = False) -> tuple[int, int]:
    """A range of the client's own bytes: a whole run or part of one, now and then not sector-aligned;
    with ``whole``, when the client owns whole blocks, often one or two of them exactly."""
    runs = layout.runs[client]
    bs = layout.block_size
    long = [r for r in runs if r[1] - r[0] >= bs]
    if whole and long and rnd.random() < 0.6:
        start, end = rnd.choice(long)
        first, last = -(-start // bs), min(end, layout.size) // bs  # whole blocks inside the run
        if end == layout.size and layout.size % bs:
            last += 1  # the short last block counts as whole
        if first < last:
            b = rnd.randrange(first, last)
            n = rnd.choice([1, 1, 2]) if b + 1 < last else 1
            offset = b * bs
            return offset, min((b + n) * bs, layout.size) - offset
    start, end = rnd.choice(long if long and rnd.random() < 0.4 else runs)
    end = min(end, start + MAX_LENGTH)
    if rnd.random() < 0.3:
        offset, length = start, end - start
    else:
        sectors = (end - start) // layout.sector
        a = rnd.randrange(sectors)
        b = rnd.randrange(a + 1, sectors + 1)
        offset, length = start + a * layout.sector, (b - a) * layout.sector
    if unaligned and rnd.random() < 0.15:
        cut = rnd.randrange(length)
        offset, length = offset + cut, length - cut
        length -= rnd.randrange(length)
    return offset, length


def pick_op(rnd: random.Random, layout: Layout, client: int, gens, *, unaligned: bool) -> Op:
    kind = rnd.choices(list(OP_WEIGHTS), weights=list(OP_WEIGHTS.values()))[0]
    if kind == "flush":
        return Op(kind)
    if kind == "foreign-read":
        offset = rnd.randrange(0, layout.size, UNIT)
        return Op(kind, offset, min(rnd.choice([UNIT, 4096, 65536, layout.block_size]), layout.size - offset))
    offset, length = pick_range(rnd, layout, client, unaligned=unaligned,
                                whole=kind in ("discard", "zeroes", "zeroes-unmap"))
    return Op(kind, offset, length, next(gens) if kind == "write" else 0)


# -- contents ----------------------------------------------------------------------------------------------
class Model:
    """Per 512-byte unit: its history of values, the newest done, and the floor a power cut keeps."""

    def __init__(self, initial: bytes, patterns: Patterns) -> None:
        self.patterns = patterns
        self.units = len(initial) // UNIT
        self.hist: list[list[bytes]] = [[initial[u * UNIT:(u + 1) * UNIT]] for u in range(self.units)]
        self.done = [0] * self.units
        self.floor = [0] * self.units
        self.lock = threading.Lock()  # flush snapshots against threads that finish operations
        self.flushes = 0

    # -- recording --------------------------------------------------------------------------------------
    def begin(self, offset: int, data: bytes) -> list[tuple[int, int]]:
        """Record a change before it is issued (a cut in its middle may keep part of it)."""
        end = offset + len(data)
        token = []
        for u in range(offset // UNIT, -(-end // UNIT)):
            lo = u * UNIT
            a, b = max(offset, lo), min(end, lo + UNIT)
            if a == lo and b == lo + UNIT:
                new = data[a - offset:b - offset]
            else:
                cur = self.hist[u][-1]
                new = cur[:a - lo] + data[a - offset:b - offset] + cur[b - lo:]
            self.hist[u].append(new)
            token.append((u, len(self.hist[u]) - 1))
        return token

    def end(self, token: list[tuple[int, int]]) -> None:
        with self.lock:
            for u, i in token:
                self.done[u] = i

    def flush_begins(self) -> list[int]:
        with self.lock:
            return list(self.done)

    def flush_done(self, snapshot: list[int]) -> None:
        with self.lock:
            self.floor = list(map(max, self.floor, snapshot))
            self.flushes += 1

    def settle(self) -> None:
        """Everything is durable (a clean close): the newest values become the only ones."""
        self.hist = [[h[-1]] for h in self.hist]
        self.done = [0] * self.units
        self.floor = [0] * self.units

    def current(self) -> bytes:
        return b"".join(h[-1] for h in self.hist)

    # -- checks -----------------------------------------------------------------------------------------
    def _where(self, u: int, got: bytes, note: str) -> str:
        newest = self.patterns.describe(u * UNIT, self.hist[u][-1])
        return (f"unit {u} (offset {u * UNIT}) {note}: holds [{self.patterns.describe(u * UNIT, got)}], "
                f"expected one of {len(self.hist[u])} values, newest [{newest}]")

    def check_own(self, offset: int, got: bytes) -> None:
        """A client read its own bytes: each must be the newest value (its own operations are sequential)."""
        end = offset + len(got)
        for u in range(offset // UNIT, -(-end // UNIT)):
            lo = u * UNIT
            a, b = max(offset, lo), min(end, lo + UNIT)
            expect = self.hist[u][-1][a - lo:b - lo]
            if got[a - offset:b - offset] != expect:
                full = bytearray(self.hist[u][-1])
                full[a - lo:b - lo] = got[a - offset:b - offset]
                raise AssertionError(self._where(u, bytes(full), "read by its owner"))

    def done_now(self, offset: int, length: int) -> list[int]:
        return self.done[offset // UNIT:-(-(offset + length) // UNIT)]

    def check_foreign(self, offset: int, got: bytes, done_before: list[int]) -> None:
        """A read of anyone's bytes: per unit a value from the one done when the read began to the newest."""
        first = offset // UNIT
        end = offset + len(got)
        bad = []
        for u in range(first, -(-end // UNIT)):
            lo = u * UNIT
            a, b = max(offset, lo), min(end, lo + UNIT)
            piece = got[a - offset:b - offset]
            window = [v[a - lo:b - lo] for v in self.hist[u][done_before[u - first]:]]
            if piece in window:
                continue
            # A write racing the read may show partly: then every byte must come from one of the values.
            if all(any(v[i] == piece[i] for v in window) for i in range(len(piece))):
                continue
            full = bytearray(self.hist[u][-1])
            full[a - lo:b - lo] = piece
            bad.append((u, bytes(full)))
        if bad:
            raise AssertionError(f"{len(bad)} units read wrong; first: " + self._where(
                bad[0][0], bad[0][1], "read by another client"))

    def check_survivor(self, contents: bytes, floor: list[int] | None = None) -> None:
        """After a power cut: every unit holds its value of the last completed flush or a later one.
        ``floor``: the floors as they were when the survivor was taken (default: now)."""
        floor = self.floor if floor is None else floor
        bad = []
        for u in range(self.units):
            got = contents[u * UNIT:(u + 1) * UNIT]
            if got not in self.hist[u][floor[u]:]:
                bad.append((u, got))
        if bad:
            u, got = bad[0]
            older = got in self.hist[u][:floor[u]]
            raise AssertionError(f"{len(bad)} units hold what they may not after the cut; first: " + self._where(
                u, got, "after the cut" + (" (an older value: a flushed write was lost)" if older else "")))
