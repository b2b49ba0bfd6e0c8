"""Reaching a cluster safely: addresses, which token goes where, plain HTTP refused to public addresses."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from backends.network.ports import free_port
from orchestrator import access
from tests.core.helpers import orch, write_grid


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary HOME (the real ~/.ray is never touched) with no token settings from outside."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", access.TOKEN_FILE_ENV, access.TOKENS_DIR_ENV,
                access.INSECURE_ENV):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "home" / ".ray").mkdir(parents=True)
    return tmp_path / "home"


@pytest.mark.parametrize(("address", "expected"), [
    ("http://10.0.0.5:8265", ("http", "10.0.0.5", 8265)),
    ("http://head", ("http", "head", 8265)),
    ("ray://10.0.0.5", ("ray", "10.0.0.5", 10001)),
    ("10.0.0.5:6390", ("gcs", "10.0.0.5", 6390)),
    ("https://ray.example.org", ("https", "ray.example.org", 443)),
])
def test_addresses_parse_with_their_default_ports(address: str, expected: tuple[str, str, int]) -> None:
    endpoint = access.parse_address(address)
    assert (endpoint.scheme, endpoint.host, endpoint.port) == expected


@pytest.mark.parametrize(("address", "message"), [
    ("ftp://10.0.0.5", "unknown scheme 'ftp'; allowed: http://HEAD:8265"),
    ("http://10.0.0.5:99999", "the port is not a number in 1-65535"),
    ("http://:8265", "names no host"),
    ("http://10.0.0.5:0", "the port is not a number in 1-65535"),
    ("http://[::1", r"is not a valid URL \(Invalid IPv6 URL\)"),
    ("auto", "orch needs it named: http://HEAD:8265"),
])
def test_bad_addresses_are_named(address: str, message: str) -> None:
    with pytest.raises(access.AccessError, match=message):
        access.parse_address(address)


def test_plain_http_goes_only_to_private_addresses_unless_allowed() -> None:
    for private in ("http://127.0.0.1:8265", "http://10.1.2.3:8265", "192.168.0.9:6379", "http://[fd00::1]:8265"):
        access.check_transport(access.parse_address(private), allow_insecure=False)
    public = access.parse_address("http://8.8.8.8:8265")
    with pytest.raises(access.AccessError, match="refusing plain HTTP to 8.8.8.8, which is not a private address"):
        access.check_transport(public, allow_insecure=False)
    access.check_transport(public, allow_insecure=True)
    access.check_transport(access.parse_address("https://8.8.8.8"), allow_insecure=False)  # TLS is fine


def test_the_cli_refuses_a_public_address_before_connecting(tmp_path: Path) -> None:
    grid = write_grid(tmp_path)
    result = orch("submit", str(grid), "--address", "http://8.8.8.8:8265", timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: refusing plain HTTP to 8.8.8.8") and "--allow-insecure" in lines[0]


def test_each_cluster_gets_only_its_own_token(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (home / ".ray" / "auth_token").write_text("local\n")
    monkeypatch.setenv(access.TOKENS_DIR_ENV, str(tmp_path / "tokens"))
    path, created = access.new_token("10.9.8.7")
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text()) == 64
    head = access.token_for(access.parse_address("http://10.9.8.7:8265"))
    assert head == (path.read_text(), str(path))
    # a cluster on this machine gets Ray's local token; another machine's cluster gets none
    assert access.token_for(access.parse_address("127.0.0.1:6379")) == ("local", str(home / ".ray" / "auth_token"))
    assert access.token_for(access.parse_address("http://10.9.8.8:8265")) is None
    # an explicit token file wins, for any address
    explicit = tmp_path / "explicit"
    explicit.write_text("mine")
    assert access.token_for(access.parse_address("http://10.9.8.8:8265"), explicit) == ("mine", str(explicit))
    with pytest.raises(access.AccessError, match="token file .*missing does not exist"):
        access.token_for(access.parse_address("http://10.9.8.8:8265"), tmp_path / "missing")
    # generated once: a second call keeps the token cluster.yaml already shipped
    again, created_again = access.new_token("10.9.8.7")
    assert again == path and not created_again and access.token_for(access.parse_address("10.9.8.7:6379")) == head


def test_an_address_nobody_listens_on_fails_in_seconds_with_one_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    grid = write_grid(tmp_path)
    # Baseline, same run: the CLI's own start-up (slow on a loaded machine), failing before any connection,
    # here on a Ray Client address (its driver would stay on this machine, and its trials' folders too).
    begin = time.monotonic()
    baseline = orch("submit", str(grid), "--address", "ray://10.0.0.5:10001", timeout=60)
    startup = time.monotonic() - begin
    assert baseline.returncode == 2 and baseline.stderr.strip() == (
        "error: orch does not drive a cluster through Ray Client (ray://10.0.0.5:10001): trial folders would be "
        "paths of this machine; submit through the head's Jobs API (--address http://10.0.0.5:8265), or run orch "
        "on a cluster node with --address 10.0.0.5:6379")
    begin = time.monotonic()
    result = orch("submit", str(grid), "--address", f"127.0.0.1:{port}", timeout=60)
    elapsed = time.monotonic() - begin
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == (f"error: cannot reach the Ray cluster at 127.0.0.1:{port} (connection refused); is it up, "
                        f"and is this the head's address and port?")
    assert elapsed - startup < 10, (elapsed, startup)


@pytest.mark.parametrize(("head", "address"), [("MyHead", "http://myhead:8265"), ("http://10.0.0.5:8265", "10.0.0.5:6379"),
                                             ("[fd00::5]", "http://[FD00::5]:8265")])
def test_a_token_is_filed_under_the_host_its_cluster_is_looked_up_by(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   head: str, address: str) -> None:
    monkeypatch.setenv(access.TOKENS_DIR_ENV, str(tmp_path / "tokens"))
    path, created = access.new_token(head)
    assert created and access.token_for(access.parse_address(address)) == (path.read_text(), str(path))


@pytest.mark.parametrize("head", ["", "../escaped", "/tmp/abs", "a b", "x..y"])
def test_a_head_that_is_not_a_host_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, head: str) -> None:
    monkeypatch.setenv(access.TOKENS_DIR_ENV, str(tmp_path / "tokens"))
    with pytest.raises(access.AccessError, match="HEAD must be the head's host name or IP address"):
        access.new_token(head)
    assert list(tmp_path.iterdir()) == []  # nothing written, anywhere under it


def test_orch_token_creates_the_token_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir = tmp_path / "tokens"
    monkeypatch.setenv(access.TOKENS_DIR_ENV, str(env_dir))
    first = orch("token", "10.9.8.7", timeout=60)
    assert first.stdout.strip() == f"created token for 10.9.8.7: {env_dir / '10.9.8.7'}"
    assert len((env_dir / "10.9.8.7").read_text()) == 64
