"""Zero detection at memcmp speed, for the data movers (convert, compact's zero scan).

``bytes.count(0)`` looks at every byte in Python's generic loop (about 1.8 GB/s here); comparing against a
buffer of zeros is a ``memcmp`` (about 10 GB/s), and it stops at the first byte that differs, so data costs
almost nothing and only zeros are read in full. ``ZEROS.startswith(view)`` is that comparison without a
copy: ``bytes.startswith`` takes any buffer and memcmps it, where ``memoryview == ...`` compares item by
item (0.7 GB/s) and ``bytes == memoryview`` falls back to it. ``ZEROS`` is allocated with calloc, so its
pages are the kernel's one zero page: it costs no memory and stays in the CPU's cache.

``data_runs`` is qemu-img convert's ``-S`` (its default, 4 KiB): zero pieces of the sparse size are
skipped, data is written in runs as long as possible. Pieces are aligned on multiples of the size in the
disk's offsets, so what is skipped is the same wherever a buffer begins.
"""

from __future__ import annotations

from ...format.constants import KiB, MiB

ZERO_SPAN = 16 * MiB  # the longest view one comparison takes; longer ones are compared in pieces of this
ZEROS = bytes(ZERO_SPAN)
DEFAULT_SPARSE = 4 * KiB  # qemu-img convert's -S default
_starts_zero = ZEROS.startswith


def is_zero(view: memoryview | bytes | bytearray) -> bool:
    """Does ``view`` hold only zero bytes? (memcmp against ZEROS, stopping at the first that is not)."""
    n = len(view)
    if n <= ZERO_SPAN:
        return _starts_zero(view)
    mv = memoryview(view)
    return all(_starts_zero(mv[pos:pos + ZERO_SPAN]) for pos in range(0, n, ZERO_SPAN))


def data_runs(view: memoryview, offset: int, sparse: int) -> list[tuple[int, int]]:
    """(start, end) within ``view``, which holds the disk's bytes at ``offset``, of the runs to write: all
    of it when ``sparse`` is 0, else everything but the pieces of ``sparse`` bytes (aligned on multiples
    of ``sparse`` in the disk) that hold only zeros. Runs are as long as they can be, in order."""
    n = len(view)
    if sparse <= 0:
        return [(0, n)] if n else []
    if is_zero(view):
        return []
    first = min(n, sparse - offset % sparse)  # the first piece ends on a multiple of ``sparse``
    zs = _starts_zero
    # The pieces that hold only zeros; a list comprehension keeps the usual case (none) fast.
    zero = [0] if zs(view[:first]) else []
    zero += [pos for pos in range(first, n, sparse) if zs(view[pos:pos + sparse])]
    if not zero:
        return [(0, n)]
    runs: list[tuple[int, int]] = []
    start = 0
    for pos in zero:
        if pos > start:
            runs.append((start, pos))
        start = first if pos == 0 else min(n, pos + sparse)
    if start < n:
        runs.append((start, n))
    return runs
