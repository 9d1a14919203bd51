"""Which servers the load generator may be pointed at (loopback unless allowed), and endpoint URLs."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


class TargetRefused(ValueError):
    """The target URL is not allowed (non-loopback without allow_remote, or not http/https)."""


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals. No DNS: a name could resolve anywhere."""
    h = host.strip("[]").lower().rstrip(".")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_target(url: str, allow_remote: bool = False) -> None:
    """Refuse targets other than this machine's loopback unless explicitly allowed.

    A load generator pointed at someone else's server is a denial-of-service tool; the default
    must be harmless.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused(f"target {url!r} is not an http(s) URL with a host")
    if not allow_remote and not is_loopback_host(parts.hostname):
        raise TargetRefused(
            f"refusing non-loopback target host {parts.hostname!r}: load testing a remote server "
            "can disrupt it; pass --allow-remote (allow_remote=True) if you own it"
        )


def resolve_url(base_url: str, path: str) -> str:
    """Join a base URL and an endpoint path, accepting OpenAI-style base URLs ending in ``/v1``."""
    base = base_url.rstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):
        path = path[3:]
    return base + path
