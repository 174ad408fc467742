"""nexus_trio: an agent kernel for Python on Trio.

Thousands to millions of long-lived agents in one process with kernel guarantees:
bounded mailboxes with backpressure, time-bounded send and handle, O(1) routing,
supervision with restarts, graceful ordered shutdown and observability.

<!-- PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing) -->
"""

import sys as _sys

if getattr(_sys, "argv", None) and _sys.argv[0] == "-m":
    # (``python -m``, as runpy imports the packages of the module it runs: for ``python
    # -m nexus_trio.cli run`` SIGINT is taken back here, before the imports below, as the
    # console scripts do; see _nexus_trio_main, outside the package and stdlib-only)
    from contextlib import suppress as _suppress

    with _suppress(ImportError):  # (a copy of the package without the scripts' entry)
        import _nexus_trio_main  # noqa: F401

from ._agent import Agent as Agent
from ._agent import AgentRef as AgentRef
from ._agent import AgentSpec as AgentSpec
from ._agent import Context as Context
from ._agent import Directive as Directive
from ._agent import RestartType as RestartType
from ._agent import agent as agent
from ._config import AppConfig as AppConfig
from ._config import ClusterConfig as ClusterConfig
from ._config import Config as Config
from ._config import DurableConfig as DurableConfig
from ._config import KernelConfig as KernelConfig
from ._config import LoggingConfig as LoggingConfig
from ._config import MetricsConfig as MetricsConfig
from ._config import NatsConfig as NatsConfig
from ._config import OverflowPolicy as OverflowPolicy
from ._config import RestartStrategy as RestartStrategy
from ._config import RuntimeConfig as RuntimeConfig
from ._config import SupervisionConfig as SupervisionConfig
from ._deadletter import DeadLetter as DeadLetter
from ._deadletter import DeadLetterReason as DeadLetterReason
from ._errors import AgentNotFound as AgentNotFound
from ._errors import AgentNotRunning as AgentNotRunning
from ._errors import KernelShuttingDown as KernelShuttingDown
from ._errors import MailboxFull as MailboxFull
from ._errors import MessageDecodeError as MessageDecodeError
from ._errors import MessageFailed as MessageFailed
from ._errors import NameTaken as NameTaken
from ._errors import NexusError as NexusError
from ._errors import RequestFailed as RequestFailed
from ._errors import RequestTimeout as RequestTimeout
from ._errors import SupervisorEscalation as SupervisorEscalation
from ._errors import TransportUnavailable as TransportUnavailable
from ._events import EventKind as EventKind
from ._events import LifecycleEvent as LifecycleEvent
from ._kernel import AgentScan as AgentScan
from ._kernel import Kernel as Kernel
from ._kernel import open_kernel as open_kernel
from ._mailbox import MailboxStatistics as MailboxStatistics
from ._message import SYSTEM_ID as SYSTEM_ID
from ._message import Message as Message
from ._message import MessageKind as MessageKind
from ._message import new_id as new_id
from ._pool import PoolRouting as PoolRouting
from ._pool import pool as pool
from ._pool import pool_workers as pool_workers
from ._pool import resize_pool as resize_pool
from ._router import KernelPhase as KernelPhase
from ._router import TransportHandle as TransportHandle
from ._stats import AgentStats as AgentStats
from ._stats import HistogramSnapshot as HistogramSnapshot
from ._stats import KernelStats as KernelStats
from ._streams import Subscription as Subscription
from ._supervisor import Backoff as Backoff
from ._supervisor import Supervisor as Supervisor
from ._transport import OutsideTold as OutsideTold
from ._transport import QueryFailing as QueryFailing
from ._transport import QueryGivingUp as QueryGivingUp
from ._transport import StopsTold as StopsTold
from ._transport import TakesTells as TakesTells
from ._transport import Transport as Transport
from .logs import configure_logging as configure_logging

__version__ = "0.1.0"

__all__ = [
    "SYSTEM_ID",
    "Agent",
    "AgentNotFound",
    "AgentNotRunning",
    "AgentRef",
    "AgentScan",
    "AgentSpec",
    "AgentStats",
    "AppConfig",
    "Backoff",
    "ClusterConfig",
    "Config",
    "Context",
    "DeadLetter",
    "DeadLetterReason",
    "Directive",
    "DurableConfig",
    "EventKind",
    "HistogramSnapshot",
    "Kernel",
    "KernelConfig",
    "KernelPhase",
    "KernelShuttingDown",
    "KernelStats",
    "LifecycleEvent",
    "LoggingConfig",
    "MailboxFull",
    "MailboxStatistics",
    "Message",
    "MessageDecodeError",
    "MessageFailed",
    "MessageKind",
    "MetricsConfig",
    "NameTaken",
    "NatsConfig",
    "NexusError",
    "OverflowPolicy",
    "PoolRouting",
    "RequestFailed",
    "RequestTimeout",
    "RestartStrategy",
    "RestartType",
    "RuntimeConfig",
    "Subscription",
    "SupervisionConfig",
    "Supervisor",
    "SupervisorEscalation",
    "OutsideTold",
    "QueryFailing",
    "QueryGivingUp",
    "StopsTold",
    "TakesTells",
    "Transport",
    "TransportHandle",
    "TransportUnavailable",
    "agent",
    "configure_logging",
    "new_id",
    "open_kernel",
    "pool",
    "pool_workers",
    "resize_pool",
]


def __getattr__(name: str) -> object:
    if name == "AgentStopped":
        import warnings

        from ._errors import AgentStopped

        warnings.warn(
            "nexus_trio.AgentStopped is deprecated and never raised: a request to an agent "
            "that stops fails with RequestFailed (reason 'agent_stopped')",
            DeprecationWarning,
            stacklevel=2,
        )
        return AgentStopped
    raise AttributeError(f"module 'nexus_trio' has no attribute {name!r}")


def _present_under_public_names() -> None:
    """Public classes and functions report ``nexus_trio`` as their module, as trio's
    ``fixup_module_metadata`` does: reprs, tracebacks and pickles then name
    ``nexus_trio.MailboxFull``, the name users import, not the private module it lives in.

    attrs classes have their string annotations resolved first, while ``__module__``
    still names the module whose globals define them (``typing.get_type_hints`` and
    cattrs look names up in ``sys.modules[cls.__module__]``).
    """
    import contextlib

    import attrs

    prefix = __name__ + "."
    for public in __all__:
        obj = globals()[public]
        if not (isinstance(obj, type) or callable(obj)):
            continue  # values such as SYSTEM_ID
        if not getattr(obj, "__module__", "").startswith(prefix):
            continue
        if isinstance(obj, type) and attrs.has(obj):
            # annotations naming TYPE_CHECKING-only types stay unresolved, as before
            with contextlib.suppress(NameError):
                attrs.resolve_types(obj)
        obj.__module__ = __name__


_present_under_public_names()
