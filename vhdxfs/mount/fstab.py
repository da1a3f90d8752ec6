"""`mount.fuse.vhdxfs`: the helper mount(8) runs for /etc/fstab entries of type fuse.vhdxfs.

    /srv/vm/disk.vhdx  /srv/vm/raw  fuse.vhdxfs  allow_other,nofail  0 0

mount(8) calls ``mount.fuse.vhdxfs SOURCE TARGET -o OPTIONS``; SOURCE may list several images separated by
colons. Options meant for mount(8) or systemd (defaults, noauto, x-systemd.*, ...) are dropped. The entry
point itself is ``vhdxfs.cli.mount_helper``, which runs the translated command line.
"""

from __future__ import annotations

DROPPED = {"defaults", "rw", "noauto", "auto", "nofail", "_netdev", "user", "users", "nouser", "owner",
           "noatime", "relatime", "atime", "strictatime", "dev", "nodev", "suid", "nosuid", "exec", "noexec",
           "sync", "async", "lazytime", "nolazytime"}


def translate(argv: list[str]) -> list[str]:
    """mount(8)'s arguments -> vhdxfs's: ['src', 'dst', '-o', 'a,b'] -> ['mount', '-o', 'a', 'src', 'dst']."""
    positional: list[str] = []
    options: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            options.extend(next(it, "").split(","))
        elif arg.startswith("-o") and len(arg) > 2:
            options.extend(arg[2:].split(","))
        elif arg in ("-n", "-s", "-f", "-v"):  # mount(8)'s own flags: no mtab, sloppy, fake, verbose
            continue
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise SystemExit("usage: mount.fuse.vhdxfs IMAGE[:IMAGE...] MOUNTPOINT [-o OPTIONS]")
    source, target = positional
    kept = [o for o in options if o and o not in DROPPED and not o.startswith(("x-", "comment="))]
    out = ["mount"]
    if kept:
        out += ["-o", ",".join(kept)]
    return out + source.split(":") + [target]
