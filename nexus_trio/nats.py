"""Kernels connected through NATS (needs the ``nats`` extra); see docs/distributed.md."""

from ._nats import *  # noqa: F403
from ._nats import __all__ as __all__
