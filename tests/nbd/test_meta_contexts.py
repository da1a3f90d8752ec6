"""Metadata contexts: ``base:allocation`` and ``qemu:allocation-depth``, listed, selected and answered.

First the pure parts (handshake.select_contexts, transmission.descriptors), then a real `vhdxfs serve -o ro`
of a differencing chain's top beside a plain image, driven by tests/nbd/rawclient.py: what LIST and SET
answer, the chunks of BLOCK_STATUS with one or both contexts (REQ_ONE per context), and what a client that
breaks the rules gets: unknown ``qemu:`` contexts select nothing, too many queries are NBD_REP_ERR_TOO_BIG,
contexts chosen for another export or a failed SET leave none, BLOCK_STATUS without a context is EINVAL.
After every hostile client nbdinfo still maps the export's allocation depth right.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import make_image, run
from tests.nbd.chain import SIZE, Chain, MiB, make_chain, merged
from tests.nbd.rawclient import OptionFailed, RawClient, meta_context_data
from vhdxfs.engine import Extent, Kind
from vhdxfs.nbd import protocol as p
from vhdxfs.nbd import transmission
from vhdxfs.nbd.handshake import select_contexts

BASE, DEPTH = p.BASE_ALLOCATION, p.ALLOCATION_DEPTH
BOTH = (BASE, DEPTH)
HOLE_ZERO = p.STATE_HOLE | p.STATE_ZERO


# -- which queries name which contexts --------------------------------------------------------------------
@pytest.mark.parametrize("queries,listed,selected", [
    ((), BOTH, ()),  # LIST without a query lists everything; SET without one selects nothing
    ((BASE,), (BASE,), (BASE,)),
    ((DEPTH,), (DEPTH,), (DEPTH,)),
    ((DEPTH, BASE, DEPTH, BASE), BOTH, BOTH),  # each once, in id order
    (("base:",), (BASE,), ()),  # a namespace's wildcard lists it, selects nothing
    (("qemu:",), (DEPTH,), ()),
    (("qemu:", "base:"), BOTH, ()),
    (("qemu:", BASE), BOTH, (BASE,)),
    (("qemu:dirty-bitmap:", "qemu:dirty-bitmap:top", "qemu:allocation-depth:", "qemu:Allocation-Depth",
      "QEMU:allocation-depth", "qemu:allocation-depth\0", "qemu:allocation", "x-vhdxfs:", "nbd-server:",
      "base:allocation ", "base:Allocation"), (), ()),  # unknown names, in known namespaces or not
])
def test_select_contexts(queries, listed, selected):
    assert select_contexts(queries, listing=True) == listed
    assert select_contexts(queries, listing=False) == selected


@pytest.mark.parametrize("query", ["allocation-depth", "", ":allocation-depth", ":"])
def test_a_query_without_a_namespace_is_malformed(query):
    for listing in (True, False):
        with pytest.raises(p.OptionError):
            select_contexts((DEPTH, query), listing=listing)


def test_more_than_64_queries_are_too_big():
    p.parse_meta_context_request(meta_context_data("", (DEPTH,) * p.MAX_QUERIES))
    with pytest.raises(p.TooBig):
        p.parse_meta_context_request(meta_context_data("", (DEPTH,) * (p.MAX_QUERIES + 1)))
    assert issubclass(p.TooBig, p.OptionError)  # the parsers still raise only the two documented kinds


# -- what each context says of the engine's extents -------------------------------------------------------
def _extents(*spec: tuple[int, Kind, int]) -> list[Extent]:
    out, at = [], 0
    for length, kind, depth in spec:
        out.append(Extent(at, length, kind, Path(f"layer{depth}"), depth, 0 if kind == Kind.DATA else -1))
        at += length
    return out


CHAIN_EXTENTS = _extents((4096, Kind.DATA, 0), (8192, Kind.DATA, 2), (4096, Kind.ZERO, 2),
                         (512, Kind.ZERO, 0), (1024, Kind.HOLE, 2), (2048, Kind.DATA, 1), (512, Kind.DATA, 1),
                         (4096, Kind.HOLE, 2))


def test_allocation_depth_counts_from_the_exported_image_and_zero_blocks_are_allocated():
    assert transmission.descriptors(CHAIN_EXTENTS, DEPTH) == [
        (4096, 1), (12288, 3), (512, 1), (1024, 0), (2560, 2), (4096, 0)]


def test_base_allocation_is_unchanged():
    assert transmission.descriptors(CHAIN_EXTENTS, BASE) == [(12288, 0), (5632, HOLE_ZERO), (2560, 0),
                                                             (4096, HOLE_ZERO)]


def test_req_one_keeps_the_first_run_whole():
    for context, first in ((DEPTH, (4096, 1)), (BASE, (12288, 0))):
        assert transmission.descriptors(CHAIN_EXTENTS, context, req_one=True) == [first]
    assert transmission.descriptors(CHAIN_EXTENTS[5:], DEPTH, req_one=True) == [(2560, 2)]


def test_descriptors_stop_at_the_limit(monkeypatch):
    monkeypatch.setattr(transmission, "MAX_DESCRIPTORS", 3)
    alternating = _extents(*[(512, Kind.DATA if i % 2 else Kind.HOLE, 0) for i in range(10)])
    assert transmission.descriptors(alternating, DEPTH) == [(512, 0), (512, 1), (512, 0)]
    assert transmission.descriptors(alternating, BASE) == [(512, HOLE_ZERO), (512, 0), (512, HOLE_ZERO)]


def test_block_status_chunks_but_the_last_are_not_done():
    for done, flags in ((True, p.REPLY_FLAG_DONE), (False, 0)):
        chunk = p.block_status_chunk(5, 2, [(4096, 3)], done=done)
        assert struct.unpack(">IHHQI", chunk[:20]) == (p.STRUCTURED_REPLY_MAGIC, flags, p.REPLY_TYPE_BLOCK_STATUS,
                                                       5, 12)
        assert struct.unpack(">III", chunk[20:]) == (2, 4096, 3)


# -- against a server ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Chain:
    return make_chain(tmp_path_factory.mktemp("chain"))


def nbdinfo_depths(uri: str) -> list[tuple[int, int, int]]:
    result = run("nbdinfo", "--json", f"--map={DEPTH}", uri)
    assert result.returncode == 0, result.stderr
    return merged((e["offset"], e["length"], e["type"]) for e in json.loads(result.stdout))


@pytest.fixture
def server(serve, chain, tmp_path) -> Iterator:
    """`vhdxfs serve -o ro top.avhdx other.vhdx`: after the test, nbdinfo still maps top's depths right."""
    other = make_image(tmp_path / "other.vhdx", 8 * MiB)
    with serve("-o", "ro", chain.layers[2].path, other) as s:
        yield s
        assert nbdinfo_depths(s.uri("top")) == chain.depths(2)


def structured(server) -> RawClient:
    c = RawClient(server.socket)
    c.handshake()
    c.structured_replies()
    return c


def status(c: RawClient, offset: int, length: int, flags: int = 0):
    reply = c.command(p.CMD_BLOCK_STATUS, offset, length, flags=flags)
    assert reply.error == 0, reply
    return reply


def as_extents(offset: int, descriptors: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    out = []
    for length, value in descriptors:
        out.append((offset, length, value))
        offset += length
    return out


def clip(runs: list[tuple[int, int, int]], offset: int, length: int) -> list[tuple[int, int, int]]:
    end, out = offset + length, []
    for at, n, value in runs:
        start, stop = max(at, offset), min(at + n, end)
        if start < stop:
            out.append((start, stop - start, value))
    return out


def test_list_names_what_the_queries_select(server):
    with structured(server) as c:
        assert c.list_meta_context(name="top") == c.list_meta_context(name="other") == [(0, BASE), (0, DEPTH)]
        assert c.list_meta_context(("qemu:",), name="top") == [(0, DEPTH)]
        assert c.list_meta_context(("base:",), name="top") == [(0, BASE)]
        assert c.list_meta_context((DEPTH, "qemu:"), name="top") == [(0, DEPTH)]
        assert c.list_meta_context(("qemu:dirty-bitmap:", "qemu:dirty-bitmap:top", "x-other:"), name="top") == []
        with pytest.raises(OptionFailed) as failed:
            c.list_meta_context(name="nope")
        assert failed.value.reply.type == p.REP_ERR_UNKNOWN
        c.go("top")
        assert c.command(p.CMD_BLOCK_STATUS, 0, MiB).error == p.EINVAL  # listing selects nothing


def test_set_gives_each_context_its_id_and_block_status_a_chunk_each(server, chain):
    expected = chain.depths(2)
    with structured(server) as c:
        assert c.set_meta_context(("qemu:", "base:"), name="top") == {}  # wildcards select nothing
        replies = c.option(p.OPT_SET_META_CONTEXT, meta_context_data("top", (DEPTH, BASE) * 3))
        assert [r.type for r in replies] == [p.REP_META_CONTEXT, p.REP_META_CONTEXT, p.REP_ACK]  # each once
        assert c.set_meta_context((DEPTH, BASE), name="top") == {1: BASE, 2: DEPTH}
        assert c.list_meta_context(("base:",), name="top") == [(0, BASE)]  # listing leaves the selection alone
        c.go("top")
        for offset, length in [(0, SIZE), (MiB + 512, 3 * MiB), (33 * MiB - 4096, 8192), (SIZE - 512, 512)]:
            reply = status(c, offset, length)
            assert reply.chunks == [(0, p.REPLY_TYPE_BLOCK_STATUS), (p.REPLY_FLAG_DONE, p.REPLY_TYPE_BLOCK_STATUS)]
            assert set(reply.status) == {1, 2}
            assert as_extents(offset, reply.status[2]) == clip(expected, offset, length)
            assert sum(n for n, _ in reply.status[1]) == length
            for at, n, value in as_extents(offset, reply.status[1]):  # DATA is allocated in some layer
                assert value in (0, HOLE_ZERO)
                assert value == HOLE_ZERO or all(depth for _, _, depth in clip(expected, at, n))
        assert c.read(0, 4096).data == bytes(chain.content(2)[:4096])


def test_base_allocation_alone_answers_as_before(server, chain):
    with structured(server) as c:
        assert c.set_meta_context((BASE,), name="top") == {1: BASE}
        c.go("top")
        with RawClient(server.socket) as both:
            both.handshake()
            both.structured_replies()
            both.set_meta_context(BOTH, name="top")
            both.go("top")
            for offset, length in [(0, SIZE), (7 * MiB, 5 * MiB)]:
                alone = status(c, offset, length)
                assert alone.chunks == [(p.REPLY_FLAG_DONE, p.REPLY_TYPE_BLOCK_STATUS)]
                assert alone.status == {1: status(both, offset, length).status[1]}


def test_allocation_depth_alone(server, chain):
    expected = chain.depths(2)
    with structured(server) as c:
        assert c.set_meta_context((DEPTH,), name="top") == {2: DEPTH}
        c.go("top")
        reply = status(c, 0, SIZE)
        assert reply.chunks == [(p.REPLY_FLAG_DONE, p.REPLY_TYPE_BLOCK_STATUS)]
        assert list(reply.status) == [2]
        assert merged(as_extents(0, reply.status[2])) == expected


def test_req_one_gives_one_extent_per_context(server, chain):
    expected = chain.depths(2)
    with structured(server) as c:
        c.set_meta_context(BOTH, name="top")
        c.go("top")
        for offset, length in [(0, SIZE), (MiB + 4096, 4096), (MiB + 4096, 100), (45 * MiB, MiB), (SIZE - 1, 1)]:
            reply = status(c, offset, length, p.CMD_FLAG_REQ_ONE)
            assert [len(reply.status[i]) for i in (1, 2)] == [1, 1], reply
            assert all(reply.status[i][0][0] <= length for i in (1, 2))
            assert as_extents(offset, reply.status[2]) == clip(expected, offset, length)[:1]


# -- hostile ----------------------------------------------------------------------------------------------
def test_unknown_qemu_contexts_select_nothing(server):
    unknown = ("qemu:dirty-bitmap:top", "qemu:dirty-bitmap:", "qemu:allocation-depth:", "qemu:Allocation-Depth",
               "qemu:allocation-depth2", "qemu:", "QEMU:allocation-depth", "qemu:allocation-depth\0")
    with structured(server) as c:
        assert c.set_meta_context(unknown, name="top") == {}
        c.go("top")
        assert c.command(p.CMD_BLOCK_STATUS, 0, MiB).error == p.EINVAL
        assert c.command(p.CMD_BLOCK_STATUS, 0, MiB, flags=p.CMD_FLAG_REQ_ONE).error == p.EINVAL
        assert c.read(0, 512).error == 0
    with structured(server) as c:  # among them, the known one is selected alone
        assert c.set_meta_context((*unknown[:4], DEPTH, *unknown[4:]), name="top") == {2: DEPTH}
        c.go("top")
        assert list(status(c, 0, MiB).status) == [2]


def test_too_many_queries(server):
    with structured(server) as c:
        for option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            assert c.option(option, meta_context_data("top", BOTH * 32))[-1].type == p.REP_ACK  # 64: taken
        for queries in [(DEPTH,) * 65, tuple(f"qemu:x{i}" for i in range(1000))]:
            for option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
                [reply] = c.option(option, meta_context_data("top", queries))
                assert reply.type == p.REP_ERR_TOO_BIG, reply
                assert len(reply.data) <= p.MAX_STRING
        c.go("top")  # the refused SET replaced the 64 that were taken
        assert c.command(p.CMD_BLOCK_STATUS, 0, MiB).error == p.EINVAL


def test_contexts_chosen_for_another_export(server):
    for chosen, entered in [("other", "top"), ("top", "other"), ("other", "")]:
        with structured(server) as c:
            assert c.set_meta_context(BOTH, name=chosen) == {1: BASE, 2: DEPTH}
            if entered:
                c.go(entered)
            else:  # the old way in, by name (with two exports there is no default)
                c.send_option(p.OPT_EXPORT_NAME, b"top")
                c.recv_exactly(10)
            assert c.command(p.CMD_BLOCK_STATUS, 0, MiB).error == p.EINVAL, (chosen, entered)
            assert c.read(0, 512).error == 0
    with structured(server) as c:  # an INFO in between changes nothing
        c.set_meta_context(BOTH, name="top")
        c.info("other")
        c.go("top")
        assert set(status(c, 0, MiB).status) == {1, 2}


def test_a_failed_set_leaves_no_context(server):
    failing = [meta_context_data("nope", BOTH),  # no such export: NBD_REP_ERR_UNKNOWN
               meta_context_data("top", (DEPTH, "nonamespace")),  # malformed: NBD_REP_ERR_INVALID
               meta_context_data("top", BOTH)[:-1],  # cut short
               meta_context_data("top", ())]  # no query: selects nothing, successfully
    for data in failing:
        with structured(server) as c:
            assert c.set_meta_context(BOTH, name="top") == {1: BASE, 2: DEPTH}
            replies = c.option(p.OPT_SET_META_CONTEXT, data)
            assert len(replies) == 1 and replies[0].type in (p.REP_ACK, p.REP_ERR_UNKNOWN, p.REP_ERR_INVALID)
            c.go("top")
            assert c.command(p.CMD_BLOCK_STATUS, 0, MiB).error == p.EINVAL, data[:24]


def test_block_status_before_set_meta_context(server):
    with structured(server) as c:
        assert c.list_meta_context(name="other") == [(0, BASE), (0, DEPTH)]
        c.go("top")
        for flags in (0, p.CMD_FLAG_REQ_ONE):
            reply = c.command(p.CMD_BLOCK_STATUS, 0, SIZE, flags=flags)
            assert reply.error == p.EINVAL and not reply.status, reply
        assert c.read(0, 512).error == 0
    with RawClient(server.socket) as c:  # and SET before structured replies is refused
        c.handshake()
        [reply] = c.option(p.OPT_SET_META_CONTEXT, meta_context_data("top", BOTH))
        assert reply.type == p.REP_ERR_INVALID
        c.structured_replies()
        c.go("top")
        assert c.command(p.CMD_BLOCK_STATUS, 0, MiB).error == p.EINVAL
