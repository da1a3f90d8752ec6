"""The S3 client libraries side by side against one store (benchmarks/run-s3 --clients): import time (a
fresh interpreter, median of 5), the latency of a 4 KiB ranged GET (median and p90 of 200, one thread), and
the aggregate rate of 64 KiB ranged GETs from 8 threads (2 s). The figures behind the README's choice."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

IMPORTS = {"botocore": "import botocore.session", "boto3": "import boto3", "minio": "import minio",
           "obstore": "import obstore.store"}


def import_ms(stmt: str, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", stmt], check=True)
        times.append(time.perf_counter() - t)
    base = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        base.append(time.perf_counter() - t)
    return (statistics.median(times) - statistics.median(base)) * 1000


def getters(bucket: str, key: str) -> dict[str, Callable[[], Callable[[int, int], bytes]]]:
    endpoint = os.environ["AWS_ENDPOINT_URL"]

    def botocore_get() -> Callable[[int, int], bytes]:
        import botocore.config
        import botocore.session
        client = botocore.session.get_session().create_client(
            "s3", config=botocore.config.Config(max_pool_connections=16, s3={"addressing_style": "path"}))
        return lambda off, n: client.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{off + n - 1}")[
            "Body"].read()

    def minio_get() -> Callable[[int, int], bytes]:
        import minio
        import urllib3
        host = endpoint.split("://", 1)[1]
        client = minio.Minio(host, access_key=os.environ["AWS_ACCESS_KEY_ID"],
                             secret_key=os.environ["AWS_SECRET_ACCESS_KEY"], secure=endpoint.startswith("https"),
                             region="us-east-1", http_client=urllib3.PoolManager(maxsize=16))

        def get(off: int, n: int) -> bytes:
            r = client.get_object(bucket, key, offset=off, length=n)
            try:
                return r.read()
            finally:
                r.release_conn()
        return get

    def obstore_get() -> Callable[[int, int], bytes]:
        import obstore
        from obstore.store import S3Store
        store = S3Store(bucket, endpoint=endpoint, region="us-east-1", client_options={"allow_http": True},
                        virtual_hosted_style_request=False)
        return lambda off, n: bytes(obstore.get_range(store, key, start=off, length=n))

    return {"botocore": botocore_get, "minio": minio_get, "obstore": obstore_get}


def latency(get: Callable[[int, int], bytes], size: int, n: int = 200) -> tuple[float, float]:
    import random
    rnd = random.Random(1)
    times = []
    for _ in range(n):
        off = rnd.randrange(0, size - 4096) // 4096 * 4096
        t = time.perf_counter()
        assert len(get(off, 4096)) == 4096
        times.append(time.perf_counter() - t)
    times.sort()
    return statistics.median(times) * 1e3, times[int(0.9 * n)] * 1e3


def throughput(get: Callable[[int, int], bytes], size: int, threads: int = 8, seconds: float = 2.0) -> float:
    done = [0] * threads
    stop = time.monotonic() + seconds

    def work(i: int) -> None:
        off = i * (64 << 10)
        while time.monotonic() < stop:
            got = get(off % (size - (64 << 10)), 64 << 10)
            done[i] += len(got)
            off += threads * (64 << 10)
    t = time.monotonic()
    ws = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    return sum(done) / (time.monotonic() - t) / 2**20


def main(bucket: str, key: str, size: int) -> None:
    for name, stmt in IMPORTS.items():
        print(f"import {name}: {import_ms(stmt):.0f} ms", flush=True)
    for name, make in getters(bucket, key).items():
        get = make()
        get(0, 4096)
        p50, p90 = latency(get, size)
        rate = throughput(get, size)
        print(f"{name}: 4 KiB ranged GET median {p50:.2f} ms, p90 {p90:.2f} ms; 8 threads x 64 KiB: "
              f"{rate:.0f} MiB/s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
