"""Where the S3 client finds its store and keys: the environment, the shared credentials file and its
profiles, AWS_ENDPOINT_URL and the --s3-endpoint option; and the on-disk cache directory, which a second
open of the same object reads from instead of the store."""

from __future__ import annotations

import json

import vhdxfs
from tests.helpers import vhdxfs as cli


def _without_keys(monkeypatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)


def test_keys_from_a_profile_of_the_shared_credentials_file(images, rgw, tmp_path, monkeypatch):
    _without_keys(monkeypatch)
    creds = tmp_path / "credentials"
    creds.write_text(f"[default]\naws_access_key_id = WRONG\naws_secret_access_key = wrong\n\n"
                     f"[lab]\naws_access_key_id = {rgw.access_key}\naws_secret_access_key = {rgw.secret_key}\n")
    config = tmp_path / "config"
    config.write_text(f"[default]\nendpoint_url = {rgw.endpoint}\n\n"
                      f"[profile lab]\nregion = us-east-1\nendpoint_url = {rgw.endpoint}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the profile's endpoint_url is used
    _path, url = images["fixed"]
    denied = cli("info", url)
    assert denied.returncode == 1 and "refused" in denied.stderr and "AWS_PROFILE" in denied.stderr
    monkeypatch.setenv("AWS_PROFILE", "lab")
    assert json.loads(cli("info", "--json", url, check=True).stdout)["type"] == "fixed"
    monkeypatch.delenv("AWS_PROFILE")
    assert json.loads(cli("--s3-profile", "lab", "info", "--json", url, check=True).stdout)["type"] == "fixed"


def test_the_endpoint_option_wins_over_the_environment(images, rgw, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    _path, url = images["fixed"]
    result = cli("--s3-endpoint", rgw.endpoint, "info", "--json", url)
    assert result.returncode == 0, result.stderr


def test_the_cache_directory_serves_a_second_open(images, proxy, tmp_path, monkeypatch):
    monkeypatch.setenv("VHDXFS_S3_CACHE_DIR", str(tmp_path / "cache"))
    path, url = images["dynamic"]
    with vhdxfs.open(path) as f:
        expected = f.read()
    places = [(i * 7919 * 512) % (60 << 20) for i in range(1, 60)]

    def read_all() -> None:
        with vhdxfs.open(url) as f:
            for off in places:
                f.seek(off)
                assert f.read(4096) == expected[off:off + 4096]

    read_all()
    first = proxy.bytes_out
    read_all()
    again = proxy.bytes_out - first
    assert first > 0 and again < first / 4, (first, again)  # the structures are read anew; the payload is not
    assert any((tmp_path / "cache").iterdir())
