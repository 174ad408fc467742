"""Kernels connected through NATS (needs the ``nats`` extra); see docs/distributed.md.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from ._nats import *  # noqa: F403
from ._nats import __all__ as __all__
