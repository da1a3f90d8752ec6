"""The transmission phase: requests read in order, served concurrently, answered in completion order.

Each request runs as a task of its own against the export's AsyncDisk; replies go out whole under the
wire's lock, whenever their request finishes. Memory stays bounded whatever a client does: the data of
READs and WRITEs in flight (received but not yet applied, read but not yet sent) counts against a budget,
and the reader stops reading requests while the budget is spent, so a client that sends many large
requests without reading the replies only fills its own socket. Errors the protocol lets us answer are
answered (EINVAL, EPERM, ENOSPC, ...) and the connection goes on; a bad magic or a WRITE larger than the
maximum payload end it (its data cannot be skipped safely: the protocol allows the hard disconnect).

BLOCK_STATUS asks the engine once for the extents of the range through the whole chain and answers one
chunk per metadata context the client selected (``descriptors`` maps the extents for each).
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable, Iterable

import trio

from ..engine import Extent, Kind
from ..errors import VhdxError
from . import admission
from . import protocol as p
from .budget import BUDGET, SERVER_BUDGET, ByteBudget
from .exports import MAX_PAYLOAD, Export
from .handshake import Session
from .wire import Closed, Parts, Wire, cancel_when_set

log = logging.getLogger("vhdxfs.nbd")
STOP_GRACE = 2.0  # once the server stops, how long replies may wait for a client to take them
MAX_IN_FLIGHT = 256  # requests of one connection in flight
FAIR_SHARE = 64  # requests a reader serves from its buffer before it lets the other tasks run
# After a read reply this large the reader flushes and lets the other tasks run before it serves the next
# request, or a client reading 1 MiB at a time waits for the whole burst: 1 MiB reads at QD16 were 0.89x-0.92x
# the code before the batching, and are still 0.87x-0.93x without it beside the whole-reply send buffer.
SEND_AT_ONCE = 64 << 10
MAX_DESCRIPTORS = 1 << 16  # per block status chunk, one chunk per context (the protocol's limit is 2**20)


def _allocation(extent: Extent) -> int:
    """base:allocation: DATA is 0; ZERO blocks and unallocated space are HOLE|ZERO."""
    return 0 if extent.kind == Kind.DATA else p.STATE_HOLE | p.STATE_ZERO


def _depth(extent: Extent) -> int:
    """qemu:allocation-depth: the layer that holds the extent counted from 1 (the exported image), 0 where
    no layer does. A ZERO block is allocated in its layer (it hides its parents, as QEMU counts zero
    clusters); a HOLE is unallocated in every layer."""
    return 0 if extent.kind == Kind.HOLE else extent.depth + 1


CONTEXT_VALUES: dict[str, Callable[[Extent], int]] = {p.BASE_ALLOCATION: _allocation, p.ALLOCATION_DEPTH: _depth}


def descriptors(extents: Iterable[Extent], context: str, *, req_one: bool = False) -> list[tuple[int, int]]:
    """The (length, value) descriptors of ``context`` for the engine's ``extents`` of a range: neighbours of
    the same value merged, at most MAX_DESCRIPTORS (the reply then covers less than the range, which the
    protocol allows), exactly one with ``req_one``."""
    value = CONTEXT_VALUES[context]
    out: list[tuple[int, int]] = []
    for extent in extents:
        flags = value(extent)
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + extent.length, flags)
        else:
            out.append((extent.length, flags))
            if len(out) > MAX_DESCRIPTORS or (req_one and len(out) > 1):
                out.pop()
                break
    return out


def wire_error(exc: BaseException) -> int:
    """The protocol's error for an engine error (its errno), EIO when nothing fits better."""
    code = getattr(exc, "errno", None)
    if code in (errno.EROFS, errno.EPERM, errno.EACCES):
        return p.EPERM
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return p.ENOSPC
    if code in (errno.EINVAL, errno.ENOTSUP):
        return p.EINVAL if code == errno.EINVAL else p.ENOTSUP
    return p.EIO


class Transmission:
    """One connection's transmission phase."""

    def __init__(self, wire: Wire, session: Session, shared: ByteBudget | None = None) -> None:
        if session.export is None:
            raise ValueError("transmission starts once the client has chosen an export")
        self.wire = wire
        self.session = session
        self.export: Export = session.export
        self.disk = self.export.disk
        # Two budgets: this connection's own, so one client that never reads its replies holds at most
        # BUDGET, and the server's, so many connections together stay under SERVER_BUDGET.
        self.budget = ByteBudget(BUDGET)
        self.shared = shared or ByteBudget(SERVER_BUDGET)
        self.in_flight = 0  # requests admitted and not yet answered (at most MAX_IN_FLIGHT)
        self._slot_freed: trio.Event | None = None

    async def run(self, stopping: trio.Event) -> None:
        """Serve requests until NBD_CMD_DISC, the client leaving, a protocol violation or ``stopping``;
        requests in flight always finish (their replies may find the client gone)."""
        async with trio.open_nursery() as sending:
            sending.start_soon(self._sender, stopping)
            try:
                async with trio.open_nursery() as handlers:
                    async with trio.open_nursery() as reading:
                        reading.start_soon(cancel_when_set, stopping, reading.cancel_scope)
                        reading.start_soon(cancel_when_set, self.wire.broken, reading.cancel_scope)
                        await self._read_requests(handlers)
                        reading.cancel_scope.cancel()
            finally:
                self.wire.finish_sending()

    async def _sender(self, stopping: trio.Event) -> None:
        """The wire's sender; once the server stops, replies a client has not taken within STOP_GRACE are dropped."""
        async with trio.open_nursery() as nursery:
            async def give_up() -> None:
                await stopping.wait()
                await trio.sleep(STOP_GRACE)
                nursery.cancel_scope.cancel()
            nursery.start_soon(give_up)
            await self.wire.sender()
            nursery.cancel_scope.cancel()

    async def _read_requests(self, handlers: trio.Nursery) -> None:
        """Read and admit requests; serve here those that need no wait (their replies go out together when
        the buffer runs dry: wire.py), start a task for the others. Nothing here passes through trio's
        scheduler while requests are buffered and slots and budget are free, except once every
        FAIR_SHARE requests: a client that keeps the buffer full must not hold the loop from the others."""
        taken: int | None = None
        wire = self.wire
        served = 0
        try:
            while True:
                header = wire.take(p.REQUEST_SIZE)
                served += 1
                if header is None:
                    served = 0
                    header = await wire.exactly(p.REQUEST_SIZE)  # replies waiting in the batch go out first
                elif served >= FAIR_SHARE:
                    served = 0
                    wire.flush()
                    await trio.sleep(0)
                request = p.parse_request(header)
                if request.type == p.CMD_DISC:
                    return
                if request.type == p.CMD_WRITE and request.length > MAX_PAYLOAD:
                    raise p.ProtocolError(f"a WRITE of {request.length} bytes, more than {MAX_PAYLOAD}")
                if self.in_flight >= MAX_IN_FLIGHT:
                    wire.flush()  # the batch's replies hold slots: they must go before we wait for one
                    await self._slot_free()
                self.in_flight += 1
                cost = admission.cost(request)
                taken = 0  # the slot at least is given back below if no reply will give it back
                if not self.budget.take(cost):
                    wire.flush()
                    await self.budget.acquire(cost)
                try:
                    if not self.shared.take(cost):
                        wire.flush()
                        await self.shared.acquire(cost)
                except BaseException:
                    self.budget.release(cost)
                    raise
                taken = cost
                refusal = admission.refusal(request, self.export, self.session)
                if request.type == p.CMD_READ and not refusal:
                    data = self.disk.read_now(request.offset, request.length) if request.length else None
                    if data is not None:  # served here: no task, no trip through the scheduler
                        taken = None
                        wire.queue(self._read_reply(request, data), functools.partial(self._done, cost), later=True)
                        if request.length >= SEND_AT_ONCE:
                            served = FAIR_SHARE  # flush, and let the sender run, before the next request
                        continue
                payload = None
                if request.type == p.CMD_WRITE:
                    payload = wire.take(request.length)
                    if payload is None:
                        payload = await wire.payload(request.length)
                taken = None
                if payload is not None and not request.flags & p.CMD_FLAG_FUA and not refusal \
                        and self.disk.write_now(request.offset, payload):
                    wire.queue(self._ok(request), functools.partial(self._done, cost), later=True)
                    continue
                handlers.start_soon(self._serve, request, refusal, payload, cost)
        except Closed as exc:
            log.debug("client gone: %s", exc)
        except p.ProtocolError as exc:
            log.warning("disconnecting a client that broke the protocol: %s", exc)
        finally:
            if taken is not None:
                self._done(taken)

    async def _serve(self, request: p.Request, refusal: int, payload: bytes | None, cost: int) -> None:
        """Run one request and queue its reply; its budget and slot are given back once the reply is sent."""
        reply: Parts = ()
        try:
            reply = self._error(request, refusal) if refusal else await self._dispatch(request, payload)
        except VhdxError as exc:
            log.warning("%s: request %d at %d+%d: %s", self.export.name, request.type, request.offset,
                        request.length, exc)
            reply = self._error(request, wire_error(exc), str(exc))
        finally:
            self.wire.queue(reply, functools.partial(self._done, cost))

    def _done(self, cost: int) -> None:
        self.shared.release(cost)
        self.budget.release(cost)
        self.in_flight -= 1
        if self._slot_freed is not None:
            self._slot_freed.set()
            self._slot_freed = None

    async def _slot_free(self) -> None:
        """Wait until fewer than MAX_IN_FLIGHT requests are in flight."""
        while self.in_flight >= MAX_IN_FLIGHT:
            if self._slot_freed is None:
                self._slot_freed = trio.Event()
            await self._slot_freed.wait()

    async def _dispatch(self, request: p.Request, payload: bytes | None) -> Parts:
        """Run the request; the parts of its reply."""
        disk, kind, offset, length = self.disk, request.type, request.offset, request.length
        if kind == p.CMD_READ:
            return self._read_reply(request, await disk.read(offset, length) if length else b"")
        if kind == p.CMD_BLOCK_STATUS:
            return await self._status(request)
        if kind == p.CMD_WRITE and length and payload is not None:
            await disk.write(offset, payload)
        elif kind == p.CMD_FLUSH:
            await disk.flush()
        elif kind == p.CMD_TRIM and length:
            await disk.discard(offset, length)
        elif kind == p.CMD_WRITE_ZEROES and length:
            unmap = not request.flags & p.CMD_FLAG_NO_HOLE
            if request.flags & p.CMD_FLAG_FAST_ZERO and not self._fast_zero(offset, length, unmap):
                return self._error(request, p.ENOTSUP, "zeroing this range is no faster than writing zeros")
            await disk.write_zeroes(offset, length, unmap=unmap)
        # CMD_CACHE: nothing to do; the host's page cache serves what is read next.
        if request.flags & p.CMD_FLAG_FUA and kind in admission.WRITING:
            await disk.flush()
        return self._ok(request)

    def _fast_zero(self, offset: int, length: int, unmap: bool) -> bool:
        """Without a parent, zeroing is metadata and hole punching; in a child, only whole-block unmaps
        are (elsewhere zeros must be written over the parent's data)."""
        if len(self.disk.chain()) == 1:
            return True
        bs = self.disk.block_size
        return unmap and offset % bs == 0 and (length % bs == 0 or offset + length == self.export.size)

    async def _status(self, request: p.Request) -> Parts:
        """One block status chunk per selected context, in context id order, the last one DONE."""
        extents = await self.disk.extents(request.offset, request.length)
        req_one = bool(request.flags & p.CMD_FLAG_REQ_ONE)
        ids = sorted(self.session.contexts)
        return tuple(p.block_status_chunk(request.cookie, context_id,
                                          descriptors(extents, self.session.contexts[context_id], req_one=req_one),
                                          done=context_id == ids[-1])
                     for context_id in ids)

    def _read_reply(self, request: p.Request, data: bytes | bytearray) -> Parts:
        if self.session.structured:
            if not request.length:  # a content chunk must describe at least one byte
                return (p.none_chunk(request.cookie),)
            return p.data_chunk_header(request.cookie, request.offset, request.length, done=True), data
        return p.simple_reply(request.cookie), data

    @staticmethod
    def _ok(request: p.Request) -> Parts:
        return (p.simple_reply(request.cookie),)  # allowed for any reply without data, structured or not

    def _error(self, request: p.Request, error: int, message: str = "") -> Parts:
        if self.session.structured:
            return (p.error_chunk(request.cookie, error, message),)
        return (p.simple_reply(request.cookie, error),)
