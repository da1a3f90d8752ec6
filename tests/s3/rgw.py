"""A one-node Ceph cluster with a RADOS Gateway, made from an empty directory: the real S3 server the S3
tests (and benchmarks/run-s3) run against.

One monitor, one OSD on memstore (the objects live in the OSD's memory), no cephx, no manager; every
file it makes (configuration, monitor store, sockets, logs) stays inside the directory. ``Rgw.start``
answers once the gateway answers S3 (about 2 s here) with a user and a bucket made; ``Rgw.stop`` stops
the gateway, then the OSD, then the monitor, and waits for each. Run as a script it starts one and
prints its endpoint and keys until interrupted (``python -m tests.s3.rgw DIR``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("ceph-mon", "ceph-osd", "radosgw", "ceph-common")
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")
ACCESS_KEY = "VHDXFSTESTACCESSKEY0"
SECRET_KEY = "vhdxfs-test-secret-key-0000000000000000"
BUCKET = "vhdxfs"


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _config(d: Path, fsid: str, mon_port: int, rgw_port: int, memstore_bytes: int) -> str:
    return f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
ms mon client mode = crc
ms bind msgr1 = false
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
mon cluster log file = {d}/log/cluster.log
pid file = {d}/run/$name.pid
keyring = /dev/null
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
paxos propose interval = 0.05
paxos min wait = 0.01
mon data avail warn = 1
mon data avail crit = 0
debug ms = 0

[mon]
mon data = {d}/mon/$name

[osd]
osd data = {d}/osd/$name
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
osd max object size = {256 << 20}

[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port} tcp_nodelay=1
rgw data = {d}/rgw
rgw thread pool size = 64
rgw enable usage log = false
rgw dns name = localhost
"""


@dataclass
class Rgw:
    """A running one-node cluster with its gateway at ``endpoint``."""

    directory: Path
    memstore_bytes: int = 1 << 30
    endpoint: str = ""
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    bucket: str = BUCKET
    started_in: float = 0.0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.directory / "ceph.conf"

    def env(self) -> dict[str, str]:
        """What a client of this store needs in its environment."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def _run(self, *args: str, timeout: float = 30) -> str:
        out = subprocess.run([*args, "-c", str(self.conf)], capture_output=True, text=True, timeout=timeout,
                             cwd=self.directory)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
        return out.stdout

    def _daemon(self, name: str, *args: str) -> None:
        log = open(self.directory / "log" / f"{name}.out", "wb")  # noqa: SIM115 - the child keeps it
        self.procs[name] = subprocess.Popen([*args, "-f", "-c", str(self.conf)], stdout=log, stderr=log,
                                            cwd=self.directory, start_new_session=True)
        log.close()

    def start(self, timeout: float = 60) -> Rgw:
        t0 = time.monotonic()
        d = self.directory
        for sub in ("run", "log", "mon", "osd", "rgw"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        mon_port, rgw_port = free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{rgw_port}"
        self.conf.write_text(_config(d, fsid, mon_port, rgw_port, self.memstore_bytes))
        try:
            subprocess.run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{mon_port}]",
                            str(d / "monmap")], check=True, capture_output=True, timeout=30)
            self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(d / "monmap"))
            self._daemon("mon", "ceph-mon", "-i", "a")
            osd_uuid = str(uuid.uuid4())
            osd_id = self._run("ceph", "osd", "new", osd_uuid, timeout=timeout).strip()
            (d / "osd" / f"ceph-{osd_id}").mkdir(exist_ok=True)
            (d / "osd" / f"osd.{osd_id}").mkdir(exist_ok=True)
            self._run("ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
            self._daemon("osd", "ceph-osd", "-i", osd_id)
            self._daemon("rgw", "radosgw", "-n", "client.rgw.a")
            self._wait_for_s3(t0 + timeout)
            self._run("radosgw-admin", "user", "create", "--uid", "vhdxfs", "--display-name", "vhdxfs tests",
                      "--access-key", self.access_key, "--secret", self.secret_key)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - t0
        return self

    def _wait_for_s3(self, deadline: float) -> None:
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}): see {self.directory}/log")
            try:
                with urllib.request.urlopen(self.endpoint, timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # any S3 answer (403 for an anonymous list) means it serves
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the RADOS Gateway did not answer at {self.endpoint} in time")
            time.sleep(0.1)

    def stop_gateway(self) -> None:
        """Stop radosgw alone (the store goes away under its clients; the cluster keeps the objects)."""
        proc = self.procs.pop("rgw")
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

    def start_gateway(self, timeout: float = 30) -> None:
        """Start radosgw again, on the same port; returns once it answers."""
        self._daemon("rgw", "radosgw", "-n", "client.rgw.a")
        self._wait_for_s3(time.monotonic() + timeout)

    def stop(self, timeout: float = 30) -> None:
        """Stop radosgw, then the OSD, then the monitor, each waited for (killed when it will not go)."""
        for name in ("rgw", "osd", "mon"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    def __enter__(self) -> Rgw:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/vhdxfs-rgw")
    memstore = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 30
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    with Rgw(directory, memstore_bytes=memstore) as rgw:
        print(f"endpoint {rgw.endpoint} (started in {rgw.started_in:.1f} s)", flush=True)
        for k, v in rgw.env().items():
            print(f"export {k}={v}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
