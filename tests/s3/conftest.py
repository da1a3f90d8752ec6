"""The S3 tests' store: a real Ceph RADOS Gateway (tests/s3/rgw.py), one per session, made from an empty
directory and stopped at the end (radosgw, the OSD, the monitor; nothing left running); a bucket of test
images in it; and a fault-injecting proxy (tests/s3/proxy.py) in front of it for the fault tests.

The session's environment points at the gateway (AWS_ENDPOINT_URL and keys), so the CLI run as a child
process, and the daemons it starts, reach it as a user's would. Where the machine cannot run the gateway
(the Ceph packages missing) the tests skip saying why, and fail under VHDXFS_REQUIRE_FUSE=1 (CI).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import make_dirty_image, make_image, missing
from tests.s3.proxy import FaultProxy
from tests.s3.rgw import PACKAGES, Rgw, missing_binaries

SIZE = 64 << 20


@dataclass
class Store:
    rgw: Rgw
    client: object  # a botocore S3 client: what the tests use to look at the store behind vhdxfs's back

    @property
    def bucket(self) -> str:
        return self.rgw.bucket

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, path: Path, key: str) -> str:
        """Upload ``path`` as ``key`` (through vhdxfs's own multipart upload); the object's URL."""
        from vhdxfs.engine import parse_location, upload_file

        upload_file(parse_location(self.url(key)), path, part_size=5 << 20)
        return self.url(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)  # type: ignore[attr-defined]

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()  # type: ignore[attr-defined]

    def etag(self, key: str) -> str:
        return self.client.head_object(Bucket=self.bucket, Key=key)["ETag"]  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def rgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rgw]:
    lacking = missing_binaries()
    if lacking:
        missing(f"the RADOS Gateway tests need {', '.join(lacking)} (Debian: {' '.join(PACKAGES)})")
    try:
        import obstore  # noqa: F401
    except ImportError:
        missing("the S3 client is not installed (pip install '.[s3]')")
    directory = tmp_path_factory.mktemp("rgw")
    gateway = Rgw(directory, memstore_bytes=3 << 30)
    gateway.start()
    saved = {k: os.environ.get(k) for k in gateway.env()}
    os.environ.update(gateway.env())
    try:
        yield gateway
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        gateway.stop()


@pytest.fixture(scope="session")
def store(rgw: Rgw) -> Store:
    import botocore.config
    import botocore.session

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=rgw.endpoint, aws_access_key_id=rgw.access_key, aws_secret_access_key=rgw.secret_key,
        region_name="us-east-1", config=botocore.config.Config(s3={"addressing_style": "path"}))
    client.create_bucket(Bucket=rgw.bucket)
    return Store(rgw, client)


def _fill(path: Path, seed: int, pieces: int = 12) -> None:
    """Random data at random places of the image's virtual disk (some blocks left unallocated)."""
    import vhdxfs

    rnd = random.Random(seed)
    with vhdxfs.open(path, "r+b") as f:
        for _ in range(pieces):
            f.seek(rnd.randrange(0, f.size - (1 << 20)) // 512 * 512)
            f.write(rnd.randbytes(rnd.choice((4096, 65536, 1 << 20))))


@pytest.fixture(scope="session")
def images(store: Store, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """The kinds the issue names, each as a local file and as an object: {kind: (path, url)}."""
    d = tmp_path_factory.mktemp("images")
    out: dict[str, tuple[Path, str]] = {}
    made = {
        "dynamic": make_image(d / "dynamic.vhdx", SIZE, block_size=2 << 20),
        "fixed": make_image(d / "fixed.vhdx", 16 << 20, disk_type="fixed", block_size=1 << 20),
        "4k": make_image(d / "sector4k.vhdx", SIZE, logical_sector_size=4096, block_size=4 << 20),
    }
    for i, path in enumerate(made.values()):
        _fill(path, i)
    made["dirty"] = make_dirty_image(d / "dirty.vhdx", 16 << 20, 3 << 20, random.Random(9).randbytes(70000))
    for kind, path in made.items():
        out[kind] = (path, store.put(path, f"images/{path.name}"))
    return out


@pytest.fixture
def proxy(rgw: Rgw, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """The fault proxy, which this test's S3 clients (and the CLI it runs) go through; tries and timeouts
    short, so a fault test takes seconds."""
    host, port = rgw.endpoint.removeprefix("http://").split(":")
    p = FaultProxy(host, int(port), delay=1.5).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
    monkeypatch.setenv("VHDXFS_S3_TIMEOUT", "1")
    monkeypatch.setenv("VHDXFS_S3_RETRIES", "3")
    try:
        yield p
    finally:
        p.stop()


def wait_until(check: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
