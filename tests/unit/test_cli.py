"""The command-line contract: one-line errors naming the file, exit codes, sizes with suffixes, --json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import vhdxfs
from vhdxfs.engine import Disk, ImageSpec, create_image
from vhdxfs.errors import UsageError
from vhdxfs.sizes import format_size, parse_size


@pytest.mark.parametrize("text,value", [("4096", 4096), ("512M", 512 << 20), ("10G", 10 << 30), ("2T", 2 << 40),
                                        ("1.5K", 1536), ("64MiB", 64 << 20), ("3g", 3 << 30)])
def test_sizes_take_binary_suffixes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "ten", "1.3", "5X", "-1G"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(UsageError):
        parse_size(text)


def test_format_size():
    assert format_size(1 << 20) == "1 MiB" and format_size(1536) == "1.5 KiB" and format_size(7) == "7 B"


def test_errors_are_one_line_with_the_file_and_exit_1(tmp_path):
    missing = tmp_path / "nope.vhdx"
    result = vhdxfs("info", missing)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"vhdxfs: {missing}: ")
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = vhdxfs("--debug", "info", tmp_path / "nope.vhdx")
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_create_refuses_to_overwrite(tmp_path):
    img = tmp_path / "a.vhdx"
    assert vhdxfs("create", img, "--size", "10M").returncode == 0
    result = vhdxfs("create", img, "--size", "10M")
    assert result.returncode == 1 and "already exists" in result.stderr


@pytest.mark.parametrize("args,field", [(["--size", "65T"], "--size"), (["--size", "1G", "--block-size", "3M"],
                                                                          "--block-size"),
                                        (["--size", "lots"], "--size"), ([], "--size")])
def test_create_explains_bad_arguments(tmp_path, args, field):
    result = vhdxfs("create", tmp_path / "b.vhdx", *args)
    assert result.returncode == 1 and field in result.stderr, result.stderr
    assert not (tmp_path / "b.vhdx").exists()


def test_info_json_describes_the_image(tmp_path):
    img = tmp_path / "c.vhdx"
    assert vhdxfs("create", img, "--size", "2G", "--block-size", "4M").returncode == 0
    result = vhdxfs("info", img, "--json")
    info = json.loads(result.stdout)
    assert info["virtual-size"] == 2 << 30 and info["block-size"] == 4 << 20
    assert info["type"] == "dynamic" and info["log-state"] == "clean" and info["allocated-bytes"] == 0
    human = vhdxfs("info", img).stdout
    assert "virtual size: 2 GiB (2147483648 bytes)" in human


def test_check_exit_codes(tmp_path):
    img = tmp_path / "d.vhdx"
    assert vhdxfs("create", img, "--size", "64M").returncode == 0
    assert vhdxfs("check", img).returncode == 0
    report = json.loads(vhdxfs("check", img, "--json").stdout)
    assert report["status"] == "clean"
    # A BAT entry pointing past the end of the file makes the image inconsistent (exit 2).
    from vhdxfs.engine.image import VhdxFile

    image = VhdxFile.open(img, read_only=True)
    bat_offset = image.bat.region_offset
    image.close()
    with open(img, "r+b") as f:
        f.seek(bat_offset)
        f.write((6 | (4096 << 20)).to_bytes(8, "little"))
    result = vhdxfs("check", img)
    assert result.returncode == 2 and "BAT" in result.stdout
    # A file that is not there cannot be checked at all (exit 1).
    assert vhdxfs("check", tmp_path / "none.vhdx").returncode == 1
    not_vhdx = tmp_path / "x.raw"
    not_vhdx.write_bytes(bytes(2 << 20))
    assert vhdxfs("check", not_vhdx).returncode == 1


@pytest.mark.parametrize("command", [["map"], ["map", "--json"], ["info", "--json"], ["check", "--json"]])
def test_a_reader_that_closes_the_pipe_early_ends_the_command_quietly(tmp_path, command):
    """`vhdxfs map IMAGE | head`: no "Broken pipe" line, the exit status of a command killed by SIGPIPE."""
    image = tmp_path / "sparse.vhdx"
    create_image(image, ImageSpec(8 << 30, block_size=1 << 20))
    with Disk.open(image) as disk:
        for i in range(0, 8 << 10, 2):  # every other MiB: thousands of extents, more than a pipe holds
            disk.write(i << 20, b"x")
    cli = " ".join([sys.executable, "-m", "vhdxfs.cli", *command, str(image)])
    result = subprocess.run(["bash", "-c", f"{cli} | head -c 10 >/dev/null; echo ${{PIPESTATUS[0]}} >&2"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.stderr.strip() in ("141", "0"), result.stderr
    assert "Broken pipe" not in result.stderr


ROOT = Path(__file__).resolve().parents[2]
