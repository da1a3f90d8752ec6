"""`vhdxfs status --prometheus`: a daemon's status in Prometheus' text exposition format (version 0.0.4).

Counters per image and kind of request (read, write, zero, flush): requests, bytes, failures. Latency as a
histogram per image and kind, from the engine's power-of-two buckets as they are (engine/aio/stats.py:
``le`` is each bucket's upper edge, 1 us to 2^31 us); the engine counts no sum of latencies, so there is
no ``_sum`` series (rate(_count) and histogram_quantile work without it). Gauges: the virtual size, the
layers of the chain and the bytes each holds, the write-back queue, the metadata waiting for a flush,
requests in flight, whether a live operation runs and how far it is, the NBD clients connected.

Every series carries ``image`` (the raw file or export name); the daemon's identity is on ``vhdxfs_daemon_info``.
"""

from __future__ import annotations

from typing import Any

BUCKETS = 32  # as engine/aio/stats.py counts them


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, object]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_label(value)}"' for key, value in labels.items()) + "}"


class _Families:
    """Samples grouped by metric family, each family written once with its HELP and TYPE."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.meta: dict[str, tuple[str, str]] = {}
        self.samples: dict[str, list[str]] = {}

    def add(self, family: str, kind: str, help_text: str, labels: dict[str, object], value: float,
            suffix: str = "") -> None:
        if family not in self.meta:
            self.order.append(family)
            self.meta[family] = (kind, help_text)
            self.samples[family] = []
        number = repr(float(value)) if isinstance(value, float) else str(int(value))
        self.samples[family].append(f"{family}{suffix}{_labels(labels)} {number}")

    def text(self) -> str:
        out = []
        for family in self.order:
            kind, help_text = self.meta[family]
            out += [f"# HELP {family} {help_text}", f"# TYPE {family} {kind}", *self.samples[family]]
        return "\n".join(out) + "\n"


def exposition(status: dict[str, Any]) -> str:
    """The status (the control channel's ``status`` answer) as Prometheus text."""
    f = _Families()
    d = status["daemon"]
    f.add("vhdxfs_daemon_info", "gauge", "The daemon serving the disks (always 1).",
          {"kind": d["kind"], "key": d["key"], "pid": d["pid"], "version": d["version"]}, 1)
    f.add("vhdxfs_daemon_start_time_seconds", "gauge", "When the daemon started (Unix time).", {}, float(d["started"]))
    for image in status["images"]:
        _image(f, image)
    if "clients" in status:
        f.add("vhdxfs_nbd_clients", "gauge", "NBD connections open now.", {}, len(status["clients"]))
    return f.text()


def _image(f: _Families, image: dict[str, Any]) -> None:
    own = {"image": image["name"]}
    for kind, io in image["io"].items():
        labels = {**own, "kind": kind}
        f.add("vhdxfs_requests_total", "counter", "Requests served, by kind (zero: discards and write-zeroes).",
              labels, io["requests"])
        f.add("vhdxfs_bytes_total", "counter", "Bytes of the requests served, by kind.", labels, io["bytes"])
        f.add("vhdxfs_request_failures_total", "counter", "Requests that failed, by kind.", labels, io["failures"])
        counts = {int(edge): n for edge, n in io["buckets-us"].items()}
        seen = 0
        for i in range(BUCKETS):
            seen += counts.get(1 << i, 0)
            f.add("vhdxfs_request_duration_seconds", "histogram", "Time to serve a request, by kind (power-of-two "
                  "buckets; no _sum: the engine counts buckets only).", {**labels, "le": repr((1 << i) / 1e6)},
                  seen, "_bucket")
        f.add("vhdxfs_request_duration_seconds", "histogram", "", {**labels, "le": "+Inf"}, io["requests"], "_bucket")
        f.add("vhdxfs_request_duration_seconds", "histogram", "", labels, io["requests"], "_count")
    f.add("vhdxfs_virtual_size_bytes", "gauge", "The virtual size of the disk.", own, image["virtual-size"])
    f.add("vhdxfs_read_only", "gauge", "1 when the disk is served read-only.", own, int(image["read-only"]))
    f.add("vhdxfs_chain_layers", "gauge", "Files in the disk's chain (1: no checkpoints).", own, len(image["chain"]))
    for layer in image["chain"]:
        labels = {**own, "layer": layer["path"], "role": layer["role"], "depth": layer["depth"]}
        f.add("vhdxfs_layer_allocated_bytes", "gauge", "Bytes of the virtual disk a layer holds itself.", labels,
              layer["allocated-bytes"])
        if "host-bytes" in layer:
            f.add("vhdxfs_layer_host_bytes", "gauge", "Bytes a layer's file takes on the host.", labels,
                  layer["host-bytes"])
    wb = image["writeback"]
    f.add("vhdxfs_writeback_queued_bytes", "gauge", "Acknowledged writes waiting for the image file.", own,
          wb["queued-bytes"])
    f.add("vhdxfs_writeback_limit_bytes", "gauge", "How much the write-back queue may hold.", own, wb["limit-bytes"])
    f.add("vhdxfs_pending_metadata_pages", "gauge", "Metadata pages waiting for the next flush.", own,
          image["pending-metadata-pages"])
    f.add("vhdxfs_requests_in_flight", "gauge", "Requests being served now.", own, image["requests-inside"])
    f.add("vhdxfs_paused", "gauge", "1 while a live operation holds new requests.", own, int(image["paused"]))
    op = image["operation"]
    f.add("vhdxfs_operation_running", "gauge", "1 while a live operation (checkpoint, merge, resize) runs.",
          {**own, "operation": op["operation"] if op else ""}, int(op is not None))
    f.add("vhdxfs_operation_done_bytes", "gauge", "Bytes of the live operation's work done.", own,
          op["done-bytes"] if op else 0)
    f.add("vhdxfs_operation_total_bytes", "gauge", "Bytes of the live operation's work in all (0: unknown).", own,
          op["total-bytes"] if op else 0)
