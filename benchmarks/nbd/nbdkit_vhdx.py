"""nbdkit Python plugin over vhdxfs's synchronous engine: the prototype the NBD server was measured against.

    nbdkit --unix SOCK python benchmarks/nbd/nbdkit_vhdx.py image=disk.vhdx [readonly=1]

nbdkit brings the protocol, TLS and socket activation; each request calls into Python from one of nbdkit's
threads, where vhdxfs.engine.Disk does the I/O in that thread (docs/performance.md, "NBD", has the figures
that decided for the trio server inside the daemon instead).
"""

import nbdkit

from vhdxfs.engine import Disk, Kind

API_VERSION = 2
_image = None
_disk = None


def config(key, value):
    global _image
    if key == "image":
        _image = value
    else:
        raise RuntimeError(f"unknown parameter {key}")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def get_ready():
    global _disk
    _disk = Disk.open(_image)


def unload():
    if _disk is not None:
        _disk.close()


def open(readonly):
    return 1


def get_size(h):
    return _disk.size


def can_multi_conn(h):
    return True


def can_write(h):
    return True


def can_flush(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_extents(h):
    return True


def pread(h, buf, offset, flags):
    buf[:] = _disk.read(offset, len(buf))


def pwrite(h, buf, offset, flags):
    _disk.write(offset, buf)
    if flags & nbdkit.FLAG_FUA:
        _disk.flush()


def flush(h, flags):
    _disk.flush()


def trim(h, count, offset, flags):
    _disk.discard(offset, count)


def zero(h, count, offset, flags):
    _disk.write_zeroes(offset, count, unmap=bool(flags & nbdkit.FLAG_MAY_TRIM))


def extents(h, count, offset, flags):
    return [(e.offset, e.length, 0 if e.kind == Kind.DATA else nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)
            for e in _disk.extents(offset, count)]
