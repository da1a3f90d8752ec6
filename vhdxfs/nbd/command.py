"""`vhdxfs serve` and `vhdxfs stop`: serve images over NBD, and stop a server once its images are clean."""

from __future__ import annotations

import argparse
import errno
import os
import signal

import trio

from ..engine import absolute_location, location_exists
from ..errors import Reason, UsageError, VhdxError
from ..service.daemon import Ready, daemonize, run_in_foreground
from ..service.records import STATE_DIR, read_record, wait_for_exit
from .exports import export_name
from .listeners import parse_address
from .server import ServeConfig, address_key, serve, state_file

STOP_TIMEOUT = float(os.environ.get("VHDXFS_STOP_TIMEOUT", "600"))


def default_socket(images: list[str]) -> str:
    """$STATE_DIR/<first export>.sock: /run/vhdxfs for root, the user's runtime directory otherwise."""
    return str(STATE_DIR / f"{export_name(images[0])}.sock")


def check_config(config: ServeConfig) -> None:
    names: dict[str, str] = {}
    for image in config.images:
        if not location_exists(image):
            raise UsageError("no such image file", path=image, errno=errno.ENOENT, reason=Reason.NOT_FOUND)
        name = export_name(image)
        if name in names:
            raise UsageError(f"{image} and {names[name]} would both be exported as {name!r}; rename one",
                             field="IMAGE")
        names[name] = image
    if config.socket and config.listen:
        raise UsageError("give --socket or --listen, not both", field="--listen")
    if config.listen:
        parse_address(config.listen)
    if bool(config.tls_cert) != bool(config.tls_key) or (config.tls_ca and not config.tls_cert):
        raise UsageError("TLS needs --tls-cert and --tls-key (and --tls-ca only with them)", field="--tls-cert")


def _absolute(path: str | None) -> str | None:
    """Paths as given, made absolute now: the daemon works from / (it keeps no directory busy)."""
    return os.path.abspath(path) if path else None


def run_serve(args: argparse.Namespace) -> int:
    images = [absolute_location(i) for i in args.images]
    options = [o for o in ",".join(args.options).split(",") if o]
    for option in options:
        if option not in ("ro", "rw"):
            raise UsageError(f"-o {option}: unknown option (serve knows ro and rw)", field="-o")
    config = ServeConfig(images=images, read_only="ro" in options,
                         parent=absolute_location(args.parent) if args.parent else None,
                         socket=os.path.abspath(args.socket) if args.socket else None, listen=args.listen,
                         tls_cert=_absolute(args.tls_cert), tls_key=_absolute(args.tls_key),
                         tls_ca=_absolute(args.tls_ca),
                         insecure_no_tls=args.insecure_no_tls, handshake_timeout=args.handshake_timeout,
                         debug=args.debug)
    if not config.listen and not config.socket:
        config.socket = default_socket(images)
    check_config(config)

    def service(ready: Ready) -> None:
        trio.run(serve, config, ready)

    if args.foreground:
        return run_in_foreground(service, args.debug)
    log_file = state_file(config).with_suffix(".log")
    code = daemonize(service, what="NBD server", debug=args.debug, log_file=log_file)
    print(f"serving {', '.join(export_name(i) for i in images)} on {describe(config)}")
    return code


def describe(config: ServeConfig) -> str:
    """The server's address as an NBD URI (what qemu-img, nbdinfo and nbdcopy take)."""
    name = export_name(config.images[0]) if len(config.images) == 1 else "EXPORT"
    scheme = "nbds" if config.tls_cert else "nbd"
    if config.listen:
        host, port = parse_address(config.listen)
        host = f"[{host}]" if ":" in host else host or "localhost"
        return f"{scheme}://{host}:{port}/{name}"
    return f"{scheme}+unix:///{name}?socket={config.socket}"


def run_stop(args: argparse.Namespace) -> int:
    target = args.address
    if ":" in target and not os.path.exists(target):
        config = ServeConfig(images=[], listen=target)
    else:
        config = ServeConfig(images=[], socket=os.path.abspath(target))
    key = address_key(config)
    pid = read_record(state_file(config), key)
    if pid is None:
        raise UsageError("no vhdxfs NBD server is recorded as serving here", path=target, errno=errno.ESRCH)
    os.kill(pid, signal.SIGTERM)
    if not wait_for_exit(pid, STOP_TIMEOUT):
        # The images are still the server's (locked) when this gives up waiting.
        raise VhdxError(f"server {pid} is still closing the images after {STOP_TIMEOUT:.0f} s", path=target,
                        errno=errno.ETIMEDOUT, reason=Reason.TIMED_OUT)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve", help="serve images over NBD",
        description="Serve each IMAGE as an NBD export named by its stem (disk.vhdx -> disk; with one image the "
                    "default export too). Listens on a unix socket (mode 0600) unless --listen is given; returns "
                    "once it listens, the daemon running on in the background unless --foreground. Stop it "
                    "with 'vhdxfs stop SOCKET|HOST:PORT' or SIGTERM: requests in flight finish, then every "
                    "image is flushed and closed cleanly. A writable image is locked like a mounted one. While it "
                    "runs, 'vhdxfs status', 'checkpoint', 'merge' and 'resize' manage it (a resized export's "
                    "new size reaches new connections). A writable serve of an image that checkpoints froze "
                    "serves the top of its chain under the image's export name; -o ro serves the image itself.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="ro: serve read-only (writes get EPERM; a dirty log is replayed in memory)")
    p.add_argument("--parent", metavar="PATH", help="parent of a differencing IMAGE, if it cannot be found")
    p.add_argument("--socket", metavar="PATH", help="unix socket to listen on (default: $STATE_DIR/<export>.sock; "
                   "/run/vhdxfs for root)")
    p.add_argument("--listen", metavar="HOST[:PORT]", help="listen on TCP instead (port 10809 by default); a "
                   "non-loopback address needs TLS, or --insecure-no-tls")
    p.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM): clients must use TLS")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificate (PEM): clients must present a certificate "
                   "it signed")
    p.add_argument("--insecure-no-tls", action="store_true", help="allow plain TCP on a non-loopback address: "
                   "anyone who reaches the port can read and write the disk")
    p.add_argument("--handshake-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="disconnect clients that have not chosen an export by then (default 30)")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr")
    p.set_defaults(func=run_serve)
    s = subparsers.add_parser("stop", help="stop an NBD server, after every image is flushed and closed",
                              description="Stop the vhdxfs NBD server listening on SOCKET or HOST:PORT and wait "
                                          "until it has flushed and closed every image.")
    s.add_argument("address", metavar="SOCKET|HOST:PORT")
    s.set_defaults(func=run_stop)
