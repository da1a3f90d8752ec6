"""Add a fallocate handler to pyfuse3 3.5.0's sources (it has none), so discard reaches vhdxfs.

Usage: python packaging/patch_pyfuse3.py SRC_DIR   (an unpacked pyfuse3-3.5.0 sdist)

The handler calls ``operations.fallocate(fh, mode, offset, length)`` and answers ENOSYS when the
Operations object has no such method; ``pyfuse3.FALLOCATE_SUPPORTED`` tells a patched build apart.
Every insertion checks its anchor, so a different pyfuse3 version fails loudly instead of silently.
"""

from __future__ import annotations

import sys
from pathlib import Path

HANDLER = '''

cdef void fuse_fallocate (fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                          fuse_file_info *fi):
    cdef _Container c = _Container()
    c.req = req
    c.flags = mode
    c.off = offset
    c.size = <size_t> length
    c.fh = fi.fh
    save_retval(fuse_fallocate_async(c))

async def fuse_fallocate_async (_Container c):
    cdef int ret
    handler = getattr(operations, 'fallocate', None)
    try:
        if handler is None:
            raise FUSEError(errno.ENOSYS)
        await handler(c.fh, c.flags, c.off, c.size)
    except FUSEError as e:
        ret = fuse_reply_err(c.req, e.errno)
    else:
        ret = fuse_reply_err(c.req, 0)

    if ret != 0:
        log.error('fuse_fallocate(): fuse_reply_* failed with %s', strerror(-ret))
'''


def insert_after(path: Path, anchor: str, text: str) -> None:
    source = path.read_text()
    if "fuse_fallocate" in source or "FALLOCATE_SUPPORTED" in source:
        return  # already patched
    if anchor not in source:
        sys.exit(f"patch_pyfuse3: {path}: anchor {anchor!r} not found; is this pyfuse3 3.5.0?")
    path.write_text(source.replace(anchor, anchor + text, 1))


def main(src: str) -> None:
    pkg = Path(src) / "src" / "pyfuse3"
    handlers = pkg / "handlers.pxi"
    if "fuse_fallocate" not in handlers.read_text():
        handlers.write_text(handlers.read_text() + HANDLER)
    insert_after(pkg / "internal.pxi", "    fuse_ops.fsync = fuse_fsync\n", "    fuse_ops.fallocate = fuse_fallocate\n")
    insert_after(pkg / "__init__.pyx", "default_options = frozenset(('default_permissions',))\n",
                 "FALLOCATE_SUPPORTED = True  # patched by vhdxfs: fallocate requests reach Operations\n")
    # The C file shipped in the sdist is stale now; the build regenerates it with Cython.
    (pkg / "__init__.c").unlink(missing_ok=True)


if __name__ == "__main__":
    main(sys.argv[1])
