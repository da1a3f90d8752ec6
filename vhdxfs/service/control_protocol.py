"""The control channel's protocol: QMP-style JSON lines, parsed and built here without any I/O.

Every message is one JSON object on one line (UTF-8, ended by a newline, at most ``MAX_LINE`` bytes with it
from a client). The daemon greets first; then the client sends requests, one at a time, each answered by a
return or an error, progress events coming before the answer of the request they belong to:

    <- {"vhdxfs": {"protocol": 1, "version": "0.1.0", "pid": 1234, "kind": "mount", "key": "/mnt/vm",
                   "started": 1764000000.5, "commands": ["checkpoint", "checkpoints", "merge", ...]}}
    -> {"execute": "merge", "arguments": {"image": "disk.raw", "layer": "disk_1.avhdx"}, "id": 7}
    <- {"event": "progress", "data": {"operation": "merge", "phase": "copying (pass 1)", ...}, "id": 7}
    <- {"return": {"layer": "/srv/vm/disk_1.avhdx", "parent": "/srv/vm/disk.vhdx", ...}, "id": 7}
    -> {"execute": "resize", "arguments": {"size": "lots"}}
    <- {"error": {"class": "InvalidArgument", "desc": "size: 'lots' is not a size ...", "errno": 22,
                  "reason": "bad-argument", "file": null}}

``id`` is optional (a string, an integer or null) and comes back as given. Error classes: ``BadRequest``
(not a request: not JSON, not an object, an unknown member, a line too long: the daemon then closes the
connection), ``CommandNotFound``, ``InvalidArgument`` (a missing, unknown or mistyped argument), ``Failed``
(the command ran and failed: ``errno`` and ``reason`` as the engine gave them, ``file`` the file it names),
``Internal`` (a bug; the daemon goes on).

Everything a hostile client can send ends in ``BadMessage`` (a VhdxError) or a request whose arguments have
exactly the declared types: tests/fuzz (the ``control`` target) feeds these functions arbitrary bytes.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import Reason, UsageError, VhdxError
from ..sizes import parse_size

PROTOCOL = 1
MAX_LINE = 64 << 10  # bytes of one client line, newline included: longer ones end the connection
MAX_STRING = 4096  # bytes of a string argument (a path, a name)
MAX_ID = 256  # characters of a string id
MAX_INT = (1 << 63) - 1
SUN_PATH_MAX = 107  # bytes of a unix socket path (a longer one is reached through its directory)
KINDS = ("string", "size", "bool")

# Error classes (the "class" of an error reply).
BAD_REQUEST, NOT_FOUND, INVALID, FAILED, INTERNAL = "BadRequest", "CommandNotFound", "InvalidArgument", "Failed", \
    "Internal"

RequestId = str | int | None


class BadMessage(VhdxError):
    """A line that is not what the protocol allows; ``error_class`` says how, ``request_id`` is the id it
    carried when one could be read (the error reply takes it)."""

    default_errno = errno.EINVAL
    default_reason = Reason.BAD_ARGUMENT

    def __init__(self, message: str, error_class: str = BAD_REQUEST, request_id: RequestId = None) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.request_id = request_id


@dataclass(frozen=True)
class Param:
    """One argument a command takes: ``kind`` string (UTF-8, no NUL, at most MAX_STRING bytes), size (a
    byte count: an integer, or a string with a binary suffix such as "10G") or bool."""

    kind: str
    required: bool = False
    help: str = ""


@dataclass(frozen=True)
class Request:
    command: str
    arguments: dict[str, Any]
    id: RequestId = None


@dataclass(frozen=True)
class Message:
    """What a client reads: a greeting, an event, a return or an error (``kind``), with its ``value``
    (the greeting's object, the event's data, the return value, the error object)."""

    kind: str
    value: Any
    id: RequestId = None
    event: str = ""


# -- reading lines --------------------------------------------------------------------------------------------
class LineReader:
    """Cuts a byte stream into lines; a line (or the start of one) longer than ``limit`` is BadMessage."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The lines ``data`` completes (without their newline or a carriage return before it)."""
        start = len(self._buffer)
        self._buffer += data
        lines = []
        begin = 0
        at = self._buffer.find(b"\n", start)
        while at >= 0:
            if at + 1 - begin > self.limit:
                raise BadMessage(f"a line longer than {self.limit} bytes")
            lines.append(bytes(self._buffer[begin:at]).removesuffix(b"\r"))
            begin = at + 1
            at = self._buffer.find(b"\n", begin)
        del self._buffer[:begin]
        if len(self._buffer) >= self.limit:
            raise BadMessage(f"a line longer than {self.limit} bytes")
        return lines


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _load(line: bytes) -> Any:
    """JSON as the protocol takes it: UTF-8, no NaN or Infinity; every failure is BadMessage."""
    try:
        return json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise BadMessage("JSON nested too deeply") from None
    except ValueError as exc:  # not UTF-8, not JSON, an integer of too many digits
        raise BadMessage(f"not a JSON line: {str(exc)[:200]}") from None


def _id_of(value: Mapping[str, Any]) -> RequestId:
    rid = value.get("id")
    if rid is None or (isinstance(rid, int) and not isinstance(rid, bool) and abs(rid) <= MAX_INT) or (
            isinstance(rid, str) and len(rid) <= MAX_ID):
        return rid
    raise BadMessage("id must be a string (at most 256 characters), an integer or null")


def parse_request(line: bytes) -> Request:
    """A client's line as a request; BadMessage otherwise. The arguments are checked later, against the
    command's ``Param``s (``check_arguments``)."""
    value = _load(line)
    if not isinstance(value, dict):
        raise BadMessage("a request is a JSON object: {\"execute\": COMMAND, \"arguments\": {...}, \"id\": ID}")
    rid = _id_of(value)
    extra = sorted(set(value) - {"execute", "arguments", "id"})
    if extra:
        raise BadMessage(f"unknown member {_shown(extra[0])} in a request", request_id=rid)
    command = value.get("execute")
    if not isinstance(command, str) or not command:
        raise BadMessage("a request names its command in \"execute\" (a string)", request_id=rid)
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        raise BadMessage("\"arguments\" must be a JSON object", INVALID, rid)
    return Request(command, arguments, rid)


def check_arguments(request: Request, params: Mapping[str, Param]) -> dict[str, Any]:
    """The request's arguments, each of its declared type (sizes as byte counts), the ones not given left
    out; InvalidArgument (BadMessage) for anything else."""
    def invalid(message: str) -> BadMessage:
        return BadMessage(f"{request.command}: {message}", INVALID, request.id)

    unknown = sorted(set(request.arguments) - set(params))
    if unknown:
        known = ", ".join(params) or "none"
        raise invalid(f"unknown argument {_shown(unknown[0])} (it takes: {known})")
    out: dict[str, Any] = {}
    for name, param in params.items():
        if name not in request.arguments or request.arguments[name] is None:
            if param.required:
                raise invalid(f"missing argument {name!r}")
            continue
        value = request.arguments[name]
        if param.kind == "bool":
            if not isinstance(value, bool):
                raise invalid(f"{name} must be true or false")
        elif param.kind == "string":
            value = _string(value, name, invalid)
        else:
            value = _size(value, name, invalid)
        out[name] = value
    return out


def _string(value: Any, name: str, invalid: Any) -> str:
    if not isinstance(value, str):
        raise invalid(f"{name} must be a string")
    try:
        raw = value.encode("utf-8", "surrogateescape")  # a file name that is not UTF-8 comes as \udcXX
    except UnicodeEncodeError:
        raise invalid(f"{name} is not a valid string (a lone surrogate)") from None
    if len(raw) > MAX_STRING or "\0" in value or not value:
        raise invalid(f"{name} must be 1 to {MAX_STRING} bytes without NUL")
    return value


def _size(value: Any, name: str, invalid: Any) -> int:
    if isinstance(value, str) and len(value) <= 64:
        try:
            value = parse_size(value, name)
        except UsageError as exc:
            raise invalid(exc.message) from None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
        raise invalid(f"{name} must be a byte count: an integer from 0 to 2^63-1, or a size such as \"10G\"")
    return value


def _shown(name: str) -> str:
    return repr(name[:64])


# -- building lines -------------------------------------------------------------------------------------------
def encode(value: Mapping[str, Any]) -> bytes:
    """One message as its line (ASCII JSON: a file name that is not UTF-8 travels as \\udcXX escapes)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False, default=str).encode() + b"\n"


def greeting(info: Mapping[str, Any]) -> bytes:
    return encode({"vhdxfs": {"protocol": PROTOCOL, **info}})


def request(command: str, arguments: Mapping[str, Any] | None = None, rid: RequestId = None) -> bytes:
    message: dict[str, Any] = {"execute": command, "arguments": dict(arguments or {})}
    if rid is not None:
        message["id"] = rid
    return encode(message)


def reply(value: Any, rid: RequestId = None) -> bytes:
    return encode({"return": value, "id": rid})


def event(name: str, data: Mapping[str, Any], rid: RequestId = None) -> bytes:
    return encode({"event": name, "data": dict(data), "id": rid})


def error_reply(error: Mapping[str, Any], rid: RequestId = None) -> bytes:
    return encode({"error": dict(error), "id": rid})


def error_of(exc: BaseException) -> dict[str, Any]:
    """The error object of an exception: a BadMessage's class, Failed for any other VhdxError (its errno,
    reason and file as they are), Internal for anything else (a bug)."""
    if isinstance(exc, BadMessage):
        return {"class": exc.error_class, "desc": str(exc), "errno": exc.errno, "reason": str(exc.reason),
                "file": exc.path}
    if isinstance(exc, VhdxError):
        return {"class": FAILED, "desc": str(exc), "errno": exc.errno, "reason": str(exc.reason), "file": exc.path}
    return {"class": INTERNAL, "desc": f"internal error ({type(exc).__name__}: {str(exc)[:500]}); see the daemon's log",
            "errno": errno.EIO, "reason": str(Reason.INTERNAL), "file": None}


# -- reading what the daemon says (the client's side) -------------------------------------------------------
def parse_message(line: bytes) -> Message:
    """A daemon's line; BadMessage when it is none of the four."""
    value = _load(line)
    if not isinstance(value, dict):
        raise BadMessage("a message is a JSON object")
    if "vhdxfs" in value:
        if not isinstance(value["vhdxfs"], dict):
            raise BadMessage("a greeting holds an object")
        return Message("greeting", value["vhdxfs"])
    rid = _id_of(value)
    if "return" in value:
        return Message("return", value["return"], rid)
    if "event" in value:
        name, data = value["event"], value.get("data", {})
        if not isinstance(name, str) or not isinstance(data, dict):
            raise BadMessage("an event has a name (a string) and data (an object)")
        return Message("event", data, rid, name)
    if "error" in value:
        error = value["error"]
        if not isinstance(error, dict) or not isinstance(error.get("desc"), str):
            raise BadMessage("an error is an object with a desc")
        return Message("error", error, rid)
    raise BadMessage("not a greeting, event, return or error")


def exception_of(error: Mapping[str, Any]) -> VhdxError:
    """The VhdxError an error object stands for: its errno and reason (when they are ours), its file."""
    code = error.get("errno")
    code = code if isinstance(code, int) and not isinstance(code, bool) and 0 < code < 4096 else errno.EIO
    try:
        reason = Reason(str(error.get("reason")))
    except ValueError:
        reason = Reason.INTERNAL
    desc = str(error.get("desc", ""))
    file = error.get("file")
    if isinstance(file, str) and file and desc.startswith(f"{file}: "):
        return VhdxError(desc[len(file) + 2:], path=file, errno=code, reason=reason)
    return VhdxError(desc, errno=code, reason=reason)
