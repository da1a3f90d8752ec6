"""kill -9 of the NBD server under load: the image opens, checks clean, and keeps every write that was
acknowledged before a completed FLUSH (or acknowledged with FUA).

The ledger method, as tests/crash/test_kill_daemon.py does for the mount: raw NBD clients (two
connections, each on blocks of its own) send batches of writes and trims, wait for their replies, then
FLUSH; once the FLUSH is answered the batch is durable and enters the ledger. What was sent after the
last completed FLUSH is only possible: each sector of such a slot must hold what one of its candidates
(the durable contents, then every later write) holds there. Slots never written must read as zeros.
fio's nbd engine adds random writes and flushes to a second image on the same server. At a random
moment the server gets SIGKILL; then `vhdxfs check` (the dirty log replayed in memory) is clean, a
writable open replays the log, every ledgered write is there, and qemu-img check is clean. The next
round starts a new server on the same socket (left over, like the pid record, by the killed one).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import make_image, need_tools, qemu_check_clean, vhdxfs
from tests.nbd.rawclient import RawClient, ServerClosed
from vhdxfs.engine import Disk, describe
from vhdxfs.nbd import protocol as p
from vhdxfs.nbd.server import ServeConfig, address_key, state_file
from vhdxfs.service.records import read_record

MiB = 1 << 20
SIZE = 256 * MiB
BLOCK = 1 * MiB  # small blocks: many allocations, so the log is busy when the kill comes
SLOT = 16 << 10
SLOTS_PER_BLOCK = BLOCK // SLOT
SECTOR = 512
CONNECTIONS = 2
BATCH = 12


@dataclass
class Ledger:
    """What each slot may hold: ``durable[slot]`` it must (absent: zeros), or, while ``maybe[slot]`` lists
    writes sent since, sector by sector either that or one of them."""

    durable: dict[int, bytes] = field(default_factory=dict)
    maybe: dict[int, list[bytes]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    settled: int = 0  # writes and trims that entered the ledger, over all rounds
    errors: list[str] = field(default_factory=list)

    def sent(self, slots: list[int], data: bytes) -> None:
        with self.lock:
            for slot in slots:
                self.maybe.setdefault(slot, []).append(data)

    def settle(self, slots: list[int], data: bytes) -> None:
        """Durable now (a completed FLUSH after its reply, or FUA): nothing later was sent to these slots."""
        with self.lock:
            for slot in slots:
                self.durable[slot] = data
                self.maybe.pop(slot, None)
            self.settled += 1

    def touched(self) -> set[int]:
        return set(self.durable) | set(self.maybe)


@dataclass
class Op:
    kind: int
    slots: list[int]
    data: bytes  # what the slots hold after it (zeros for a trim)
    flags: int = 0


def next_batch(rnd: random.Random, mine: list[int], written: list[int]) -> list[Op]:
    """Writes (some FUA, some rewriting a slot), trims of a slot or of a whole block; no two touch one slot."""
    ops: list[Op] = []
    used: set[int] = set()
    while len(ops) < BATCH:
        roll = rnd.random()
        if roll < 0.02:
            block = rnd.choice(mine)
            slots = list(range(block * SLOTS_PER_BLOCK, (block + 1) * SLOTS_PER_BLOCK))
            op = Op(p.CMD_TRIM, slots, bytes(SLOT))
        else:
            if roll < 0.3 and written:
                slot = rnd.choice(written)
            else:
                slot = rnd.choice(mine) * SLOTS_PER_BLOCK + rnd.randrange(SLOTS_PER_BLOCK)
            if roll < 0.08:
                op = Op(p.CMD_TRIM, [slot], bytes(SLOT))
            else:
                op = Op(p.CMD_WRITE, [slot], rnd.randbytes(SLOT), p.CMD_FLAG_FUA if rnd.random() < 0.1 else 0)
        if used.isdisjoint(op.slots):
            used.update(op.slots)
            ops.append(op)
    return ops


def load(sock: Path, export: str, ledger: Ledger, index: int, stop: threading.Event, seed: float) -> None:
    """One connection: batches of requests in flight, each followed by a FLUSH, until the server dies."""
    rnd = random.Random(seed)
    mine = [b for b in range(SIZE // BLOCK) if b % CONNECTIONS == index]
    written: list[int] = []
    try:
        with RawClient(sock) as c:
            c.connect(name=export)
            while not stop.is_set():
                sent: dict[int, Op] = {}
                for op in next_batch(rnd, mine, written):
                    ledger.sent(op.slots, op.data)
                    if op.kind == p.CMD_WRITE:
                        cookie = c.request(p.CMD_WRITE, op.slots[0] * SLOT, data=op.data, flags=op.flags)
                    else:
                        cookie = c.request(p.CMD_TRIM, op.slots[0] * SLOT, len(op.slots) * SLOT)
                    sent[cookie] = op
                acked = []
                for _ in sent:
                    reply = c.reply()
                    op = sent[reply.cookie]
                    if reply.error:
                        ledger.errors.append(f"request {op.kind} at slot {op.slots[0]}: error {reply.error}")
                        return
                    if op.flags & p.CMD_FLAG_FUA:
                        ledger.settle(op.slots, op.data)
                    else:
                        acked.append(op)
                reply = c.command(p.CMD_FLUSH)
                if reply.error:
                    ledger.errors.append(f"FLUSH: error {reply.error}")
                    return
                for op in acked:
                    ledger.settle(op.slots, op.data)
                written.extend(op.slots[0] for op in acked if op.kind == p.CMD_WRITE)
    except (ServerClosed, ConnectionError):
        pass  # killed
    except TimeoutError:
        if not stop.is_set():
            ledger.errors.append(f"connection {index}: the server stopped answering")
    except Exception as exc:  # a thread's failure must fail the test
        ledger.errors.append(f"connection {index}: {exc!r}")


def daemon_pid(sock: Path) -> int:
    config = ServeConfig(images=[], socket=str(sock))
    pid = read_record(state_file(config), address_key(config))
    assert pid is not None
    return pid


def wait_dead(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(") ", 1)[1].split()[0] in "ZX":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} survived SIGKILL")


def fio_load(sock: Path, export: str) -> subprocess.Popen | None:
    """fio's nbd engine (libnbd) writing randomly at queue depth 16 with a flush every 16 writes."""
    if shutil.which("fio") is None:
        return None
    return subprocess.Popen(["fio", "--name=load", "--thread", "--ioengine=nbd", f"--uri=nbd+unix:///{export}?socket={sock}",
                             "--rw=randwrite", "--bsrange=4k-64k", "--iodepth=16", "--fsync=16", "--time_based",
                             "--runtime=60", f"--size={64 * MiB}", "--output=/dev/null"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # --thread: the job dies with fio; the group is killed after


def verify(image: Path, ledger: Ledger, rnd: random.Random) -> int:
    """Check every touched slot against the ledger (through a writable open, which replays the log), then
    take what is there as durable: the replayed and closed image is the next round's starting point. The
    number of slots that held a write sent after the last FLUSH."""
    uncertain = 0
    with Disk.open(image) as disk:
        touched = ledger.touched()
        for slot in sorted(touched):
            actual = bytes(disk.read(slot * SLOT, SLOT))
            durable = ledger.durable.get(slot, bytes(SLOT))
            later = ledger.maybe.get(slot)
            if not later:
                assert actual == durable, f"slot {slot}: a write acknowledged before a completed FLUSH is lost"
                continue
            uncertain += 1
            candidates = [durable, *later]
            for at in range(0, SLOT, SECTOR):
                piece = actual[at:at + SECTOR]
                assert any(piece == c[at:at + SECTOR] for c in candidates), \
                    f"slot {slot} sector {at // SECTOR}: holds what was never written there"
            ledger.durable[slot] = actual
            del ledger.maybe[slot]
        for slot in rnd.sample(range(SIZE // SLOT), 256):
            if slot not in touched:
                assert disk.read(slot * SLOT, SLOT) == bytes(SLOT), f"slot {slot} was never written"
    return uncertain


def one_round(tmp_path: Path, images: list[Path], ledger: Ledger, rnd: random.Random, first: bool) -> dict:
    sock = tmp_path / "kill.sock"
    result = vhdxfs("serve", *images, "--socket", sock)
    assert result.returncode == 0, result.stderr
    pid = daemon_pid(sock)
    fio = fio_load(sock, images[1].stem)
    stop = threading.Event()
    threads = [threading.Thread(target=load, args=(sock, images[0].stem, ledger, i, stop, rnd.random()))
               for i in range(CONNECTIONS)]
    before = ledger.settled
    for thread in threads:
        thread.start()
    try:  # the kill comes at a random moment after the first batch is durable
        deadline = time.monotonic() + 10
        while ledger.settled == before and time.monotonic() < deadline and not ledger.errors:
            time.sleep(0.005)
        time.sleep(rnd.uniform(0, 0.4))
    finally:
        os.kill(pid, signal.SIGKILL)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        if fio is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(fio.pid, signal.SIGKILL)
            fio.wait()
    wait_dead(pid)
    assert not ledger.errors, ledger.errors
    if first:  # the killed server's socket and pid record are left behind, and tell no lies
        assert sock.exists()
        result = vhdxfs("stop", sock)
        assert result.returncode == 1 and "no vhdxfs NBD server" in result.stderr, result.stderr
    for image in images:
        # As the crash left it (a dirty log is fine: a read-only check replays it in memory).
        result = vhdxfs("check", image)
        assert result.returncode == 0, result.stdout + result.stderr
    dirty = describe(images[0])["log-dirty"]
    uncertain = verify(images[0], ledger, rnd)
    with Disk.open(images[1]):  # fio's image: replays its log too
        pass
    for image in images:
        qemu_check_clean(image)
    return {"settled": ledger.settled - before, "uncertain": uncertain, "dirty": dirty}


def run_rounds(tmp_path: Path, rounds: int, seed: int) -> list[dict]:
    need_tools("qemu-img")
    images = [make_image(tmp_path / "ledger.vhdx", SIZE, block_size=BLOCK),
              make_image(tmp_path / "fio.vhdx", 64 * MiB, block_size=BLOCK)]
    print(f"seed {seed}")  # shown with a failure: the rounds replay with it (but for the kill moments)
    rnd = random.Random(seed)
    ledger = Ledger()
    stats = [one_round(tmp_path, images, ledger, rnd, first=n == 0) for n in range(rounds)]
    assert ledger.settled > 0, "the load must have flushed some writes before the kills"
    assert all(s["settled"] for s in stats), stats  # every round got load in before its kill
    # Served once more after all that: what the ledger says is what a client reads.
    result = vhdxfs("serve", "-o", "ro", images[0], "--socket", tmp_path / "last.sock")
    assert result.returncode == 0, result.stderr
    try:
        with RawClient(tmp_path / "last.sock") as c:
            c.connect()
            for slot in rnd.sample(sorted(ledger.durable), min(200, len(ledger.durable))):
                assert c.read(slot * SLOT, SLOT).data == ledger.durable[slot], slot
    finally:
        assert vhdxfs("stop", tmp_path / "last.sock").returncode == 0
    return stats


def test_kill_9_under_flushed_load(tmp_path, nbd_tools):
    run_rounds(tmp_path, 4, seed=1234)


@pytest.mark.stress
def test_kill_9_under_flushed_load_stress(tmp_path, nbd_tools):
    run_rounds(tmp_path, 40, seed=int.from_bytes(os.urandom(4), "big"))
