"""The S3 client: settings, the credential chain, and the few requests vhdxfs makes (HEAD, ranged GET pinned
by ETag, multipart upload), each answer checked before a byte of it is believed.

The library is obstore (README, "Stack": the fastest of those measured, and the lightest to import), loaded
on first use: a command that meets no ``s3://`` URL never imports it. Where it is not installed, the first
S3 URL is refused with what to install.

Settings, each from the first place that has it:

- endpoint: ``configure(endpoint_url=...)`` (the CLI's ``--s3-endpoint``), ``AWS_ENDPOINT_URL_S3``,
  ``AWS_ENDPOINT_URL``, ``endpoint_url`` of the profile in the shared config file; else AWS itself;
- credentials: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``), then the
  profile (``AWS_PROFILE``, else ``default``) in the shared credentials file (``AWS_SHARED_CREDENTIALS_FILE``,
  else ~/.aws/credentials), then in the shared config file (``AWS_CONFIG_FILE``, else ~/.aws/config); with
  none of them obstore's own chain (instance metadata, web identity, container credentials);
- region: ``AWS_REGION``, ``AWS_DEFAULT_REGION``, the profile's ``region``, else us-east-1;
- a request's timeout (``VHDXFS_S3_TIMEOUT``, seconds, 30); retries are the S3 host's (remote.py), so the
  library retries nothing itself.

With an endpoint of its own (an S3-compatible store: Ceph's RADOS Gateway, MinIO...) requests use path-style
addressing, which every such store answers.
"""

from __future__ import annotations

import configparser
import errno
import functools
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import HostIOError, Reason, UnsupportedError, VhdxError
from .locations import S3Location

if TYPE_CHECKING:
    from obstore.store import S3Store

INSTALL_HINT = "install vhdxfs's S3 support: pip install 'vhdxfs[s3]' (the obstore package)"
_overrides: dict[str, str] = {}
_lock = threading.Lock()


def configure(*, endpoint_url: str | None = None, profile: str | None = None) -> None:
    """Settings that win over the environment (the CLI's options); clears the stores made so far."""
    with _lock:
        for key, value in (("endpoint_url", endpoint_url), ("profile", profile)):
            if value:
                _overrides[key] = value
        _make_store.cache_clear()


configure_s3 = configure


class StaleObject(HostIOError):
    """The object is not the one opened any more (its ETag changed): never mixed with what was read."""


class Transient(Exception):
    """A failure that another try may not meet: 5xx, throttling, a timeout, a dropped connection, a body
    that is short or a range that is not the one asked for."""


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str


def _profile_sections(profile: str) -> list[tuple[Path, str]]:
    home = Path.home() / ".aws"
    creds = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or home / "credentials")
    config = Path(os.environ.get("AWS_CONFIG_FILE") or home / "config")
    return [(creds, profile), (config, profile if profile == "default" else f"profile {profile}")]


def _profile_values(profile: str) -> dict[str, str]:
    """The profile's keys, the credentials file's first (as the AWS SDKs read them)."""
    out: dict[str, str] = {}
    for path, section in reversed(_profile_sections(profile)):
        parser = configparser.RawConfigParser()
        try:
            parser.read(path)
        except (OSError, configparser.Error) as exc:
            raise VhdxError(f"cannot read the AWS shared file: {exc}", path=path, reason=Reason.BAD_ARGUMENT) from None
        if parser.has_section(section):
            out.update(parser.items(section))
    return out


def settings() -> dict[str, Any]:
    """What a store is made with: the configuration obstore takes (no secret is printed anywhere)."""
    env = os.environ
    profile = _overrides.get("profile") or env.get("AWS_PROFILE") or "default"
    values = _profile_values(profile)
    if "profile" in _overrides and not values:
        raise VhdxError(f"no AWS profile {profile!r} in the shared credentials or config file",
                        reason=Reason.BAD_ARGUMENT)
    config: dict[str, Any] = {
        "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or values.get("region") or "us-east-1"}
    endpoint = (_overrides.get("endpoint_url") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
                or values.get("endpoint_url"))
    if endpoint:
        config["endpoint"] = endpoint.rstrip("/")
        config["virtual_hosted_style_request"] = False
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        config["access_key_id"] = env["AWS_ACCESS_KEY_ID"]
        config["secret_access_key"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            config["token"] = env["AWS_SESSION_TOKEN"]
    elif values.get("aws_access_key_id") and values.get("aws_secret_access_key"):
        config["access_key_id"] = values["aws_access_key_id"]
        config["secret_access_key"] = values["aws_secret_access_key"]
        if values.get("aws_session_token"):
            config["token"] = values["aws_session_token"]
    return config


def timeout() -> float:
    return float(os.environ.get("VHDXFS_S3_TIMEOUT", "30"))


def _obstore() -> Any:
    try:
        import obstore
    except ImportError:
        raise UnsupportedError(f"s3:// URLs need the S3 client: {INSTALL_HINT}") from None
    return obstore


def store(bucket: str) -> S3Store:
    """The client of ``bucket`` under today's settings (one per bucket and settings, kept)."""
    _obstore()
    return _make_store(bucket, tuple(sorted(settings().items())), timeout())


@functools.lru_cache(maxsize=32)
def _make_store(bucket: str, config_items: tuple[tuple[str, Any], ...], seconds: float) -> S3Store:
    from datetime import timedelta

    from obstore.store import S3Store

    config = dict(config_items)
    client = {"allow_http": str(config.get("endpoint", "")).startswith("http://"), "timeout": f"{seconds:g}s",
              "connect_timeout": f"{min(seconds, 10):g}s", "pool_max_idle_per_host": "32"}
    return S3Store(bucket, config=config, client_options=client,  # type: ignore[arg-type]
                   retry_config={"max_retries": 0, "retry_timeout": timedelta(0)})


_STATUS = re.compile(r"\b([45]\d\d)\b")
_NOISE = re.compile(r"(Generic \w+ error: |Error performing \w+ \S+ in [\d.]+\w+(, after \d+ retries)?"
                    r"( - )?|Server returned non-2xx status code: )")


def _brief(exc: Exception) -> str:
    """The useful part of a client error: its status and reason, or its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = _NOISE.sub("", lines[0] if lines else "").strip(" :-")
    return (text or type(exc).__name__)[:300]


def _classify(exc: Exception, where: S3Location, what: str) -> Exception:
    """An obstore error as ours: Transient where trying again may help, else the VhdxError to raise."""
    from obstore import exceptions as ox

    text = _brief(exc)
    if isinstance(exc, ox.NotFoundError | FileNotFoundError):
        return HostIOError(f"{what}: no such object (or no such bucket) in the store", path=where,
                           errno=errno.ENOENT)
    if isinstance(exc, ox.PreconditionError):
        return StaleObject(f"{what}: the object changed in the store after it was opened (its ETag is not the "
                           "one read so far); refusing to mix two images: open it again", path=where,
                           errno=errno.ESTALE)
    if isinstance(exc, ox.PermissionDeniedError | ox.UnauthenticatedError | PermissionError):
        return HostIOError(f"{what}: the store refused the request ({text}); check the credentials (AWS_PROFILE, "
                           "AWS_ACCESS_KEY_ID) and the endpoint (AWS_ENDPOINT_URL, --s3-endpoint)", path=where,
                           errno=errno.EACCES, reason=Reason.DENIED)
    status = _STATUS.search(text)
    if status and status.group(1).startswith("4") and status.group(1) not in ("408", "429"):
        return HostIOError(f"{what}: the store answered {text}", path=where, errno=errno.EIO)
    return Transient(f"{what}: {text}")


def head(where: S3Location, client: S3Store | None = None) -> ObjectInfo:
    """The object's size and ETag (Transient, or the VhdxError that says why not)."""
    obstore = _obstore()
    try:
        meta = obstore.head(client or store(where.bucket), where.key)
    except Exception as exc:  # obstore's errors, and the client's own (connections, timeouts)
        raise _classify(exc, where, "HEAD") from None
    etag = meta.get("e_tag")
    if not etag:
        raise HostIOError("the store gives no ETag for the object, so a replaced object could not be told apart",
                          path=where, errno=errno.EIO)
    return ObjectInfo(int(meta["size"]), str(etag))


def get_range(where: S3Location, start: int, length: int, etag: str, size: int,
              client: S3Store | None = None) -> memoryview:
    """Exactly the bytes [start, start+length) of the object of ``size`` bytes whose ETag is ``etag``: the
    answer's range, ETag, object size and length are checked (a short body, another range or size is
    Transient, another ETag StaleObject)."""
    obstore = _obstore()
    what = f"GET bytes {start}-{start + length - 1}"
    try:
        result = obstore.get(client or store(where.bucket), where.key,
                             options={"range": (start, start + length), "if_match": etag})
        got_range = tuple(result.range)
        got_etag = result.meta.get("e_tag")
        got_size = result.meta.get("size")
        data = memoryview(result.bytes())
    except Exception as exc:
        raise _classify(exc, where, what) from None
    if got_etag is not None and got_etag != etag:
        raise StaleObject(f"{what}: the store answered for ETag {got_etag}, not the {etag} opened; refusing to mix "
                          "two images", path=where, errno=errno.ESTALE)
    if got_size != size:
        raise Transient(f"{what}: the store answered for an object of {got_size} bytes, not {size}")
    if got_range != (start, start + length):
        raise Transient(f"{what}: the store answered bytes {got_range[0]}-{got_range[1] - 1} instead")
    if len(data) != length:
        raise Transient(f"{what}: the body holds {len(data)} bytes")
    return data


def put_file(where: S3Location, path: str | os.PathLike[str], *, part_size: int = 16 << 20,
             concurrency: int = 8) -> str:
    """Upload a local file as the object (multipart past one part); its ETag."""
    obstore = _obstore()
    try:
        with open(path, "rb") as f:
            result = obstore.put(store(where.bucket), where.key, f, chunk_size=part_size,
                                 max_concurrency=concurrency)
    except OSError as exc:
        raise HostIOError(exc.strerror or str(exc), path=path, errno=exc.errno) from None
    except Exception as exc:
        failure = _classify(exc, where, "PUT")
        if isinstance(failure, Transient):
            raise HostIOError(str(failure), path=where, errno=errno.EIO) from None
        raise failure from None
    return str(result.get("e_tag") or "")


upload_file = put_file
