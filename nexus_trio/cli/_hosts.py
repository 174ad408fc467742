"""Where to reach an endpoint bound to an address, and how a URL names that address
(``nexus health`` and the group endpoint of ``nexus run --workers``).

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

from .._config import ascii_host, header_host, url_host

__all__ = ["ascii_host", "header_host", "probe_host", "url_host"]


def probe_host(bound: str) -> str:
    """Where to reach an endpoint bound to ``bound``: a wildcard address (all interfaces)
    is reached on this machine's loopback of the same family; an international name in
    its ASCII form, as the endpoint's listener looked it up (:func:`ascii_host`)."""
    if bound in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bound == "::":
        return "::1"
    return ascii_host(bound)
