"""Errors survive pickling (and copying): they cross process boundaries (``--workers``
processes, multiprocessing and thread pools of users) and must arrive as they left."""

from __future__ import annotations

import copy
import importlib
import pickle
import pkgutil
import uuid
from pathlib import Path
from typing import Any

import pytest

import nexus_trio
from nexus_trio import (
    AgentNotFound,
    AgentNotRunning,
    KernelShuttingDown,
    MailboxFull,
    MessageDecodeError,
    MessageFailed,
    NameTaken,
    RequestFailed,
    RequestTimeout,
    SupervisorEscalation,
    TransportUnavailable,
)
from nexus_trio._child import StoppedForShutdown
from nexus_trio._config import CrossKeyError
from nexus_trio._errors import AgentStopped
from nexus_trio._nats._cluster import NodeReplaced
from nexus_trio._nats._placement import PlacementFailed, UnknownAgentType
from nexus_trio._nats._wire import RemoteError
from nexus_trio._router import DeliveryRunFailed
from nexus_trio._supervisor import Escalation
from nexus_trio.bridges.process import ProcessAgentError
from nexus_trio.bridges.python import BadEnvironment, InvalidFrame
from nexus_trio.cli._run import AppError, StoppedWhileImporting
from nexus_trio.cli._spawn import SpawnedProgram, SpawnFailed
from nexus_trio.cli._swarm import NatsServerLost
from nexus_trio.config import ConfigError

ID = uuid.UUID("12345678-1234-5678-1234-567812345678")

#: one error of each class of nexus_trio that has its own __init__, every argument given
ERRORS: list[BaseException] = [
    AgentNotFound("greter", ["greeter", "printer"], detail="not in the cluster"),
    AgentNotFound(ID),
    AgentNotFound("ghost", node="node-c"),
    NameTaken("greeter", ID),
    NameTaken("greeter", ID, node="node-b"),
    NameTaken("twin", ID, tree="twins"),
    MailboxFull(ID, "inbox", 16, ID),
    MailboxFull(ID, None, 16, ID),
    MailboxFull(ID, "col", 8, ID, detail="no credit from node 'b' within 0.5s"),
    KernelShuttingDown("spawn"),
    AgentNotRunning(ID, "worker", "has stopped"),
    RequestTimeout(ID, "calc", 1.5, "the handler returned None"),
    RequestTimeout(ID, ID, 2.0),
    RequestTimeout(ID, ID, 2.0, name="calc"),
    AgentStopped(ID, "worker"),
    MessageFailed("bad input", reason="malformed"),
    MessageDecodeError("kind", "must be one of ...", 3),
    SupervisorEscalation(("root", "sup", "worker"), ValueError("boom")),
    RequestFailed(ID, "calc", "handler_error", ValueError("boom")),
    RequestFailed(ID, "calc", "agent_stopped", None),
    RequestFailed(ID, ID, "handler_error", None, name="calc", node="b"),
    TransportUnavailable("nats is unreachable"),
    ConfigError("must be > 0", path=Path("nexus.toml"), line=3, column=7, key="kernel.x"),
    ConfigError("must be > 0", key="kernel.x", origin="environment variable NEXUS_X"),
    RemoteError("node-b", "ValueError: boom"),
    UnknownAgentType("counter", "node-b"),
    UnknownAgentType("counter", None),
    PlacementFailed("c-1", "node-b", "ValueError: boom"),
    NodeReplaced("b", 4242, "h1", 0xEF),
    ProcessAgentError("calc", "exited (status 3)", 4321),
    ProcessAgentError("calc", "did not start"),
    InvalidFrame("no type", {"type": "message", "payload": 1}),
    BadEnvironment("NEXUS_KERNEL_PROTOCOL", "two", "must be a protocol version (1, 2, ...)"),
    Escalation(("sup", "worker"), ValueError("boom")),
    StoppedForShutdown(ValueError("boom")),
    StoppedForShutdown(None),
    SpawnFailed([SpawnedProgram(("python3", "calc.py"), "calc", problem="exited (status 3)")]),
    StoppedWhileImporting("SIGTERM"),
    AppError("no module named 'agents' (in 'agents:app')", missing="agents"),
    AppError("'agents:app' is no agent"),
    NatsServerLost(["nats://127.0.0.1:4222"], "the connection stayed down 2s"),
    DeliveryRunFailed(3),
    CrossKeyError("max_age below duplicate_window", "durable.max_age", "durable.duplicate_window"),
]


def _comparable(value: Any) -> Any:
    """Exceptions compare by identity: compare their type and args instead."""
    if isinstance(value, BaseException):
        return (type(value), value.args)
    if isinstance(value, list | tuple):
        return [_comparable(item) for item in value]
    if isinstance(value, SpawnedProgram):
        return repr(value)
    return value


def _public_attributes(error: BaseException) -> dict[str, Any]:
    return {
        name: _comparable(value) for name, value in vars(error).items() if not name.startswith("_")
    }


@pytest.mark.parametrize("copier", ["pickle", "copy", "deepcopy"])
@pytest.mark.parametrize(
    "error", ERRORS, ids=[f"{type(e).__name__}-{i}" for i, e in enumerate(ERRORS)]
)
def test_an_error_round_trips_through_pickle_and_copy(error: BaseException, copier: str) -> None:
    """An unpickled AgentNotFound had its message wrapped in ``no agent is registered
    as ...`` twice, KernelShuttingDown and TransportUnavailable their prefix twice, and
    most errors with several arguments (NameTaken, MailboxFull, RequestTimeout, ...)
    could not be unpickled at all (TypeError: missing arguments)."""
    text, args, attributes = str(error), error.args, _public_attributes(error)
    assert attributes  # each carries what it is about
    if copier == "pickle":
        copies = [
            pickle.loads(pickle.dumps(error, protocol))
            for protocol in range(pickle.HIGHEST_PROTOCOL + 1)
        ]
    else:
        copies = [copy.copy(error) if copier == "copy" else copy.deepcopy(error)]
    for back in copies:
        assert type(back) is type(error)
        assert str(back) == text
        assert _comparable(back.args) == _comparable(args)
        assert _public_attributes(back) == attributes


def test_an_unpickled_agent_not_found_keeps_its_hint_but_not_the_kernel_s_table() -> None:
    table = ["greeter", *(f"agent-{i}" for i in range(100))]
    error = AgentNotFound("gretter", table)
    data = pickle.dumps(error)
    assert b"agent-7" not in data  # the table stays behind
    back = pickle.loads(data)
    assert back.args == ("no agent is registered as 'gretter'",)
    assert str(back) == "no agent is registered as 'gretter'; did you mean 'greeter'?"
    assert back.address == "gretter"


def test_every_error_class_with_its_own_init_is_checked_above() -> None:
    """A new error with an __init__ of its own joins ERRORS, so its pickling is checked."""
    for module in pkgutil.walk_packages(nexus_trio.__path__, "nexus_trio."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found: set[type[BaseException]] = set()
    pending: list[type[BaseException]] = [BaseException]
    while pending:
        for sub in pending.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                pending.append(sub)
    own_init = {
        cls
        for cls in found
        if cls.__module__.split(".")[0] == "nexus_trio"
        and "__init__" in vars(cls)
        and not cls.__name__.startswith("_")
    }
    assert len(own_init) >= 20
    assert own_init - {type(error) for error in ERRORS} == set()
