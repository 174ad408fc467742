"""Kernels in several processes and on several hosts, connected through NATS.

Optional: needs the ``nats`` extra (``pip install 'nexus_trio[nats]'``: nats-py and
trio-asyncio). The core never imports this package; a kernel joins a cluster with
:func:`join_cluster`, which attaches a :class:`Cluster` as the kernel's transport.
``docs/distributed.md`` has the guarantees of each path and a three-process example.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

import warnings

try:
    # the extra's packages, before any module of this package imports them: a user without
    # the extra learns which one to install rather than which module was missing
    import nats  # noqa: F401

    # trio-asyncio (0.16) subclasses asyncio.AbstractChildWatcher, deprecated by Python
    # 3.12: its import warns, which a program run with -W error::DeprecationWarning (or a
    # pytest filterwarnings = error) took as an error of `import nexus_trio.nats`, one its
    # user cannot act on. That one warning is ignored here; any other reaches the filters.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "'AbstractChildWatcher' is deprecated", DeprecationWarning
        )
        import trio_asyncio  # type: ignore[import-untyped, import-not-found, unused-ignore]  # noqa: F401
except ModuleNotFoundError as exc:
    raise ModuleNotFoundError(
        "nexus_trio.nats needs the nats extra, which is not installed "
        f"(no module named {exc.name!r}): pip install 'nexus_trio[nats]'",
        name=exc.name,
    ) from None

from ._auth import NatsAuth as NatsAuth
from ._cluster import Cluster as Cluster
from ._cluster import ClusterOptions as ClusterOptions
from ._cluster import ClusterOptionsWarning as ClusterOptionsWarning
from ._cluster import ClusterStats as ClusterStats
from ._cluster import NodeReplaced as NodeReplaced
from ._cluster import cluster_of as cluster_of
from ._cluster import default_node_name as default_node_name
from ._cluster import join_cluster as join_cluster
from ._durable import DurableOptions as DurableOptions
from ._membership import NodeInfo as NodeInfo
from ._placement import PlacedAgent as PlacedAgent
from ._placement import PlacementFailed as PlacementFailed
from ._placement import UnknownAgentType as UnknownAgentType
from ._placement import rendezvous_owner as rendezvous_owner
from ._server import NatsServer as NatsServer
from ._server import NatsServerError as NatsServerError
from ._server import find_nats_server as find_nats_server
from ._watch import ConnectionWatch as ConnectionWatch
from ._wire import RemoteError as RemoteError
from ._wire import type_address as type_address

__all__ = [
    "Cluster",
    "ClusterOptions",
    "ClusterOptionsWarning",
    "ClusterStats",
    "ConnectionWatch",
    "DurableOptions",
    "NatsAuth",
    "NatsServer",
    "NatsServerError",
    "NodeInfo",
    "NodeReplaced",
    "PlacedAgent",
    "PlacementFailed",
    "RemoteError",
    "cluster_of",
    "default_node_name",
    "find_nats_server",
    "join_cluster",
    "type_address",
    "UnknownAgentType",
    "rendezvous_owner",
]
