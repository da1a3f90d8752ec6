"""fio --verify through its nbd engine (a real NBD client, several requests in flight) while checkpoints and
merges (inner and active) run again and again through the server's socket; then a qemu-io pattern written
during the same changes reads back. No verify error, no failed request, every layer clean."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

from tests.fuse.test_live_fio import SECONDS, check_chain, fio_result, fio_verify, ok, operate
from tests.helpers import make_image, need_tools, run, sha256

MiB = 1 << 20


def test_fio_verify_over_nbd_while_the_chain_changes(tmp_path, serve):
    need_tools("fio")
    image = make_image(tmp_path / "disk.vhdx", 512 * MiB, block_size=MiB)
    with serve(image) as server:
        sock = Path(server.address)
        stop, done, errors = threading.Event(), [], []
        fio = fio_verify(server.uri(), size=256 * MiB, seconds=SECONDS, seed=21)
        operator = threading.Thread(target=operate, args=(sock, sock, stop, random.Random(3), done, errors,
                                                           False))
        operator.start()
        job = fio_result(fio)
        stop.set()
        operator.join(timeout=300)
        assert not errors, errors
        assert {"checkpoint", "merge active", "merge inner"} <= set(done), done
        assert job["write"]["total_ios"] > 0 and job["read"]["total_ios"] > 0
        top = Path(json.loads(ok("checkpoints", sock, "--json"))[0]["path"])
        copy = tmp_path / "copy.raw"
        result = run("nbdcopy", server.uri(), copy)  # the disk as a client reads it at the end
        assert result.returncode == 0, result.stderr
    digest = sha256(copy)
    check_chain(top, digest)
