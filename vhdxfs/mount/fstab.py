"""`mount.fuse.vhdxfs`: the helper mount(8) runs for /etc/fstab entries of type fuse.vhdxfs.

    /srv/vm/disk.vhdx  /srv/vm/raw  fuse.vhdxfs  allow_other,nofail  0 0

mount(8) calls ``mount.fuse.vhdxfs SOURCE TARGET -o OPTIONS``; SOURCE may list several images separated by
colons. Options meant for mount(8) or systemd (defaults, noauto, x-systemd.*, ...) are dropped. The entry
point itself is ``vhdxfs.cli.mount_helper``, which runs the translated command line.
"""

from __future__ import annotations

import argparse

DROPPED = {"defaults", "rw", "noauto", "auto", "nofail", "_netdev", "user", "users", "nouser", "owner",
           "noatime", "relatime", "atime", "strictatime", "dev", "nodev", "suid", "nosuid", "exec", "noexec",
           "sync", "async", "lazytime", "nolazytime"}


def parser() -> argparse.ArgumentParser:
    """mount(8)'s way of calling the helper (also the source of mount.fuse.vhdxfs(8))."""
    p = argparse.ArgumentParser(
        prog="mount.fuse.vhdxfs",
        description="The helper mount(8) runs for /etc/fstab entries of type fuse.vhdxfs, for example "
                    "'/srv/vm/disk.vhdx /srv/vm/raw fuse.vhdxfs allow_other,nofail 0 0'. It runs 'vhdxfs mount' "
                    "with the options meant for vhdxfs; those meant for mount(8) or systemd (defaults, noauto, "
                    "nofail, _netdev, x-systemd.*, comment=...) are dropped.")
    p.add_argument("source", metavar="IMAGE[:IMAGE...]", help="one image, or several separated by colons")
    p.add_argument("target", metavar="MOUNTPOINT")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="comma-separated options, as in fstab's fourth field (see vhdxfs(1), mount)")
    for flag, what in (("-n", "no mtab"), ("-s", "sloppy"), ("-f", "fake"), ("-v", "verbose")):
        p.add_argument(flag, action="store_true", help=f"mount(8)'s own flag ({what}): accepted and ignored")
    return p


def translate(argv: list[str]) -> list[str]:
    """mount(8)'s arguments -> vhdxfs's: ['src', 'dst', '-o', 'a,b'] -> ['mount', '-o', 'a', 'src', 'dst']."""
    args = parser().parse_args(argv)
    groups: list[str] = args.options
    source: str = args.source
    target: str = args.target
    options = [o for group in groups for o in group.split(",")]
    kept = [o for o in options if o and o not in DROPPED and not o.startswith(("x-", "comment="))]
    out = ["mount"]
    if kept:
        out += ["-o", ",".join(kept)]
    return out + source.split(":") + [target]
