"""Boot-time use: the systemd unit is valid, READY=1 reaches systemd once mounted, fstab's helper works."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import make_image, need_tools, qemu_check_clean, run
from vhdxfs.mount.fstab import translate
from vhdxfs.mount.mounts import find_mount, is_dead

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def test_the_template_unit_passes_systemd_analyze_verify(tmp_path):
    need_tools("systemd-analyze")
    vhdxfs_bin = Path(sys.executable).parent / "vhdxfs"
    unit = (REPO / "systemd" / "vhdxfs@.service").read_text().replace("/usr/local/bin/vhdxfs", str(vhdxfs_bin))
    (tmp_path / "vhdxfs@.service").write_text(unit)
    result = run("systemd-analyze", "verify", tmp_path / "vhdxfs@vm1.service")
    assert result.returncode == 0, result.stderr
    assert "vhdxfs@" not in result.stderr, result.stderr  # no complaint about our unit
    broken = unit.replace("Type=notify", "Type=notifyy")
    (tmp_path / "vhdxfs@.service").write_text(broken)
    assert "notifyy" in run("systemd-analyze", "verify", tmp_path / "vhdxfs@vm1.service").stderr


# Options that give a service its own mount namespace; with any of them the FUSE mount would be made inside
# that namespace only, never seen on the host (systemd.exec(5): they "disconnect propagation of mounts from
# the unit's processes to the host").
MOUNT_NAMESPACE_OPTIONS = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
                           "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                           "ProtectControlGroups", "ProtectProc", "ProcSubset", "ReadOnlyPaths", "ReadWritePaths",
                           "InaccessiblePaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths",
                           "MountFlags", "RootDirectory", "RootImage", "PrivateUsers", "DynamicUser", "LogNamespace")


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (REPO / "systemd" / "vhdxfs@.service").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_unit_mounts_on_the_host_stops_cleanly_and_never_leaves_a_stale_mount():
    settings = unit_settings()
    assert not set(settings) & set(MOUNT_NAMESPACE_OPTIONS), set(settings) & set(MOUNT_NAMESPACE_OPTIONS)
    assert settings["Type"] == ["notify"] and settings["NotifyAccess"] == ["main"]
    assert "--foreground" in settings["ExecStart"][0]  # the main process is the one that notifies
    assert settings["KillSignal"] == ["SIGTERM"]  # the daemon's clean unmount-and-close path
    assert any('fusermount3 -uz "$$MOUNTPOINT"' in v for v in settings["ExecStopPost"])
    assert settings["DeviceAllow"] == ["/dev/fuse rw"]
    assert "CAP_SYS_ADMIN" in settings["CapabilityBoundingSet"][0]
    assert "AF_UNIX" in settings["RestrictAddressFamilies"][0]  # syslog and the notify socket


def stop_post_command() -> list[str]:
    """ExecStopPost= as systemd runs it: the "-" dropped (systemd.service(5), "Command lines"), "$$" a "$"."""
    (line,) = unit_settings()["ExecStopPost"]
    return [word.replace("$$", "$") for word in shlex.split(line.removeprefix("-"))]


def test_exec_stop_post_says_nothing_after_a_clean_stop_and_removes_a_dead_mount(tmp_path, mnt):
    """A clean stop has unmounted already: ExecStopPost= must log no false "failed to unmount" then; after a
    kill -9 the dead mount (which stat and mountpoint(1) cannot see) must go, so a restart can mount."""
    need_tools("findmnt", "qemu-img")
    command = stop_post_command()
    assert command[0] == "/bin/sh"
    env = dict(os.environ, MOUNTPOINT=str(mnt.mountpoint))
    quiet = subprocess.run(command, env=env, capture_output=True, text=True)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")  # nothing mounted: nothing said
    image = make_image(tmp_path / "dead.vhdx", 8 * MiB)
    mnt.mount(image)
    os.kill(mnt.daemon_pid(), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not is_dead(mnt.mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert is_dead(mnt.mountpoint)  # "Transport endpoint is not connected"
    cleared = subprocess.run(command, env=env, capture_output=True, text=True)
    assert (cleared.returncode, cleared.stderr) == (0, "")
    assert find_mount(mnt.mountpoint) is None
    assert mnt.mountpoint.is_dir()
    mnt.mounted = False


def test_sd_notify_speaks_to_path_and_abstract_sockets(tmp_path, monkeypatch):
    from vhdxfs.service.notify import sd_notify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False  # not under systemd: nothing to do, no error
    for address in (str(tmp_path / "n.sock"), f"@vhdxfs-test-{os.getpid()}"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        sock.settimeout(5)
        try:
            monkeypatch.setenv("NOTIFY_SOCKET", address)
            assert sd_notify("READY=1\nSTATUS=x") is True
            assert sock.recv(4096) == b"READY=1\nSTATUS=x"
        finally:
            sock.close()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sd_notify("STOPPING=1") is False


def test_ready_and_stopping_reach_the_notify_socket(tmp_path, mnt):
    need_tools("qemu-img")
    image = make_image(tmp_path / "svc.vhdx", 16 * MiB)
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(20)
    env = dict(os.environ, NOTIFY_SOCKET=address)
    daemon = subprocess.Popen([sys.executable, "-m", "vhdxfs.cli", "mount", "--foreground", str(image),
                               str(mnt.mountpoint)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        message = sock.recv(4096).decode()
        assert "READY=1" in message
        assert os.path.ismount(mnt.mountpoint)  # ready means mounted
        (mnt.mountpoint / "svc.raw").open("r+b").write(b"hello")
        daemon.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in sock.recv(4096).decode()
        assert daemon.wait(timeout=30) == 0, daemon.stderr.read()
    finally:
        if daemon.poll() is None:
            daemon.kill()
        sock.close()
    assert not os.path.ismount(mnt.mountpoint)
    qemu_check_clean(image)


def test_the_fstab_helper_translates_mount_arguments():
    assert translate(["/srv/a.vhdx", "/mnt/a", "-o", "rw,noauto,allow_other,x-systemd.automount"]) == \
        ["mount", "-o", "allow_other", "/srv/a.vhdx", "/mnt/a"]
    assert translate(["/a.vhdx:/b.vhdx", "/m", "-o", "ro", "-n"]) == ["mount", "-o", "ro", "/a.vhdx", "/b.vhdx", "/m"]
    assert translate(["/a.vhdx", "/m"]) == ["mount", "/a.vhdx", "/m"]
    assert translate(["/a.vhdx", "/m", "-ouid=1000,gid=100,defaults,comment=x", "-v"]) == \
        ["mount", "-o", "uid=1000,gid=100", "/a.vhdx", "/m"]


def test_the_fstab_helper_mounts_like_mount_8_would(tmp_path, mnt):
    image = make_image(tmp_path / "boot.vhdx", 8 * MiB)
    helper = Path(sys.executable).parent / "mount.fuse.vhdxfs"
    result = run(helper, image, mnt.mountpoint, "-o", "rw,nofail,_netdev")
    assert result.returncode == 0, result.stderr
    assert (mnt.mountpoint / "boot.raw").stat().st_size == 8 * MiB
    mnt.umount()
