"""Images in the store read as their local copies do, byte for byte, through info, check, map and the Python
API: dynamic, fixed, 4K-sector, a dirty log (replayed in memory), and a chain of a local child over a remote
base; a read-only use never writes the object (its ETag stays); a writable use of an object is refused."""

from __future__ import annotations

import json
import random

import pytest

import vhdxfs
from tests.helpers import vhdxfs as cli
from vhdxfs.errors import Reason, VhdxError

KINDS = ("dynamic", "fixed", "4k", "dirty")


def _key(url: str) -> str:
    return url.split("/", 3)[3]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_reads_as_its_local_copy(images, store, kind):
    path, url = images[kind]
    before = store.etag(_key(url))
    with vhdxfs.open(url) as remote, vhdxfs.open(path) as here:
        assert remote.size == here.size
        assert remote.read() == here.read()
        assert [str(p) for p in remote.chain()] == [url]
    local_info = json.loads(cli("info", "--json", path, check=True).stdout)
    remote_info = json.loads(cli("info", "--json", url, check=True).stdout)
    for field in ("type", "virtual-size", "block-size", "logical-sector-size", "data-write-guid", "log-state",
                  "allocated-bytes", "file-size"):
        assert remote_info[field] == local_info[field], field
    assert remote_info["etag"] == before
    if kind == "dirty":
        assert remote_info["log-dirty"] and remote_info["log-entries-to-replay"] >= 1
    checked = cli("check", url)
    assert checked.returncode == 0, checked.stderr
    local_map = json.loads(cli("map", "--json", path, check=True).stdout)
    remote_map = json.loads(cli("map", "--json", url, check=True).stdout)
    assert [{k: v for k, v in e.items() if k != "layer"} for e in remote_map] == \
        [{k: v for k, v in e.items() if k != "layer"} for e in local_map]
    assert store.etag(_key(url)) == before  # read-only use never writes the object


def test_random_reads_match(images):
    path, url = images["dynamic"]
    rnd = random.Random(3)
    with vhdxfs.open(url) as remote, vhdxfs.open(path) as here:
        for _ in range(200):
            off = rnd.randrange(remote.size - 8192)
            n = rnd.choice((1, 512, 4096, 5000, 70000))
            remote.seek(off)
            here.seek(off)
            assert remote.read(n) == here.read(n)


def test_writable_open_of_an_object_is_refused(images):
    _path, url = images["dynamic"]
    with pytest.raises(VhdxError) as caught:
        vhdxfs.open(url, "r+b")
    assert caught.value.reason == Reason.READ_ONLY
    assert url in str(caught.value) and "child" in str(caught.value)
    result = cli("resize", url, "128M")
    assert result.returncode != 0


def test_missing_object_and_bad_url(store):
    result = cli("info", store.url("no/such.vhdx"))
    assert result.returncode == 1 and "no such object" in result.stderr and "s3://" in result.stderr
    result = cli("info", "s3://bucketonly")
    assert result.returncode == 1 and "s3://BUCKET/KEY" in result.stderr


def test_local_child_over_remote_base(images, store, tmp_path):
    base, url = images["dynamic"]
    before = store.etag(_key(url))
    child = tmp_path / "child.avhdx"
    made = cli("create", child, "--parent", url)
    assert made.returncode == 0, made.stderr
    info = json.loads(cli("info", "--json", child, check=True).stdout)
    locator = info["parent-locator"]
    assert locator["url"] == url and locator["relative_path"] == ".\\dynamic.vhdx"
    assert locator["absolute_win32_path"] == str(tmp_path / "dynamic.vhdx").replace("/", "\\")
    assert info["parents"] == [url]
    with vhdxfs.open(base) as f:
        expected = bytearray(f.read())
    rnd = random.Random(5)
    with vhdxfs.open(child, "r+b") as f:
        for _ in range(20):
            off = rnd.randrange(f.size - 70000)
            data = rnd.randbytes(rnd.choice((512, 4096, 65536)))
            f.seek(off)
            f.write(data)
            expected[off:off + len(data)] = data
    with vhdxfs.open(child) as f:
        assert f.read() == bytes(expected)
    assert cli("check", child).returncode == 0
    layers = {e["layer"] for e in json.loads(cli("map", "--json", child, check=True).stdout) if e["data"]}
    assert layers == {str(child), url}, layers  # the child's own blocks and the remote base's
    assert store.etag(_key(url)) == before
    # A downloaded copy of the parent next to the child is what relative_path finds: it wins over the URL.
    (tmp_path / "dynamic.vhdx").write_bytes(base.read_bytes())
    info = json.loads(cli("info", "--json", child, check=True).stdout)
    assert info["parents"] == [str(tmp_path / "dynamic.vhdx")]
    with vhdxfs.open(child) as f:
        assert f.read() == bytes(expected)


def test_remote_child_finds_its_remote_parent(images, store, tmp_path):
    """A chain wholly in the store: the child's relative_path resolves against its key's folder."""
    base, url = images["dynamic"]
    child = tmp_path / "inbucket.avhdx"
    cli("create", child, "--parent", url, check=True)
    with vhdxfs.open(child, "r+b") as f:
        f.seek(12345 * 512)
        f.write(b"remote child" * 100)
    child_url = store.put(child, "images/inbucket.avhdx")
    with vhdxfs.open(child_url) as remote, vhdxfs.open(child) as here:
        assert remote.read() == here.read()
        assert [str(p) for p in remote.chain()] == [child_url, url]


def test_parent_not_found_says_why_each_candidate_failed(images, store, tmp_path):
    """A child whose remote parent is gone names every place tried and, for the object, why it failed."""
    base, _url = images["dynamic"]
    url = store.put(base, "gone/base.vhdx")
    child = tmp_path / "orphan.avhdx"
    cli("create", child, "--parent", url, check=True)
    store.client.delete_object(Bucket=store.bucket, Key="gone/base.vhdx")  # type: ignore[attr-defined]
    with pytest.raises(VhdxError) as caught:
        vhdxfs.open(child)
    message = str(caught.value)
    assert "parent not found" in message and str(tmp_path / "base.vhdx") in message
    assert f"{url} (" in message and "no such object" in message, message
    described = cli("info", child, check=True)  # info still describes the child, saying what it lacks
    assert "no such object" in described.stdout


def test_a_remote_parent_is_verified_by_its_data_write_guid(images, store, tmp_path):
    """Another image put at the parent's key (same size and sectors) is refused, not read as the parent."""
    base, _url = images["dynamic"]
    url = store.put(base, "linkage/base.vhdx")
    child = tmp_path / "child.avhdx"
    cli("create", child, "--parent", url, check=True)
    with vhdxfs.open(child) as f:
        assert f.read(4096) == base_read(base, 4096)
    other = tmp_path / "other.vhdx"
    cli("convert", base, other, check=True)  # the same contents, its own DataWriteGuid
    store.put(other, "linkage/base.vhdx")
    with pytest.raises(VhdxError) as caught:
        vhdxfs.open(child)
    assert "DataWriteGuid" in str(caught.value) and url in str(caught.value)


def base_read(path, n: int) -> bytes:
    with vhdxfs.open(path) as f:
        return f.read(n)
