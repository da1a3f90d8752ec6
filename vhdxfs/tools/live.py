"""`vhdxfs status`, `checkpoint`, `checkpoints` and `merge`: a running disk, through its daemon's control
channel (service/control.py); TARGET is found as tools/target.py says."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
from typing import TYPE_CHECKING, Any

from ..errors import Reason, VhdxError
from ..service.control_client import ControlClient
from ..sizes import format_size
from .target import Target, find

if TYPE_CHECKING:
    from .progress import Bar

STATUS_TIMEOUT = 60.0  # seconds a daemon may take to answer a status

TARGET_HELP = ("a raw file in a mount (MOUNTPOINT/disk.raw), a mount point, an NBD socket, an NBD address "
               "(HOST:PORT, [V6]:PORT, tcp:HOST:PORT), or an image file a running daemon holds")


def running(target: str, image: str | None, *, need_image: bool = True) -> Target:
    """The running disk TARGET names; an error for an image file no daemon holds."""
    found = find(target, image, need_image=need_image)
    if found is None:
        raise VhdxError("no running vhdxfs daemon holds this image; this command works on a running disk "
                        "(mount or serve it first; offline: vhdxfs info, vhdxfs commit)", path=target,
                        errno=errno.ENOENT, reason=Reason.NOT_FOUND)
    return found


def call(target: Target, command: str, arguments: dict[str, Any], **kw: Any) -> Any:
    """Run ``command`` on the daemon of ``target``; an error that names no file names TARGET."""
    try:
        with ControlClient(target.control) as client:
            return client.call(command, {**target.arguments, **arguments}, **kw)
    except VhdxError as exc:
        raise exc.with_path(target.given) from None


# -- status ---------------------------------------------------------------------------------------------------
def run_status(args: argparse.Namespace) -> int:
    target = running(args.target, args.image, need_image=False)
    answer = call(target, "status", {}, timeout=STATUS_TIMEOUT)
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.prometheus:
        from .prometheus import exposition

        print(exposition(answer), end="")
    else:
        print("\n".join(describe(answer)))
    return 0


def describe(answer: dict[str, Any]) -> list[str]:
    d = answer["daemon"]
    what = "mount daemon" if d["kind"] == "mount" else "NBD server"
    where = "at" if d["kind"] == "mount" else "on"
    out = [f"{what} {d['pid']} {where} {d['key']} (vhdxfs {d['version']}), up {_duration(d['uptime-seconds'])}"]
    for image in answer["images"]:
        mode = "read-only" if image["read-only"] else "read-write"
        out.append(f"{image['name']}: {image['image']}, {format_size(image['virtual-size'])}, {mode}")
        for i, layer in enumerate(image["chain"]):
            host = f", {format_size(layer['host-bytes'])} on the host" if "host-bytes" in layer else ""
            out.append(f"  {'chain:' if i == 0 else '':7}{layer['path']} ({layer['role']}, "
                       f"{format_size(layer['allocated-bytes'])} allocated{host})")
        for kind, io in image["io"].items():
            lat = io["latency-us"]
            out.append(f"  {kind + ':':7}{io['requests']} requests, {format_size(io['bytes'])}, latency p50 "
                       f"{lat['p50']} us, p99 {lat['p99']} us, max {lat['max']} us, {io['failures']} failed")
        wb = image["writeback"]
        out.append(f"  queue: {format_size(wb['queued-bytes'])} of {format_size(wb['limit-bytes'])} waiting for "
                   f"the image, {image['pending-metadata-pages']} metadata pages for the next flush, "
                   f"{image['requests-inside']} requests in flight{', paused' if image['paused'] else ''}")
        op = image["operation"]
        if op is not None:
            done = f", {format_size(op['done-bytes'])} of {format_size(op['total-bytes'])}" if op["total-bytes"] else ""
            out.append(f"  now:   {op['operation']} of {op['target']}: {op['phase']}{done}")
    if "clients" in answer:
        out.append(f"clients: {len(answer['clients'])}")
        for c in answer["clients"]:
            chosen = f"export {c['export']!r} ({format_size(c['size'])})" if c["export"] is not None else "negotiating"
            out.append(f"  {c['address']}: {chosen}")
    return out


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


# -- checkpoint, checkpoints, merge ---------------------------------------------------------------------------
def run_checkpoint(args: argparse.Namespace) -> int:
    target = running(args.target, args.image)
    answer = call(target, "checkpoint", {"name": args.name} if args.name else {})
    print(answer["top"])
    return 0


def run_checkpoints(args: argparse.Namespace) -> int:
    target = running(args.target, args.image)
    answer = call(target, "checkpoints", {}, timeout=STATUS_TIMEOUT)
    if args.json:
        print(json.dumps(answer["layers"], indent=2))
        return 0
    for layer in answer["layers"]:
        print(f"{layer['path']}  {layer['role']}  {format_size(layer['allocated-bytes'])} allocated")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from .progress import progress  # tqdm: loaded by the command that shows a bar

    target = running(args.target, args.image)
    with contextlib.ExitStack() as stack:
        bars: list[Bar] = []
        seen = [0]

        def show(name: str, data: dict[str, Any]) -> None:
            total, done = int(data.get("total-bytes", 0)), int(data.get("done-bytes", 0))
            if name != "progress" or not total:
                return
            if not bars:  # the total is known from the first event on
                bars.append(stack.enter_context(progress(total, f"merging {args.layer}")))
            if done > seen[0]:
                bars[0].update(done - seen[0])
                seen[0] = done

        answer = call(target, "merge", {"layer": args.layer}, on_event=show)
    passes = f", {answer['passes']} passes" if answer["passes"] > 1 else ""
    print(f"merged {answer['layer']} into {answer['parent']} ({format_size(answer['copied-bytes'])} copied{passes})")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def add(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help_text, description=description)
        p.add_argument("target", metavar="TARGET", help=TARGET_HELP)
        p.add_argument("--image", metavar="NAME", help="which image, when the daemon serves several (its raw file "
                       "or export name)")
        return p

    s = add("status", "show what a running disk does",
            "Show a running disk: the daemon (pid, uptime), and per image its chain (each file, its size on the "
            "host and the bytes it holds), its I/O (requests, bytes, failures, latency percentiles per kind), the "
            "write-back queue, the metadata waiting for a flush and the live operation running; for an NBD server "
            "also the clients connected. Every image of the daemon unless --image or a raw file picks one.")
    how = s.add_mutually_exclusive_group()
    how.add_argument("--json", action="store_true", help="print the status as JSON")
    how.add_argument("--prometheus", action="store_true", help="print it in Prometheus' text format (counters, "
                     "latency histograms, gauges) for node_exporter's textfile collector or a scrape")
    s.set_defaults(func=run_status)
    c = add("checkpoint", "freeze a running disk; it goes on in a new child",
            "Take a checkpoint of a running disk, as Hyper-V does: its top layer freezes (crash-consistent: every "
            "write acknowledged before holds) and the disk goes on writing into a new differencing child next to "
            "it, without pausing its users for more than a flush. Prints the new top. The chain record beside the "
            "base (disk.vhdx.chain) names it, so a later writable mount of disk.vhdx opens it; a read-only mount "
            "of a frozen layer reads the checkpoint while the disk runs (a backup).")
    c.add_argument("--name", metavar="NAME", help="the new layer's file name (NAME.avhdx; default "
                   "<stem>_<GUID>.avhdx)")
    c.set_defaults(func=run_checkpoint)
    k = add("checkpoints", "list the chain of a running disk",
            "List the layers of a running disk, top first: the top it writes, then the frozen checkpoints.")
    k.add_argument("--json", action="store_true", help="print the layers as JSON")
    k.set_defaults(func=run_checkpoints)
    m = add("merge", "merge a checkpoint layer of a running disk into its parent",
            "Merge LAYER of a running disk into its parent and delete it (Hyper-V's 'delete checkpoint'), while "
            "the disk serves: an inner layer is copied down, the active top is mirrored until little is left and "
            "then switched, the disk paused only for that last step. A progress bar shows on a terminal. If the "
            "command is interrupted the merge goes on in the daemon; if the daemon stops, the merge is undone.")
    m.add_argument("layer", metavar="LAYER", help="the layer: its path, file name or stem")
    m.set_defaults(func=run_merge)
