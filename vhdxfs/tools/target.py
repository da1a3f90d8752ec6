"""What TARGET names for `vhdxfs status`, `checkpoint`, `checkpoints`, `merge` and `resize`: a running
disk (the daemon that serves it and which of its images), or an image file nobody holds (offline).

TARGET may be a raw file in a mount (MOUNTPOINT/disk.raw), a mount point, an NBD unix socket, an NBD
address (HOST:PORT, [V6]:PORT, tcp:HOST:PORT), a daemon's control socket, or an image file a daemon holds
(any layer of its chain: the daemons' pid records list them, service/records.py). A daemon that serves
several images needs the raw file, or ``--image NAME``, to pick one.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Reason, UsageError, VhdxError
from ..service.records import Holder, daemons

NBD_PORT = 10809
WILDCARDS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class Target:
    """A running disk: the daemon, the image chosen (None: all of them, for status), the raw file named."""

    given: str
    holder: Holder
    image: dict[str, Any] | None
    raw: Path | None = None

    @property
    def control(self) -> Path:
        if self.holder.control is None:
            raise VhdxError(f"{self.holder.describe()} has no control channel (started by an older vhdxfs?); "
                            "restart it to manage it while it runs", path=self.given, errno=errno.EOPNOTSUPP,
                            reason=Reason.UNSUPPORTED)
        return self.holder.control

    @property
    def arguments(self) -> dict[str, Any]:
        """The ``image`` argument of a command for the image chosen."""
        return {"image": self.image["name"]} if self.image is not None else {}

    @property
    def shown(self) -> str:
        """What messages call the disk: the raw file, or the image as served."""
        if self.raw is not None:
            return str(self.raw)
        if self.image is not None and self.holder.kind == "mount":
            return str(Path(self.holder.key) / self.image["name"])
        return str(self.image["image"]) if self.image is not None else self.given


def find(target: str, image: str | None = None, *, need_image: bool = True) -> Target | None:
    """The running disk TARGET names; None when it is an image file no daemon holds; VhdxError otherwise."""
    running = daemons()
    found = _by_path(target, running)
    if found is None and not os.path.lexists(target):
        found = _by_address(target, running)
    if found is None:
        if os.path.isfile(target):
            return None
        raise UsageError("no running vhdxfs daemon serves this: give a raw file in a mount, a mount point, an NBD "
                         "socket or HOST:PORT, or an image a daemon holds", path=target, errno=errno.ENOENT,
                         reason=Reason.NOT_FOUND)
    holder, chosen, raw = found
    if chosen is None:
        chosen = _choose(target, holder, image, need_image)
    elif image is not None and image not in _names(chosen):
        raise UsageError(f"names the image {chosen['name']}, not {image!r}", path=target, field="--image")
    return Target(target, holder, chosen, raw)


def _by_path(target: str, running: list[Holder]) -> tuple[Holder, dict[str, Any] | None, Path | None] | None:
    if not os.path.lexists(target):
        return None
    real = os.path.realpath(target)
    folder = os.path.realpath(os.path.dirname(os.path.abspath(target)))
    for h in running:
        if h.kind == "mount" and h.key == real:
            return h, None, None
        if h.kind == "mount" and h.key == folder:  # a raw file of the mount: found by name, not by stat
            name = os.path.basename(target)
            served = next((i for i in h.images if i.get("name") == name), None)
            if served is None:
                names = ", ".join(str(i.get("name")) for i in h.images)
                raise UsageError(f"no such raw file in the mount (it has {names})", path=target, errno=errno.ENOENT,
                                 reason=Reason.NOT_FOUND)
            return h, served, Path(os.path.abspath(target))
        if h.key == f"unix:{real}" or (h.control is not None and os.path.realpath(h.control) == real):
            return h, None, None
    holders = [(h, served) for h in running if (served := h.holds(target)) is not None]
    if not holders:
        return None
    # A frozen layer is held by the daemon that writes its chain and by any that read it (a backup):
    # the writer is the one a checkpoint, merge or resize is for.
    holders.sort(key=lambda pair: bool(pair[1].get("read-only")))
    return holders[0][0], holders[0][1], None


def _by_address(target: str, running: list[Holder]) -> tuple[Holder, None, None] | None:
    parsed = parse_address(target)
    if parsed is None:
        return None
    host, port = parsed
    for h in running:
        if h.kind != "nbd" or not h.key.startswith("tcp:"):
            continue
        their_host, _, their_port = h.key[4:].rpartition(":")
        if their_port == str(port) and _same_host(host, their_host):
            return h, None, None
    return None


def parse_address(text: str) -> tuple[str, int] | None:
    """HOST:PORT, [V6]:PORT, tcp:HOST[:PORT] -> (host, port); None when it is not one."""
    rest = text.removeprefix("tcp:")
    explicit = rest != text
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else str(NBD_PORT)
    elif rest.count(":") == 1:
        host, _, port = rest.partition(":")
    elif explicit and ":" not in rest:
        host, port = rest, str(NBD_PORT)
    else:
        return None
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def _same_host(a: str, b: str) -> bool:
    if a == b or b in WILDCARDS:
        return True
    try:
        mine = {info[4][0] for info in socket.getaddrinfo(a or None, None, type=socket.SOCK_STREAM)}
        theirs = {info[4][0] for info in socket.getaddrinfo(b, None, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(mine & theirs)


def _names(served: dict[str, Any]) -> set[str]:
    name, image = str(served.get("name")), str(served.get("image"))
    return {name, Path(name).stem, image, Path(image).name, Path(image).stem}


def _choose(target: str, holder: Holder, image: str | None, need_image: bool) -> dict[str, Any] | None:
    if image is not None:
        served = next((i for i in holder.images if image in _names(i) or holder.holds(image) is i), None)
        if served is None:
            raise UsageError(f"{holder.describe()} serves no image {image!r} (it serves {_listing(holder)})",
                             path=target, field="--image", errno=errno.ENOENT, reason=Reason.NOT_FOUND)
        return served
    if len(holder.images) == 1:
        return holder.images[0]
    if need_image:
        raise UsageError(f"{holder.describe()} serves {len(holder.images)} images ({_listing(holder)}); name one with "
                         "--image NAME, or give its raw file", path=target)
    return None


def _listing(holder: Holder) -> str:
    return ", ".join(str(i.get("name")) for i in holder.images) or "none"
