"""A disk served over NBD managed while it runs (`vhdxfs serve`, then status, checkpoint, checkpoints, merge
and resize through the server's socket or address): the clients in status, the export size as of each
connection, a frozen base that serves its chain's top under its own export name."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.helpers import make_image, run, vhdxfs
from tests.nbd.rawclient import RawClient
from vhdxfs.engine import check_image
from vhdxfs.nbd import protocol as p

MiB = 1 << 20


def ok(*args) -> str:
    result = vhdxfs(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def qemu_io(server, *commands: str, read_only: bool = False) -> str:
    args = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for command in commands:
        args += ["-c", command]
    result = subprocess.run([*args, server.uri()], capture_output=True, text=True, timeout=60)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "fail" not in out.lower(), out
    return out


def clean(path: Path) -> None:
    report = check_image(path)
    assert report["status"] == "clean" and not report["errors"], report


def test_status_lists_the_clients_and_a_resize_reaches_new_connections(tmp_path, serve):
    image = make_image(tmp_path / "disk.vhdx", 16 * MiB, block_size=MiB)
    with serve(image) as server:
        with RawClient(server.socket) as before:
            assert before.connect().size == 16 * MiB
            status = json.loads(ok("status", server.socket, "--json"))
            daemon = status["daemon"]
            assert daemon["kind"] == "nbd" and daemon["key"] == f"unix:{server.socket}" and daemon["pid"] > 0
            assert daemon["uptime-seconds"] >= 0
            [disk] = status["images"]
            assert (disk["name"], disk["image"], disk["virtual-size"]) == ("disk", str(image), 16 * MiB)
            [layer] = disk["chain"]
            assert layer["path"] == str(image) and layer["role"] == "top" and layer["file-size"] > 0
            assert {"host-bytes", "allocated-bytes"} <= set(layer)
            assert set(disk["io"]) == {"read", "write", "zero", "flush"}
            assert set(disk["io"]["read"]["latency-us"]) == {"p50", "p90", "p99", "max"}
            assert {"queued-bytes", "limit-bytes"} == set(disk["writeback"])
            assert disk["pending-metadata-pages"] >= 0 and disk["operation"] is None
            [client] = status["clients"]
            assert client["export"] == "disk" and client["size"] == 16 * MiB and client["address"].startswith("unix:")
            assert "resized" in ok("resize", server.socket, "48M")
            # A connection made before keeps the size it was told: its requests stay inside it.
            assert before.read(16 * MiB - 4096, 4096).error == 0
            assert before.read(16 * MiB, 4096).error == p.EINVAL
            assert before.write(20 * MiB, b"x" * 4096).error == p.ENOSPC
            with RawClient(server.socket) as after:
                assert after.connect().size == 48 * MiB
                assert after.write(40 * MiB, b"y" * 4096).error == 0
                sizes = sorted(c["size"] for c in json.loads(ok("status", image, "--json"))["clients"])
                assert sizes == [16 * MiB, 48 * MiB]
            before.disconnect()
        assert run("nbdinfo", "--size", server.uri()).stdout.strip() == str(48 * MiB)
        prometheus = ok("status", server.socket, "--prometheus")
        assert "# TYPE vhdxfs_nbd_clients gauge" in prometheus
    clean(image)


def test_checkpoint_and_merge_of_a_served_disk(tmp_path, serve):
    image = make_image(tmp_path / "disk.vhdx", 32 * MiB, block_size=MiB)
    with serve(image) as server:
        qemu_io(server, "write -P 0x11 0 8M")
        top = Path(ok("checkpoint", server.socket).strip())
        qemu_io(server, "write -P 0x22 4M 2M")
        second = Path(ok("checkpoint", server.socket, "--name", "second").strip())
        qemu_io(server, "write -P 0x33 20M 1M")
        layers = json.loads(ok("checkpoints", server.socket, "--json"))
        assert [layer["path"] for layer in layers] == [str(second), str(top), str(image)]
        ok("merge", server.socket, top.name)  # inner
        ok("merge", image, "second")  # the active top, found through the image the server holds
        assert json.loads(ok("checkpoints", image, "--json"))[0]["path"] == str(image)
        qemu_io(server, "read -P 0x11 0 4M", "read -P 0x22 4M 2M", "read -P 0x11 6M 2M", "read -P 0x33 20M 1M")
    assert not top.exists() and not second.exists()
    clean(image)


def test_a_frozen_base_serves_its_top_under_its_own_name(tmp_path, serve):
    image = make_image(tmp_path / "disk.vhdx", 16 * MiB, block_size=MiB)
    with serve(image) as server:
        qemu_io(server, "write -P 0x44 0 1M")
        top = Path(ok("checkpoint", server.socket).strip())
        qemu_io(server, "write -P 0x55 0 1M")
    with serve(image) as server:  # the unit file still names disk.vhdx
        listing = run("nbdinfo", "--list", "--json", server.uri()).stdout
        [export] = json.loads(listing)["exports"]
        assert export["export-name"] == "disk" and export["description"] == f"{image} (read-write)"
        qemu_io(server, "read -P 0x55 0 1M")
        status = json.loads(ok("status", server.socket, "--json"))
        assert [layer["path"] for layer in status["images"][0]["chain"]] == [str(top), str(image)]
    with serve(image, "-o", "ro") as server:  # read-only: the checkpoint itself
        qemu_io(server, "read -P 0x44 0 1M", read_only=True)
    clean(top)


def test_a_tcp_server_is_found_by_its_address(tmp_path, serve):
    image = make_image(tmp_path / "disk.vhdx", 8 * MiB)
    with serve(image, tcp=True) as server:
        for target in (f"127.0.0.1:{server.port}", f"tcp:localhost:{server.port}"):
            status = json.loads(ok("status", target, "--json"))
            assert status["daemon"]["key"] == f"tcp:127.0.0.1:{server.port}"
        missing = vhdxfs("status", f"127.0.0.1:{server.port + 1}")
        assert missing.returncode == 1 and "no running vhdxfs daemon serves this" in missing.stderr
