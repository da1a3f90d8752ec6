"""convert both ways: a download from the store is the local conversion, byte for byte and as sparse, for every
kind and for a chain of a local child over a remote base; an upload is a multipart upload whose object reads
as the local conversion; an object already there is refused; a failed upload leaves no object and no
temporary file; the source object is never written (its ETag stays)."""

from __future__ import annotations

import os
import random
import tempfile

import pytest

import vhdxfs
from tests.helpers import vhdxfs as cli

KINDS = ("dynamic", "fixed", "4k", "dirty")


def _key(url: str) -> str:
    return url.split("/", 3)[3]


def _allocated(path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("kind", KINDS)
def test_download_is_the_local_conversion(images, store, tmp_path, kind):
    path, url = images[kind]
    before = store.etag(_key(url))
    cli("convert", path, tmp_path / "local.raw", check=True)
    result = cli("convert", url, tmp_path / "remote.raw")
    assert result.returncode == 0, result.stderr
    local, remote = tmp_path / "local.raw", tmp_path / "remote.raw"
    assert remote.read_bytes() == local.read_bytes()
    # Sparse: the S3 host cannot tell holes, so only the zero scan keeps the download as sparse as the local
    # conversion (which skips the file's holes unread).
    assert _allocated(remote) <= _allocated(local) + (1 << 20) and _allocated(remote) < remote.stat().st_size
    result = cli("convert", url, tmp_path / "remote.vhdx")
    assert result.returncode == 0, result.stderr
    with vhdxfs.open(tmp_path / "remote.vhdx") as f:
        assert f.read() == local.read_bytes()
    assert store.etag(_key(url)) == before


def test_download_of_a_local_child_over_a_remote_base(images, store, tmp_path):
    base, url = images["4k"]
    child = tmp_path / "child.avhdx"
    cli("create", child, "--parent", url, check=True)
    rnd = random.Random(11)
    with vhdxfs.open(child, "r+b") as f:
        for _ in range(10):
            f.seek(rnd.randrange(f.size - 65536) // 4096 * 4096)
            f.write(rnd.randbytes(65536))
    with vhdxfs.open(child) as f:
        expected = f.read()
    result = cli("convert", child, tmp_path / "flat.raw")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "flat.raw").read_bytes() == expected
    # The whole chain into the store, as one VHDX: it reads as the chain did.
    flat = store.url("converted/flat.vhdx")
    result = cli("convert", child, flat)
    assert result.returncode == 0, result.stderr
    with vhdxfs.open(flat) as f:
        assert f.read() == expected
    assert base.exists()


def test_upload_is_multipart_and_reads_as_the_local_conversion(images, store, tmp_path):
    path, _url = images["dynamic"]
    cli("convert", path, tmp_path / "local.raw", check=True)
    local = (tmp_path / "local.raw").read_bytes()
    temporaries = set(os.listdir(tempfile.gettempdir()))
    for name in ("up.raw", "up.vhdx"):
        url = store.url(f"converted/{name}")
        result = cli("convert", path, url)
        assert result.returncode == 0, result.stderr
        etag = store.etag(f"converted/{name}").strip('"')
        assert etag.rpartition("-")[2].isdigit() and int(etag.rpartition("-")[2]) >= 2, etag  # parts: -N
    assert store.get("converted/up.raw") == local
    with vhdxfs.open(store.url("converted/up.vhdx")) as f:
        assert f.read() == local
    assert not {n for n in set(os.listdir(tempfile.gettempdir())) - temporaries if n.startswith("vhdxfs-upload-")}
    # A raw file goes up as it is; an object already there is refused, and left as it was.
    raw_url = store.url("converted/direct.raw")
    cli("convert", tmp_path / "local.raw", raw_url, check=True)
    assert store.get("converted/direct.raw") == local
    before = store.etag("converted/direct.raw")
    again = cli("convert", path, raw_url)
    assert again.returncode != 0 and "already exists" in again.stderr and raw_url in again.stderr
    assert store.etag("converted/direct.raw") == before
    # The store to the store: down into a temporary file, then up.
    copied = store.url("converted/copy.vhdx")
    cli("convert", store.url("converted/up.vhdx"), copied, check=True)
    with vhdxfs.open(copied) as f:
        assert f.read() == local


def test_a_failed_upload_leaves_no_object(images, store, proxy):
    path, _url = images["fixed"]
    proxy.add("500", count=-1, match="PUT")
    url = store.url("converted/failed.vhdx")
    temporaries = set(os.listdir(tempfile.gettempdir()))
    result = cli("convert", path, url)
    assert result.returncode != 0 and url in result.stderr, result.stderr
    assert not {n for n in set(os.listdir(tempfile.gettempdir())) - temporaries if n.startswith("vhdxfs-upload-")}
    assert proxy.injected >= 1
    proxy.clear()
    with pytest.raises(Exception) as caught:
        store.etag("converted/failed.vhdx")
    assert "404" in str(caught.value) or "Not Found" in str(caught.value)
