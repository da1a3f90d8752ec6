"""I/O counters of a running disk: requests, bytes, failures and latency per kind, for ``vhdxfs status``.

Latency goes into power-of-two buckets of 1.024 us units (bucket i holds [2**(i-1), 2**i) units; bucket 0
under one), so counting costs a shift, an int's bit_length and a list increment on every request, memory
stays a few hundred bytes whatever the uptime, and percentiles are read off the buckets (the upper edge
of the bucket the rank falls in: at most twice the true value). Prometheus histograms take the same
buckets as they are. Reports say microseconds and round the unit (2.4% off, well inside a bucket).
"""

from __future__ import annotations

from typing import Any

BUCKETS = 32  # up to 2**31 us (about 36 minutes); slower requests count in the last bucket
KINDS = ("read", "write", "zero", "flush")  # zero: discards and write-zeroes


class KindStats:
    """The counters of one kind of request."""

    __slots__ = ("requests", "bytes", "failures", "buckets", "max_ns")

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.failures = 0
        self.buckets = [0] * BUCKETS
        self.max_ns = 0

    def add(self, nbytes: int, nanoseconds: int) -> None:
        self.requests += 1
        self.bytes += nbytes
        i = (nanoseconds >> 10).bit_length()
        self.buckets[i if i < BUCKETS else BUCKETS - 1] += 1
        if nanoseconds > self.max_ns:
            self.max_ns = nanoseconds

    @property
    def max_us(self) -> int:
        return self.max_ns // 1000

    def percentile(self, fraction: float) -> int:
        """The upper edge (us) of the bucket that holds the request at ``fraction`` of the count."""
        rank = fraction * self.requests
        seen = 0
        for i, n in enumerate(self.buckets):
            seen += n
            if n and seen >= rank:
                return min(1 << i, self.max_us) if i else 1
        return 0

    def snapshot(self) -> dict[str, Any]:
        return {"requests": self.requests, "bytes": self.bytes, "failures": self.failures,
                "latency-us": {"p50": self.percentile(0.5), "p90": self.percentile(0.9),
                               "p99": self.percentile(0.99), "max": self.max_us},
                "buckets-us": {str(1 << i): n for i, n in enumerate(self.buckets) if n}}


class IOStats:
    """Per kind of request (``KINDS``)."""

    __slots__ = ("read", "write", "zero", "flush")

    def __init__(self) -> None:
        self.read = KindStats()
        self.write = KindStats()
        self.zero = KindStats()
        self.flush = KindStats()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {kind: getattr(self, kind).snapshot() for kind in KINDS}
