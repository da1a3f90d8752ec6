"""Patch pyfuse3 3.5.0's sources for vhdxfs: a fallocate handler, and a request loop with less overhead.

Usage: python packaging/patch_pyfuse3.py SRC_DIR   (an unpacked pyfuse3-3.5.0 sdist)

1. fallocate: pyfuse3 has no handler, so discard could not reach vhdxfs. The handler calls
   ``operations.fallocate(fh, mode, offset, length)`` and answers ENOSYS when the Operations object has
   no such method; ``pyfuse3.FALLOCATE_SUPPORTED`` tells a patched build apart.
2. session loop: pyfuse3 waits for the FUSE fd to become readable (a trip through trio's epoll) before
   every request, and passes the waiting from task to task through a lock on every request. The patched
   loop reads first (main() makes the fd non-blocking) and waits only when no request is queued; it runs
   each handler in the task that read its request, and starts another reading task only when a handler
   really has to wait (a disk read in a worker thread, a flush). It also lets go of the GIL while it reads
   a request: the kernel copies a whole 1 MiB write in there, and the write-back thread can run meanwhile.
   docs/performance.md ("What the profiles showed") has the figures.

3. lseek: pyfuse3 has no handler either, so SEEK_DATA / SEEK_HOLE on a raw file could not see the holes
   (cp, tar -S, qemu-img convert and nbdcopy look for them). The handler calls
   ``operations.lseek(fh, offset, whence)`` for the new offset and answers ENOSYS without such a method,
   so the kernel falls back to treating the whole file as data; ``pyfuse3.LSEEK_SUPPORTED`` marks it.
4. polling (patch levels 5 to 7): when the queue runs empty the loop polls the fd, with the GIL let go, for up to
   64 us (``pyfuse3.set_poll_max_ns``; the mount's -o poll_us) before it sleeps in epoll, as QEMU's event
   loop does: the window doubles while requests come just after it and drops to nothing when they come
   later, so only a busy stream spins. A QD1 guest then finds the daemon awake instead of paying a
   sleeping thread's wake-up (docs/performance.md, "Polling").

``pyfuse3.VHDXFS_PATCH_LEVEL`` tells setup.sh whether an installed build has every patch.
Every change checks its anchor, so a different pyfuse3 version fails loudly instead of silently.
"""

from __future__ import annotations

import sys
from pathlib import Path

PATCH_LEVEL = 7

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

LSEEK_HANDLER = '''

cdef void fuse_lseek (fuse_req_t req, fuse_ino_t ino, off_t off, int whence, fuse_file_info *fi):
    cdef _Container c = _Container()
    c.req = req
    c.off = off
    c.flags = whence
    c.fh = fi.fh
    save_retval(fuse_lseek_async(c))

async def fuse_lseek_async (_Container c):
    cdef int ret
    handler = getattr(operations, 'lseek', None)
    try:
        if handler is None:
            raise FUSEError(errno.ENOSYS)
        offset = await handler(c.fh, c.off, c.flags)
    except FUSEError as e:
        ret = fuse_reply_err(c.req, e.errno)
    else:
        ret = fuse_reply_lseek(c.req, offset)

    if ret != 0:
        log.error('fuse_lseek(): fuse_reply_* failed with %s', strerror(-ret))
'''

# _session_loop's body, from its loop to its last log line, is replaced by NEW_LOOP.
OLD_LOOP = """    while not fuse_session_exited(session):
        if worker_data.active_readers > min_tasks:
"""
OLD_LOOP_END = """    log.debug('%s: terminated', name)
"""
NEW_LOOP = """    cdef long long idle_since = 0
    on_wait = functools.partial(_start_reader, nursery, min_tasks, max_tasks)
    while not fuse_session_exited(session):
        # vhdxfs: read first; a request already queued needs no trip through epoll. The fd is
        # non-blocking: an empty queue answers EAGAIN, and then one task (only one) waits.
        with nogil:  # a 1 MiB write is copied in here: other threads (the write-back queue) go on meanwhile
            res = fuse_session_receive_buf(session, &buf)
        if res == -errno.EAGAIN:
            if worker_data.active_readers:
                break  # another task waits for the fd already
            if not idle_since:
                # vhdxfs: the queue just ran empty. Poll the fd a little before sleeping (QEMU's adaptive
                # polling): the next request of a guest at queue depth 1 comes within microseconds, and
                # finding it here saves the wake-up of a sleeping thread, the dearest part of a request.
                idle_since = _now_ns()
                if _poll_ns:
                    with nogil:
                        res = _poll_request(&buf, idle_since + _poll_ns)
            if res == -errno.EAGAIN:
                if not await _wait_fuse_readable():
                    break
                continue
        if idle_since:
            _adapt_poll(_now_ns() - idle_since)
            idle_since = 0
        if res == -errno.EINTR:
            continue
        elif res < 0:
            raise OSError(-res, 'fuse_session_receive_buf failed with '
                          + strerror(-res))
        elif res == 0:
            break

        # The handler runs in this task; on_wait() starts another reading task if it has to wait.
        save_retval(None)
        fuse_session_process_buf(session, &buf)
        if py_retval is not None:
            await _pyfuse3.await_noting_wait(py_retval, on_wait)

"""
POLL = """

# vhdxfs: adaptive polling, as QEMU's event loop does it (util/aio-posix.c): the window grows while requests
# come just after it, and drops to nothing when they come later than POLL_MAX_NS, so an idle or a slow
# stream of requests costs no spinning. set_poll_max_ns(0) turns it off.
cdef long long _poll_ns = 0
cdef long long _poll_max_ns = 64000
cdef long long POLL_START_NS = 4000

def set_poll_max_ns(long long ns):
    '''vhdxfs: the longest the loop polls the FUSE fd for the next request before sleeping (0: never).'''
    global _poll_max_ns, _poll_ns
    _poll_max_ns = max(0, ns)
    _poll_ns = min(_poll_ns, _poll_max_ns)

cdef long long _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1000000000 + ts.tv_nsec

cdef int _poll_request(fuse_buf* buf, long long deadline) noexcept nogil:
    cdef int res
    while True:
        res = fuse_session_receive_buf(session, buf)
        if res != -errno.EAGAIN or _now_ns() >= deadline:
            return res

cdef void _adapt_poll(long long waited) noexcept:
    global _poll_ns
    if waited <= _poll_ns:
        return  # found by polling
    if waited > _poll_max_ns:
        _poll_ns = 0
    else:
        _poll_ns = min(max(2 * _poll_ns, POLL_START_NS), _poll_max_ns)
"""
START_READER = """

def _start_reader(nursery, int min_tasks, int max_tasks):
    '''vhdxfs: a handler has to wait; make sure a task goes on reading requests meanwhile.'''
    if not worker_data.active_readers and worker_data.task_count < max_tasks:
        worker_data.task_count += 1
        nursery.start_soon(_session_loop, nursery, min_tasks, max_tasks, name=worker_data.get_name())
"""
AWAIT_NOTING_WAIT = '''

@types.coroutine
def await_noting_wait(coro, on_wait):
    """vhdxfs: ``await coro`` in the calling task, calling ``on_wait()`` once if coro has to wait."""
    try:
        message = coro.send(None)
    except StopIteration as done:
        return done.value
    on_wait()
    while True:
        try:
            value = yield message
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                message = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                message = coro.send(value)
            except StopIteration as done:
                return done.value
'''


def fail(path: Path, anchor: str) -> None:
    sys.exit(f"patch_pyfuse3: {path}: anchor {anchor!r} not found; is this pyfuse3 3.5.0?")


def insert_after(path: Path, anchor: str, text: str) -> None:
    source = path.read_text()
    if text in source:
        return  # already patched
    if anchor not in source:
        fail(path, anchor)
    path.write_text(source.replace(anchor, anchor + text, 1))


def patch_fallocate(pkg: Path) -> None:
    handlers = pkg / "handlers.pxi"
    if "fuse_fallocate" not in handlers.read_text():
        handlers.write_text(handlers.read_text() + HANDLER)
    insert_after(pkg / "internal.pxi", "    fuse_ops.fsync = fuse_fsync\n", "    fuse_ops.fallocate = fuse_fallocate\n")
    insert_after(pkg / "__init__.pyx", "default_options = frozenset(('default_permissions',))\n",
                 "FALLOCATE_SUPPORTED = True  # patched by vhdxfs: fallocate requests reach Operations\n"
                 f"VHDXFS_PATCH_LEVEL = {PATCH_LEVEL}  # patched by vhdxfs: see packaging/patch_pyfuse3.py\n")


def patch_lseek(pkg: Path) -> None:
    include = pkg.parent.parent / "Include" / "fuse_lowlevel.pxd"
    insert_after(include, "                      fuse_pollhandle *ph) except *\n",
                 "        void (*lseek) (fuse_req_t req, fuse_ino_t ino, off_t off, int whence,\n"
                 "                       fuse_file_info *fi) except *\n")
    insert_after(include, "    int fuse_reply_poll(fuse_req_t req, unsigned revents)\n",
                 "    int fuse_reply_lseek(fuse_req_t req, off_t off)\n")
    handlers = pkg / "handlers.pxi"
    if "fuse_lseek" not in handlers.read_text():
        handlers.write_text(handlers.read_text() + LSEEK_HANDLER)
    insert_after(pkg / "internal.pxi", "    fuse_ops.fsync = fuse_fsync\n", "    fuse_ops.lseek = fuse_lseek\n")
    insert_after(pkg / "__init__.pyx", "default_options = frozenset(('default_permissions',))\n",
                 "LSEEK_SUPPORTED = True  # patched by vhdxfs: SEEK_DATA/SEEK_HOLE reach Operations.lseek\n")


def patch_session_loop(pkg: Path) -> None:
    internal = pkg / "internal.pxi"
    source = internal.read_text()
    if "await_noting_wait" not in source:
        start, end = source.find(OLD_LOOP), source.find(OLD_LOOP_END)
        if start < 0 or end < start:
            fail(internal, OLD_LOOP if start < 0 else OLD_LOOP_END)
        source = source[:start] + NEW_LOOP + source[end:]
        anchor = "    worker_data.task_count -= 1\n"
        if anchor not in source:
            fail(internal, anchor)
        source = source.replace(anchor, anchor + START_READER, 1)
        # Before the decorator: a block between it and the def would leave the loop a bare Cython coroutine
        # (Cython drops the decorator silently), which trio cannot run as a task and live mounts hang.
        loop = "@async_wrapper\nasync def _session_loop("
        if loop not in source:
            fail(internal, loop)
        internal.write_text(source.replace(loop, POLL.lstrip("\n") + "\n\n" + loop, 1))
    insert_after(pkg / "__init__.pyx", "import os\n", "import functools\n")
    insert_after(pkg / "__init__.pyx", "from posix.time cimport timespec\n",
                 "from posix.time cimport clock_gettime, CLOCK_MONOTONIC\n")
    insert_after(pkg / "__init__.pyx", "    trio_token = trio.lowlevel.current_trio_token()\n",
                 "    os.set_blocking(session_fd, False)  # vhdxfs: the loop reads first, waits on EAGAIN\n")
    insert_after(pkg / "_pyfuse3.py", "import logging\n", "import types\n")
    insert_after(pkg / "_pyfuse3.py", "__all__ = ['Operations', 'async_wrapper']\n", AWAIT_NOTING_WAIT)


def main(src: str) -> None:
    pkg = Path(src) / "src" / "pyfuse3"
    patch_fallocate(pkg)
    patch_lseek(pkg)
    patch_session_loop(pkg)
    # The C file shipped in the sdist is stale now; the build regenerates it with Cython.
    (pkg / "__init__.c").unlink(missing_ok=True)


if __name__ == "__main__":
    main(sys.argv[1])
