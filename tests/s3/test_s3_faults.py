"""Faults of the store under a reader, injected by the proxy in front of the RADOS Gateway (tests/s3/proxy.py)
or made by stopping the gateway itself: 5xx and throttling, slow answers past the timeout, truncated bodies,
answers for another range or for the whole object, the object replaced underneath, the store gone and back.
Every read returns the image's own bytes or fails; no wrong byte is ever returned."""

from __future__ import annotations

import errno

import pytest

import vhdxfs
from tests.s3.conftest import wait_until
from vhdxfs.errors import VhdxError

OFFSETS = [(i * 997 * 4096) % (15 << 20) for i in range(1, 40)]


def _expected(path, offset: int, n: int) -> bytes:
    with vhdxfs.open(path) as f:
        f.seek(offset)
        return f.read(n)


@pytest.mark.parametrize("fault", ["503", "500", "429", "slow", "truncate", "shift", "norange", "down"])
def test_transient_faults_are_retried_and_never_served(images, proxy, fault):
    path, url = images["fixed"]
    with vhdxfs.open(url) as f:
        reads = 2 if fault == "slow" else 6  # each slow one waits out a timeout
        for i, offset in enumerate(OFFSETS[:reads]):
            proxy.add(fault, count=1, match="GET")
            f.seek(offset)
            n = 4096 if i % 2 else 300000
            assert f.read(n) == _expected(path, offset, n), (fault, offset)
    assert proxy.injected >= reads


def test_a_read_that_keeps_failing_is_eio_then_serves_again(images, proxy):
    path, url = images["fixed"]
    with vhdxfs.open(url) as f:
        proxy.add("503", count=-1, match="GET")
        f.seek(OFFSETS[7])
        with pytest.raises(VhdxError) as caught:
            f.read(8192)
        assert caught.value.errno == errno.EIO and "gave up after 4 tries" in str(caught.value)
        proxy.clear()
        f.seek(OFFSETS[7])
        assert f.read(8192) == _expected(path, OFFSETS[7], 8192)


def test_an_object_replaced_underneath_is_refused(images, store, tmp_path):
    path, _url = images["fixed"]
    url = store.put(path, "replaced/dynamic.vhdx")
    with vhdxfs.open(url) as f:
        f.seek(OFFSETS[0])
        assert f.read(4096) == _expected(path, OFFSETS[0], 4096)
        other = bytearray(path.read_bytes())
        other[-(8 << 20):] = bytes(8 << 20)  # the same structures, other payload
        store.put_bytes("replaced/dynamic.vhdx", bytes(other))
        for offset in OFFSETS[1:4]:
            f.seek(offset)
            with pytest.raises(VhdxError) as caught:
                f.read(4096)
            assert caught.value.errno == errno.ESTALE and "changed in the store" in str(caught.value)
        f.seek(OFFSETS[0])  # what was read before stays what it was
        assert f.read(4096) == _expected(path, OFFSETS[0], 4096)


def test_the_store_stopped_and_restarted_under_a_reader(images, rgw, monkeypatch):
    monkeypatch.setenv("VHDXFS_S3_TIMEOUT", "2")
    monkeypatch.setenv("VHDXFS_S3_RETRIES", "2")
    path, url = images["fixed"]
    with vhdxfs.open(url) as f:
        rgw.stop_gateway()
        try:
            f.seek(5 << 20)
            with pytest.raises(VhdxError) as caught:
                f.read(4096)
            assert caught.value.errno == errno.EIO
        finally:
            rgw.start_gateway()
        def reads() -> bool:
            try:
                f.seek(5 << 20)
                return f.read(4096) == _expected(path, 5 << 20, 4096)
            except VhdxError:
                return False
        wait_until(reads)
