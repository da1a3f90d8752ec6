"""The shipped units under a real systemd (PID 1 of a container booted with systemd-nspawn: tests/fuse/nspawn.py).

What a user sees: a clean start (active, its notify status), reads and writes, a clean stop with no
error line in the journal (ExecStopPost= quiet when the daemon unmounted already), each journal line naming
the daemon once, a true st_blocks from the first stat on, a restart, recovery from a kill -9, the NBD socket
pair, and DevicePolicy=closed letting /dev/fuse through and nothing else.

Needs root, /dev/fuse, systemd-nspawn, debootstrap and nsenter (./setup.sh installs them); the first run
builds the container's root file system (tests/fuse/nspawn.py says where it is cached). Where the machine
cannot boot the container, the tests skip saying why (and fail under VHDXFS_REQUIRE_FUSE=1, as CI runs).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vhdxfs
from tests.fuse import nspawn
from tests.helpers import make_image, missing, need_root_fuse, need_tools, qemu_check_clean, run
from vhdxfs.engine import Disk, Kind

MiB, GiB = 1 << 20, 1 << 30
UNIT = "vhdxfs@test.service"
NBD_UNIT = "vhdxfs-nbd@test.service"
NBD_SOCKET = "vhdxfs-nbd@test.socket"
RAW = "/srv/test/raw/disk.raw"
# A syslog-style name in front of a message: what journald puts there already ("vhdxfs[70]: vhdxfs[70]: ...").
NAMED = re.compile(r"^[\w.@-]+\[\d+\]:")


def blocks_of(image: Path) -> int:
    """st_blocks of the raw file: the disk's bytes that hold data, in 512-byte units."""
    disk = Disk.open(image, read_only=True)
    try:
        return sum(e.length for e in disk.extents() if e.kind == Kind.DATA) // 512
    finally:
        disk.close()


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    """A booted container with the units installed, the image of vhdxfs@test at /srv/test/disk.vhdx."""
    need_root_fuse()
    need_tools("systemd-nspawn", "debootstrap", "nsenter", "qemu-img")
    try:
        root, seconds = nspawn.build_rootfs()
    except (nspawn.Unavailable, subprocess.TimeoutExpired) as exc:
        missing(f"no container root file system: {exc}")
    if seconds:
        print(f"\nbuilt the container's root file system in {seconds:.0f} s: {root}", file=sys.stderr)
    work = tmp_path_factory.mktemp("nspawn")
    srv = work / "srv"
    srv.mkdir()
    image = make_image(srv / "disk.vhdx", 1 * GiB)  # 8 MiB blocks
    with vhdxfs.open(image, "r+b") as disk:
        for offset in (0, 512 * MiB, 1016 * MiB):  # three whole blocks: 24 MiB, 49152 sectors
            disk.pwrite(offset, os.urandom(8 * MiB))
    make_image(srv / "nbd.vhdx", 64 * MiB)
    started = time.monotonic()
    try:
        with nspawn.boot(root, [f"--bind={srv}:/srv/test"], work / "console.log") as container:
            print(f"\nthe container booted in {time.monotonic() - started:.1f} s", file=sys.stderr)
            install(container)
            yield container, srv
    except nspawn.Unavailable as exc:
        missing(str(exc))


@pytest.fixture(autouse=True)
def stopped_after(system):
    """Whatever a test left running is stopped, so the next one starts from nothing."""
    yield
    container, _ = system
    container.run("systemctl", "stop", UNIT, NBD_SOCKET, NBD_UNIT, check=False)
    container.run("systemctl", "reset-failed", check=False)


def install(container: nspawn.Container) -> None:
    """The units as shipped; /usr/local/bin/vhdxfs is this checkout's (ExecStart= names that path)."""
    container.run("ln", "-sf", str(nspawn.REPO / ".venv/bin/vhdxfs"), "/usr/local/bin/vhdxfs")
    for unit in ("vhdxfs@.service", "vhdxfs-nbd@.service", "vhdxfs-nbd@.socket"):
        container.run("cp", str(nspawn.REPO / "systemd" / unit), "/etc/systemd/system/")
    container.run("tee", "/etc/vhdxfs/test.conf",
                  input="IMAGES=/srv/test/disk.vhdx\nMOUNTPOINT=/srv/test/raw\nOPTIONS=-o allow_other\n")
    container.run("tee", "/etc/vhdxfs/nbd-test.conf", input="IMAGES=/srv/test/nbd.vhdx\n")
    if any(nspawn.REPO.is_relative_to(tmp) for tmp in ("/tmp", "/var/tmp")):
        # The NBD unit's PrivateTmp=yes hides a checkout under /tmp (a CI clone) from the service; an
        # installed vhdxfs never lives there. The unit keeps PrivateTmp and gets the checkout bound back in.
        container.run("mkdir", "-p", "/etc/systemd/system/vhdxfs-nbd@.service.d")
        container.run("tee", "/etc/systemd/system/vhdxfs-nbd@.service.d/checkout.conf",
                      input=f"[Service]\nBindReadOnlyPaths={nspawn.REPO}\n")
    container.run("systemctl", "daemon-reload")


def show(container: nspawn.Container, unit: str, prop: str) -> str:
    return container.run("systemctl", "show", "-P", prop, unit).stdout.strip()


def first_stat_blocks(container: nspawn.Container) -> int:
    """`ls` of the mount point (a readdirplus, which fills the kernel's attribute cache), then stat."""
    container.run("ls", "-l", "/srv/test/raw")
    return int(container.run("stat", "-c", "%b", RAW).stdout)


def entries_until(container: nspawn.Container, unit: str, after: str, text: str) -> list[dict[str, object]]:
    """The unit's journal entries after ``after``, once one of them says ``text`` (journald may take a moment
    to store what a stream wrote just before its writer exited)."""
    deadline = time.monotonic() + 60
    while True:
        entries = container.journal("-u", unit, after=after)
        if any(text in message(e) for e in entries) or time.monotonic() > deadline:
            return entries
        time.sleep(0.2)


def message(entry: dict[str, object]) -> str:
    value = entry.get("MESSAGE", "")
    return bytes(value).decode(errors="replace") if isinstance(value, list) else str(value)


def check_clean_journal(entries: list[dict[str, object]]) -> None:
    """A clean start-to-stop: systemd's lines and the daemon's, one name each, nothing at error level."""
    shown = "\n".join(f"{e.get('SYSLOG_IDENTIFIER')}[{e.get('_PID')}] <{e.get('PRIORITY')}> {message(e)}"
                      for e in entries)
    assert {e.get("SYSLOG_IDENTIFIER") for e in entries} <= {"systemd", "vhdxfs"}, shown  # ExecStopPost= quiet
    assert not [e for e in entries if int(str(e.get("PRIORITY", 6))) <= 3], shown
    ours = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "vhdxfs"]
    assert ours, shown
    assert not [e for e in ours if NAMED.match(message(e)) or "INFO:" in message(e)], shown
    assert all(str(e.get("PRIORITY")) == "6" for e in ours), shown  # info, as logged (not the stream's default)
    assert any("closed cleanly" in message(e) for e in ours), shown


def test_start_read_write_stop_cleanly(system):
    container, srv = system
    before = container.cursor()
    container.run("systemctl", "start", UNIT)  # Type=notify: returns once READY=1 came, i.e. mounted
    assert show(container, UNIT, "ActiveState") == "active"
    assert show(container, UNIT, "StatusText") == "serving /srv/test/disk.vhdx"
    assert first_stat_blocks(container) == 49152  # the true count, not the whole disk (2097152)
    container.run("sh", "-c", f"head -c {MiB} /dev/zero | tr '\\0' Z | dd of={RAW} bs=1M seek=100 "
                              "conv=notrunc,fsync status=none")
    assert container.run("dd", f"if={RAW}", "bs=1M", "skip=100", "count=1", "status=none").stdout == "Z" * MiB
    container.run("systemctl", "stop", UNIT)
    assert show(container, UNIT, "ActiveState") == "inactive"
    assert container.run("findmnt", "/srv/test/raw", check=False).returncode == 1  # unmounted
    check_clean_journal(entries_until(container, UNIT, before, "closed cleanly"))
    qemu_check_clean(srv / "disk.vhdx")
    with vhdxfs.open(srv / "disk.vhdx", "rb") as disk:
        assert disk.pread(100 * MiB, MiB) == b"Z" * MiB


def test_restart_and_the_first_stat_after_each_start(system):
    container, srv = system
    expected = blocks_of(srv / "disk.vhdx")  # 3 blocks of the start, and the one the first test wrote
    assert expected == 4 * 8 * MiB // 512
    before = container.cursor()
    container.run("systemctl", "start", UNIT)
    assert first_stat_blocks(container) == expected
    first_pid = show(container, UNIT, "MainPID")
    container.run("systemctl", "restart", UNIT)
    assert show(container, UNIT, "ActiveState") == "active"
    assert show(container, UNIT, "MainPID") != first_pid
    assert first_stat_blocks(container) == expected
    container.run("systemctl", "stop", UNIT)
    entries = entries_until(container, UNIT, before, "closed cleanly")
    deadline = time.monotonic() + 60  # both lives' "closed cleanly"
    while sum("closed cleanly" in message(e) for e in entries) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        entries = container.journal("-u", UNIT, after=before)
    check_clean_journal(entries)
    assert sum("closed cleanly" in message(e) for e in entries) == 2
    qemu_check_clean(srv / "disk.vhdx")


def test_a_kill_9_is_cleaned_up_by_exec_stop_post_and_restarted(system):
    container, srv = system
    container.run("systemctl", "start", UNIT)
    killed = show(container, UNIT, "MainPID")
    before = container.cursor()
    container.run("systemctl", "kill", "--kill-who=main", "--signal=SIGKILL", UNIT)
    deadline = time.monotonic() + 120  # RestartSec=5s
    while not (show(container, UNIT, "ActiveState") == "active" and show(container, UNIT, "MainPID") not in
               ("0", killed)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert show(container, UNIT, "ActiveState") == "active", container.run("systemctl", "status", UNIT,
                                                                           check=False).stdout
    assert int(show(container, UNIT, "NRestarts")) >= 1
    # The dead mount was removed (else the new daemon could not have mounted): one vhdxfs mount, alive.
    assert container.run("findmnt", "-rn", "-o", "FSTYPE", "/srv/test/raw").stdout.split() == ["fuse.vhdxfs"]
    assert first_stat_blocks(container) == blocks_of_through_mount(container)
    container.run("systemctl", "stop", UNIT)
    entries = entries_until(container, UNIT, before, "closed cleanly")
    said = [message(e) for e in entries if e.get("SYSLOG_IDENTIFIER") not in ("systemd", "vhdxfs")]
    assert said == [], said  # fusermount3 -uz of the dead mount says nothing; nothing else ran
    assert container.run("vhdxfs", "check", "/srv/test/disk.vhdx").returncode == 0


SEEK_COUNT = f"""
import os
fd = os.open({RAW!r}, os.O_RDONLY)
pos = total = 0
while True:
    try:
        pos = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError:  # ENXIO: no data after pos
        break
    end = os.lseek(fd, pos, os.SEEK_HOLE)
    total, pos = total + end - pos, end
print(total // 512)
"""


def blocks_of_through_mount(container: nspawn.Container) -> int:
    """The raw file's data, as SEEK_DATA/SEEK_HOLE find it through the mount (for a count to compare)."""
    return int(container.run(str(nspawn.REPO / ".venv/bin/python"), "-c", SEEK_COUNT).stdout)


def test_the_nbd_socket_activates_on_the_first_client_and_stops_cleanly(system):
    container, srv = system
    before = container.cursor()
    container.run("systemctl", "start", NBD_SOCKET)
    assert show(container, NBD_UNIT, "ActiveState") == "inactive"  # nothing runs until a client comes
    socket = container.path("/run/vhdxfs/nbd-test.sock")
    info = run("qemu-img", "info", "--output=json", f"nbd+unix:///nbd?socket={socket}")
    assert info.returncode == 0, info.stderr
    assert '"virtual-size": 67108864' in info.stdout
    assert show(container, NBD_UNIT, "ActiveState") == "active"
    container.run("systemctl", "stop", NBD_SOCKET, NBD_UNIT)
    entries = entries_until(container, NBD_UNIT, before, "closed cleanly")
    check_clean_journal(entries)


def probe_devices(container: nspawn.Container, name: str, settings: str) -> str:
    """What a oneshot service with ``settings`` could do: open /dev/fuse, write /dev/null (systemd-run would
    need D-Bus, which the container has not; a unit file in /run needs nothing)."""
    script = ("for d in /dev/fuse /dev/null; do if (exec 3<>$$d) 2>/dev/null; then echo $$d; fi; done "
              f"> /run/{name}.out")
    container.run("tee", f"/run/systemd/system/{name}.service",
                  input=f"[Service]\nType=oneshot\n{settings}\nExecStart=/bin/sh -c '{script}'\n")
    container.run("systemctl", "daemon-reload")
    container.run("systemctl", "start", f"{name}.service")
    return container.run("cat", f"/run/{name}.out").stdout


def test_device_policy_lets_dev_fuse_through_and_nothing_else(system):
    """DevicePolicy=closed with DeviceAllow=/dev/fuse rw, as the unit has it: the container's device cgroup
    refuses /dev/fuse without the DeviceAllow= line and lets it through with it; /dev/null, which "closed"
    always allows, either way. Where the container's cgroups cannot enforce device policies, this says so
    and skips."""
    container, _ = system
    settings = unit_settings_of(container, "DevicePolicy", "DeviceAllow")
    assert settings == "DevicePolicy=closed\nDeviceAllow=/dev/fuse rw", settings  # the unit's own lines
    opened = probe_devices(container, "devices-allowed", settings)
    refused = probe_devices(container, "devices-closed", "DevicePolicy=closed")
    if refused.split() == ["/dev/fuse", "/dev/null"]:
        pytest.skip("this container's cgroups do not enforce device policies: DevicePolicy=closed let "
                    "/dev/fuse through without DeviceAllow=")
    assert (opened.split(), refused.split()) == (["/dev/fuse", "/dev/null"], ["/dev/null"])


def unit_settings_of(container: nspawn.Container, *keys: str) -> str:
    """The lines of the installed vhdxfs@.service that set ``keys``."""
    text = container.run("cat", "/etc/systemd/system/vhdxfs@.service").stdout
    return "\n".join(line for line in text.splitlines() if line.partition("=")[0] in keys)


def test_systemd_analyze_security_rates_the_units(system):
    """Not a figure to hold on to (each systemd version rates differently); shown, and bounded loosely."""
    container, _ = system
    for unit in (UNIT, NBD_UNIT):
        out = container.run("systemd-analyze", "security", "--no-pager", unit, check=False).stdout
        score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
        assert score, out
        print(f"\n{unit}: exposure {score.group(1)}", file=sys.stderr)
        assert float(score.group(1)) < 6.0, out  # below "MEDIUM" exposure's top
