"""Where to reach an endpoint bound to an address, and how a URL names that address
(``nexus health`` and the group endpoint of ``nexus run --workers``).

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations


def probe_host(bound: str) -> str:
    """Where to reach an endpoint bound to ``bound``: a wildcard address (all interfaces)
    is reached on this machine's loopback of the same family."""
    if bound in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bound == "::":
        return "::1"
    return bound


def url_host(host: str) -> str:
    """``host`` as a URL or a ``Host`` header names it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
