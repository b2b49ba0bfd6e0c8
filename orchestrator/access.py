"""Reaching a Ray cluster safely: parse its address, pick its token, refuse unsafe transports.

Rules (docs/cluster.md explains them to users):
- A token is sent only to the cluster it belongs to: the file ``--token-file`` names (the user
  said so), else ``~/.orch/tokens/<head host>`` (``orch token HOST`` writes it), else, for a
  cluster on this machine (loopback or one of this machine's own addresses), Ray's local token
  (``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``). No other address
  ever gets a token.
- Ray's Jobs API, GCS and Ray Client speak plain HTTP/gRPC: to an address that is not private
  (loopback, RFC 1918, link-local, unique-local) they are refused unless the user allows it
  (``--allow-insecure`` or ``ORCH_ALLOW_INSECURE=1``), e.g. over a VPN or SSH tunnel.
- Before anything slow, the address is probed with a short timeout, so an unreachable or
  unauthenticated cluster fails in seconds with one line naming the cause.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

TOKENS_DIR_ENV = "ORCH_TOKENS_DIR"
TOKEN_FILE_ENV = "ORCH_TOKEN_FILE"
INSECURE_ENV = "ORCH_ALLOW_INSECURE"
PROBE_TIMEOUT_S = 5.0
DEFAULT_PORTS = {"http": 8265, "https": 443, "ray": 10001, "gcs": 6379}


class AccessError(RuntimeError):
    """A cluster cannot be reached, or must not be reached this way; the message is one line."""


@dataclass(frozen=True)
class Endpoint:
    """A parsed cluster address: ``scheme`` is http | https (Jobs API), ray (Ray Client) or gcs."""

    address: str
    scheme: str
    host: str
    port: int

    @property
    def is_jobs_api(self) -> bool:
        """Whether this is a dashboard (Jobs API) address."""
        return self.scheme in ("http", "https")


def parse_address(address: str) -> Endpoint:
    """``http[s]://HOST[:PORT]``, ``ray://HOST[:PORT]`` or ``HOST:PORT`` (a GCS address)."""
    text = address.strip()
    if text == "auto":
        raise AccessError("address 'auto' is Ray's 'whatever cluster this machine runs'; orch needs it named: "
                          "http://HEAD:8265 (Jobs API) or HEAD:6379 (GCS, on a cluster node)")
    try:
        parts = urlsplit(text if "://" in text else f"gcs://{text}")
    except ValueError as exc:
        raise AccessError(f"address {address!r} is not a valid URL ({exc}); e.g. http://10.0.0.5:8265") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise AccessError(f"address {address!r}: unknown scheme {parts.scheme!r}; allowed: http://HEAD:8265 "
                          "(Jobs API), ray://HEAD:10001 (Ray Client) or HEAD:6379 (GCS)")
    try:
        port = DEFAULT_PORTS[scheme] if parts.port is None else parts.port
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise AccessError(f"address {address!r}: the port is not a number in 1-65535")
    if not parts.hostname:
        raise AccessError(f"address {address!r} names no host; e.g. http://10.0.0.5:8265")
    return Endpoint(address=text, scheme=scheme, host=parts.hostname, port=port)


def _host_addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise AccessError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def is_private(host: str) -> bool:
    """Whether every address ``host`` resolves to is loopback, private or link-local."""
    return all(a.is_loopback or a.is_private or a.is_link_local for a in _host_addresses(host))


def is_loopback(host: str) -> bool:
    """Whether ``host`` resolves to loopback only."""
    return all(a.is_loopback for a in _host_addresses(host))


def is_this_machine(host: str) -> bool:
    """Whether ``host`` is loopback or one of this machine's own addresses (it can be bound here)."""
    for addr in _host_addresses(host):
        if addr.is_loopback:
            return True
        family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((str(addr), 0))
                return True
            except OSError:
                continue
    return False


def tokens_dir() -> Path:
    """Where per-cluster tokens live: ``$ORCH_TOKENS_DIR`` or ``~/.orch/tokens``."""
    return Path(os.environ.get(TOKENS_DIR_ENV) or Path.home() / ".orch" / "tokens")


def _local_ray_token() -> tuple[str, str] | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if path.is_file():
        return path.read_text().strip(), str(path)
    return None


def token_for(endpoint: Endpoint, token_file: str | Path | None = None) -> tuple[str, str] | None:
    """(token, where it came from) for this cluster, or None: only the cluster's own token."""
    token_file = token_file or os.environ.get(TOKEN_FILE_ENV)
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise AccessError(f"token file {path} does not exist")
        return path.read_text().strip(), str(path)
    own = tokens_dir() / endpoint.host
    if own.is_file():
        return own.read_text().strip(), str(own)
    if is_this_machine(endpoint.host):
        return _local_ray_token()
    return None


HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")


def head_host(head: str) -> str:
    """The host a token is filed under, as ``token_for`` looks it up: ``HEAD`` may be a host name,
    an IP address or an address (``http://HEAD:8265``); AccessError (one line) for anything else."""
    wrong = AccessError(f"HEAD must be the head's host name or IP address (got {head!r})")
    try:
        host = parse_address(head).host  # lowercased, brackets of an IPv6 address removed
    except AccessError:
        raise wrong from None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not HOST_NAME.match(host) or ".." in host:
            raise wrong from None
    return host


def new_token(head: str) -> tuple[Path, bool]:
    """Create ``~/.orch/tokens/<host>`` (mode 600) once; returns (path, whether it was created now)."""
    path = tokens_dir() / head_host(head)
    if path.is_file():
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    return path, True


def allow_insecure_default() -> bool:
    """``$ORCH_ALLOW_INSECURE`` set to 1/true/yes."""
    return os.environ.get(INSECURE_ENV, "").lower() in ("1", "true", "yes")


def check_transport(endpoint: Endpoint, allow_insecure: bool) -> None:
    """Refuse plain HTTP/gRPC to an address that is not private, unless allowed."""
    if endpoint.scheme == "https" or allow_insecure or is_private(endpoint.host):
        return
    raise AccessError(
        f"refusing plain {'HTTP' if endpoint.scheme == 'http' else 'gRPC'} to {endpoint.host}, which is not a private "
        f"address (the token and the job would cross the network unencrypted); use the head's private address, a VPN "
        f"or an SSH tunnel, or pass --allow-insecure"
    )


def check_reachable(endpoint: Endpoint, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """AccessError (one line) unless a TCP connection to the endpoint opens within ``timeout_s``."""
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout_s):
            return
    except TimeoutError:
        cause = f"no answer within {timeout_s:g} s"
    except OSError as exc:
        cause = (exc.strerror or str(exc)).lower()
    raise AccessError(f"cannot reach the Ray cluster at {endpoint.address} ({cause}); is it up, and is this the "
                      f"head's address and port?")


def _no_token_hint(endpoint: Endpoint) -> str:
    return (f"put the cluster's token in {tokens_dir() / endpoint.host} (it is the file cluster.yaml ships to "
            f"the nodes) or pass --token-file")


def check_jobs_api(endpoint: Endpoint, token: tuple[str, str] | None, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Ask the Jobs API for its job list with the token: AccessError naming the cause if refused."""
    request = urllib.request.Request(f"{endpoint.scheme}://{endpoint.host}:{endpoint.port}/api/jobs/",
                                     headers=auth_headers(token))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AccessError(f"cannot reach the Ray Jobs API at {endpoint.address} ({reason}); is the dashboard up "
                          f"on that address?") from None
    if status == 401:
        raise AccessError(f"the cluster at {endpoint.address} requires a token and none is configured for "
                          f"{endpoint.host}: {_no_token_hint(endpoint)}")
    if status == 403:
        raise AccessError(f"the cluster at {endpoint.address} refused the token from {token[1] if token else '?'} "
                          f"(wrong token for this cluster)")
    raise AccessError(f"the Ray Jobs API at {endpoint.address} answered HTTP {status}")


def auth_headers(token: tuple[str, str] | None) -> dict[str, str]:
    """The bearer header for ``token`` (or none)."""
    return {"Authorization": f"Bearer {token[0]}"} if token else {}


def ray_auth_env(token: tuple[str, str] | None) -> dict[str, str]:
    """Ray's own auth settings for connecting with ``token``: token mode with it, or auth off."""
    if token:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token[0]}
    return {"RAY_AUTH_MODE": "disabled"}


def describe_ray_error(endpoint: Endpoint, token: tuple[str, str] | None, error: BaseException) -> str:
    """One line for an exception ``ray.init`` raised while connecting."""
    text = str(error)
    if "InvalidAuthToken" in text or "Unauthenticated" in text or "authentication" in text.lower():
        if token is None:
            return (f"the cluster at {endpoint.address} requires a token and none is configured for {endpoint.host}: "
                    f"{_no_token_hint(endpoint)}")
        return f"the cluster at {endpoint.address} refused the token from {token[1]} (wrong token for this cluster)"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return f"cannot connect to the Ray cluster at {endpoint.address}: {first[:300]}"
