"""``nexus run``: a kernel with the user's app or a demo workload, live view, signals, summary.

The flow, all inside one ``trio.run``::

    outer nursery: signal watcher, metrics server, live view / progress line
      open_kernel(config)                      leaving it = graceful shutdown
        [join_cluster(kernel, url, node,       with --nats (--types: registered
                      types=...)]              before the node takes placements)
          body nursery: process agents (--spawn), the app or the demo's agents and driver
          wait for: --duration, SIGINT/SIGTERM/SIGHUP, or the app's main() returning
          stop the demo's traffic, cancel the body
    summary from kernel.stats() after the shutdown (in_flight is then 0)

A first SIGINT/SIGTERM/SIGHUP asks for the graceful shutdown; a second SIGINT or SIGTERM
exits at once with status 130 (a SIGHUP never forces: see ``_on_stop_signal``). SIGUSR1
writes the agent tree (``kernel.describe()``) to the log.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import gc
import importlib
import inspect
import io
import json
import logging
import math
import os
import re
import signal
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, TextIO, cast

import attrs
import trio
from rich.console import Console
from rich.live import Live

from .. import KernelStats
from .._agent import CONTEXT_NAMES, Agent, AgentSpec, as_spec
from .._config import Config, app_reference_hint, cut
from .._errors import (
    SupervisorEscalation,
    TransportUnavailable,
    nearest,
    only_cancels,
    raise_held,
)
from .._kernel import Kernel, open_kernel
from .._logcall import log_guarded
from .._plural import count_of
from .._supervisor import Supervisor
from ..logs import escape_control, flush_logs, log_calls_failed, records_lost
from ._encoding import encodes, stand_ins
from ._spawn import (
    OneLineBridgeErrors,
    SpawnedProgram,
    SpawnFailed,
    failure_text,
    note_bridge_stats,
    spawn_programs,
    spawn_summary,
    watch_starts,
)
from ._swarm import NatsServerLost, Swarm, cluster_counts, layout_from_env
from ._view import (
    Sample,
    plain_line,
    render_live,
    render_tree,
    rss_bytes,
    summary_table,
)
from ._workloads import Demo

__all__ = ["AppError", "RunOptions", "execute_run", "load_app", "load_types", "run_async"]

log = logging.getLogger("nexus_trio.cli")

#: above this many agents, spawning shows a progress bar
PROGRESS_THRESHOLD: Final = 10_000
#: seconds between two lines of the plain progress log
PLAIN_INTERVAL: Final = 5.0
#: exit status of a forced exit (second Ctrl-C), as a shell reports SIGINT
FORCED_EXIT: Final = 130
#: exit status of a run whose node was replaced in the cluster (``NodeReplaced``: a later
#: process joined under its node name while this one was cut off or paused past its
#: loss). Not 1: a supervisor told not to restart on it (systemd's
#: ``RestartPreventExitStatus=4``) leaves the name to the later process; one that
#: restarts it starts a process whose join is refused while the later one lives
REPLACED_EXIT: Final = 4
#: ``stopped_by`` of a run that a KeyboardInterrupt reaching its kernel block ended (see
#: :func:`_run_async`)
INTERRUPTED: Final = "interrupted"
#: what ends a run as :data:`INTERRUPTED` when it reaches its kernel block. Not a
#: trio.Cancelled: no app makes one (Trio gives it no public constructor), so one there
#: is the cancel of a scope around the run, which goes on (Trio's rule: only the scope
#: cancelled takes it); taken (forty-ninth pass), it was logged as a failed run
_INTERRUPTS: Final = (KeyboardInterrupt,)


class AppError(Exception):
    """``--app`` (or ``--types``) does not name a usable object; ``missing`` is the module
    of the reference when it was not found (a config file's reference may name a module
    beside the file: the caller can say so)."""

    def __init__(self, message: str, *, missing: str | None = None) -> None:
        super().__init__(message)
        self.missing = missing

    def __reduce__(self) -> tuple[Any, ...]:
        # (pickled and copied whole: Exception's own reduce gives the message alone)
        return (_app_error, (str(self), self.missing))


def _app_error(message: str, missing: str | None) -> AppError:
    return AppError(message, missing=missing)


@attrs.frozen
class RunOptions:
    """Everything ``nexus run`` needs, already validated and resolved against the config."""

    config: Config
    agents: int = 1000
    duration: float = 0.0
    workload: str = "ring"
    rate: float = 0.0
    payload_size: int = 16
    app: str | None = None
    target: Any = None
    #: agent types (``--types``): type name -> spec, registered as the cluster is joined
    types: Mapping[str, Any] | None = None
    json: bool = False
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    #: what gave the metrics port and host, as an error names them: ``--metrics-port``,
    #: or the key and its source, ``[metrics] port (env NEXUS_METRICS__PORT)``
    metrics_port_hint: str = "--metrics-port"
    metrics_host_hint: str = "--metrics-host"
    dump_on_signal: bool = False
    spawn: tuple[tuple[str, ...], ...] = ()
    #: what gave the spawn commands, as a failure names them: ``--spawn``, or the key and
    #: its source, ``[app] spawn (file /etc/nexus/config.toml)``
    spawn_hint: str = "--spawn"
    nats: str | None = None
    node: str | None = None
    live: bool = False
    seed: int | None = None
    #: run the demo workload (no --app, no --spawn and no --types)
    demo: bool = True
    #: ``records_lost()`` before the run set its logging up (the summary counts the run's
    #: own losses: the count is process-wide); None: when the run starts
    records_lost_before: int | None = None
    #: ``log_calls_failed()`` before the run set its logging up (process-wide too); None:
    #: when the run starts
    log_calls_failed_before: int | None = None
    #: a ``--workers`` worker stopped while it imported the app (or the agent types):
    #: what it says (the summary's ``not_started``); it runs nothing, as stopped before it
    #: joined the cluster
    not_started: str | None = None


# --- --app ----------------------------------------------------------------------------------


def _is_agent_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Agent)


def _check_agent_class(cls: type[Agent], where: str = "") -> None:
    """An Agent subclass is made a spec as the kernel spawns it: made one now, so that a
    'def handle' (or on_start, on_stop) is a usage error before the kernel starts, not a
    traceback from inside the run."""
    try:
        as_spec(cls)
    except TypeError as exc:
        raise AppError(f"{where}{exc}") from None


def _app_kind(obj: Any) -> str:
    if isinstance(obj, AgentSpec):
        return "spec"
    if isinstance(obj, Supervisor):
        _check_unique_names([obj])
        return "supervisor"
    if _is_agent_class(obj):
        _check_agent_class(obj)
        return "spec"
    if (
        isinstance(obj, list | tuple)
        and obj
        and all(isinstance(x, AgentSpec | Supervisor) or _is_agent_class(x) for x in obj)
    ):
        for index, item in enumerate(obj):
            if _is_agent_class(item):
                _check_agent_class(item, f"item {index} of the list: ")
        _check_unique_names(obj)
        return "list"
    if inspect.iscoroutinefunction(obj):
        _check_main_signature(obj)
        return "main"
    if inspect.isfunction(obj):
        raise AppError(
            f"{obj.__qualname__} is a plain function ('def'); nexus run awaits it: "
            f"expected 'async def {obj.__qualname__}(kernel)'"
        )
    raise AppError(
        "must be an AgentSpec (@agent) or an Agent subclass, a list of them and of"
        " Supervisors, a Supervisor, or an 'async def main(kernel)'; got"
        f" {type(obj).__name__} {obj!r:.60}"
    )


def _check_unique_names(items: Any) -> None:
    """No agent or supervisor name twice in what ``nexus run`` spawns (the list's items,
    the supervisors' children, all the way down): a name is unique in a kernel, so the
    second spawn failed with ``NameTaken`` once the run had started (exit 1, a traceback),
    the first already running; now a usage error naming both places, before anything
    starts."""
    seen: dict[str, str] = {}

    def walk(item: Any, where: str) -> None:
        children: tuple[Any, ...] = ()
        if isinstance(item, Supervisor):
            name, children = item.name, tuple(item.children)
        else:
            name = as_spec(item).name
        if name is not None:
            if name in seen:
                raise AppError(
                    f"the name {name!r} is given twice, to {seen[name]} and to {where}: a"
                    " name is unique in a kernel; give one of them another, e.g."
                    f" spec.with_options(name='{name}-2')"
                )
            seen[name] = where
        for index, child in enumerate(children):
            walk(child, f"child {index} of supervisor {name or '(unnamed)'}")

    for index, item in enumerate(items):
        walk(item, f"item {index} of the list" if len(items) > 1 else "the app")


def _check_main_signature(main: Callable[..., Any]) -> None:
    """``main`` must accept the kernel as its one positional argument: checked before the
    kernel starts, so a ``main()`` without it is a usage error, not a traceback later."""
    name = getattr(main, "__qualname__", repr(main))
    try:
        signature = inspect.signature(main)
    except (TypeError, ValueError):  # no signature to check (a builtin): let the call tell
        return
    try:
        signature.bind(object())
    except TypeError:
        if next(iter(signature.parameters), None) in CONTEXT_NAMES:
            # handler(ctx, msg): @agent was forgotten
            raise AppError(
                f"{name}{signature} is an agent handler without @agent: decorate it with"
                f" @agent (nexus run spawns it), or give an 'async def {name}(kernel)'"
            ) from None
        raise AppError(
            f"{name}{signature} cannot be called as {name}(kernel): nexus run passes the "
            f"kernel, so it must be 'async def {name}(kernel)'"
        ) from None


#: the nexus_trio package's directory, with a trailing separator
_NEXUS_TRIO_DIR: Final = os.path.join(os.path.dirname(os.path.dirname(__file__)), "")


def _where(exc: BaseException) -> str:
    """``file:line`` where ``exc`` was raised, for an error while importing an app: the
    innermost frame outside the standard library, site-packages, importlib and nexus_trio
    (the app's line that failed), else the innermost frame."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")
    ]
    library = tuple(
        {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
        # nexus_trio itself, also from a checkout (pip install -e): the app's line that
        # called it is the place (an @agent that refused a handler)
        | {_NEXUS_TRIO_DIR}
    )
    # (and no generated code: attrs names the __init__ it writes '<attrs generated ...>')
    own = [f for f in frames if not f.filename.startswith((*library, "<"))]
    chosen = own or frames
    if not chosen:
        return "?"
    return f"{chosen[-1].filename}:{chosen[-1].lineno}"


def load_app(reference: str) -> Any:
    """Import ``package.module:attr`` (the current directory is importable, as with ``-m``)."""
    obj = _import_reference(reference)
    _app_kind(obj)
    return obj


def load_types(reference: str) -> dict[str, Any]:
    """The agent types ``package.module:attr`` names (``--types``), checked before anything
    starts: a mapping of type names (what ``cluster.spawn`` takes: letters, digits, ``-``
    and ``_``) to AgentSpecs (``@agent``) or Agent subclasses; AppError naming what is wrong
    otherwise."""
    from .._nats._placement import check_agent_type

    obj = _import_reference(reference)
    if not isinstance(obj, Mapping):
        raise AppError(
            f"{cut(reference)} must be a mapping of agent type names to AgentSpecs (@agent) or"
            f" Agent subclasses, e.g. {{'counter': Counter}}; got {type(obj).__name__}"
            f" {obj!r:.60}"
        )
    if not obj:
        raise AppError(f"{cut(reference)} is an empty mapping: no agent type to register")
    types: dict[str, Any] = {}
    for type_name, spec in obj.items():
        try:
            check_agent_type(type_name, spec)  # what cluster.register_type refuses
        except (TypeError, ValueError) as exc:
            raise AppError(f"{cut(reference)}: {exc}") from None
        types[type_name] = spec
    return types


def _import_reference(reference: str) -> Any:
    """The object ``package.module:attr`` names (the current directory is importable)."""
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise AppError(f"expected 'package.module:attr', got {cut(reference, repr)}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            # without a likely meant reference, where it was looked for: a config file's
            # [app] app is imported from the current directory, not the file's
            where = app_reference_hint(reference) or (
                f"; it is looked for in the current directory ({cwd}), PYTHONPATH and the"
                " installed packages"
            )
            raise AppError(
                f"no module named {cut(module_name, repr)} (in {cut(reference, repr)}){where}",
                missing=None if where.startswith("; did you mean") else module_name,
            ) from None
        raise AppError(
            f"importing {cut(module_name, repr)} failed at {_where(exc)}: {exc}"
        ) from exc
    except Exception as exc:
        raise AppError(
            f"importing {cut(module_name, repr)} failed at {_where(exc)}:"
            f" {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    parts = attr.split(".")
    for index, part in enumerate(parts):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            near = nearest(part, [name for name in dir(obj) if not name.startswith("_")])
            # (the closest, written as --app takes it)
            hint = ""
            if near is not None:
                meant = module_name + ":" + ".".join([*parts[:index], near])
                hint = f"; did you mean {cut(meant, repr)}?"
            raise AppError(
                f"module {cut(module_name, repr)} has no attribute {cut(attr, repr)}{hint}"
            ) from None
    return obj


# --- run state, signals and the view ----------------------------------------------------------


class _State:
    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.phase = "starting"
        self.stop_event = trio.Event()
        self.stopped_by: str | None = None
        self.signals = 0
        self.kernel: Kernel | None = None
        self.demo: Demo | None = None
        self.live: Live | None = None
        self.t0 = trio.current_time()
        self.records_lost_before = (
            records_lost() if opts.records_lost_before is None else opts.records_lost_before
        )
        self.log_calls_failed_before = (
            log_calls_failed()
            if opts.log_calls_failed_before is None
            else opts.log_calls_failed_before
        )
        self.t_spawned: float | None = None
        self.t_stop: float | None = None
        self.peak_rss = 0
        self.agents_at_stop = 0
        #: messages processed (handled + replies delivered + forwarded) when the run
        #: started and when it stopped: the run's rate is theirs, not the shutdown's
        self.processed_at_start = 0
        self.processed_at_stop: int | None = None
        #: when the final frame was drawn: the summary's end, so both show the same times
        self.t_end: float | None = None
        self.spawn_progress: tuple[int, int] | None = None
        #: the --spawn programs, and those whose first start failed
        self.programs: list[SpawnedProgram] = []
        #: set once every --spawn program has registered or failed (--duration counts
        #: from then, as it counts from the end of the demo's spawning)
        self.programs_started = trio.Event()
        self.failed_programs: list[SpawnedProgram] = []
        #: the outer nursery, for watchers that must outlive the body (until the summary)
        self.outer: trio.Nursery | None = None
        #: this worker's part of a ``--workers`` swarm (None: a run of its own)
        self.swarm: Swarm | None = None
        #: traffic with other nodes (with --nats), for the summary
        self.cluster_counts: dict[str, Any] | None = None
        #: when the kernel's shutdown started (the summary's ``elapsed_s.shutdown``)
        self.t_shutdown: float | None = None
        #: the ``open_kernel`` block was left (a shutdown that starts then is the
        #: block's exit: an error, an escalation; no agent asked for it)
        self.block_left = False
        #: what systemd was told (``NOTIFY_SOCKET``): READY=1, then STOPPING=1 once
        self.told_ready = False
        self.told_stopping = False

    def run_rate(self, processed_now: int, now: float) -> float:
        """Messages per second from the start of the run (the workload running) to its
        stop, without the spawning before it or the shutdown after it."""
        start = self.t_spawned if self.t_spawned is not None else self.t0
        stop = self.t_stop if self.t_stop is not None else now
        done = self.processed_at_stop if self.processed_at_stop is not None else processed_now
        return (done - self.processed_at_start) / (stop - start) if stop > start else 0.0

    def note_stop(self, kernel: Kernel) -> None:
        """The run stopped (its duration, a signal, an agent's shutdown): what ran, as
        the kernel shows it now, before the shutdown stops any agent; once."""
        if self.t_stop is not None:
            return
        self.t_stop = trio.current_time()
        at_stop = kernel.stats()
        self.agents_at_stop = at_stop.agents_alive
        self.processed_at_stop = _processed(at_stop)
        note_bridge_stats(self.programs, kernel)

    def readiness(self) -> str | None:
        """The run's part of the kernel's ``/readyz`` (``metrics.add_readiness``): not
        ready while it starts (a cluster's join, which adds ``not joined`` of its own;
        the spawning; a swarm's wait for its workers), ready while the workload runs,
        not ready again from the stop on (a signal, ``--duration``, the app's end)."""
        if self.stop_event.is_set():
            return "shutting down"
        if self.phase in ("starting", "spawning"):
            return "starting"
        return None

    def request_stop(self, reason: str) -> None:
        if self.stopped_by is None:
            self.stopped_by = reason
        self.stop_event.set()

    def stop_live(self) -> None:
        if self.live is not None:
            with contextlib.suppress(Exception):
                self.live.stop()
            self.live = None


def _dump(state: _State, why: str) -> None:
    if state.kernel is None:
        log_guarded(log, logging.WARNING, "%s: no kernel yet", why)
        return
    # One record per line: log text is escaped (a newline in a message is written \n, so
    # that agent names cannot forge lines), and the tree must stay readable.
    title, *lines = render_tree(state.kernel.describe()).split("\n")
    log_guarded(log, logging.WARNING, "%s: %s", why, title)
    for line in lines:
        log_guarded(log, logging.WARNING, "%s", line)


#: a hangup: the terminal (or ssh session) the run was started from is gone
_SIGHUP: Final = getattr(signal, "SIGHUP", None)
#: SIGINT/SIGTERM/SIGHUP that came before the run's signal receiver was open (in a worker)
_early_signals: list[int] = []
#: set once this process took a SIGHUP as a stop: its terminal is gone, and writing the
#: summary there may fail (see :func:`print_summary`)
_hangups: list[int] = []
#: [the stop signals noted early interrupt the import of the app (:func:`stops_interrupt`),
#: whether they raise where the main thread is, and whether an import is under way]
_interrupts: dict[str, bool] = {"enabled": False, "armed": False, "importing": False}
#: the stop signals that came while the app was imported (:func:`stops_interrupt`), in
#: the order they came: those :func:`_note_early` notes, and a Ctrl-C outside a worker
#: (:func:`_interrupt_import`)
_import_stops: list[int] = []


def stop_signals() -> tuple[int, ...]:
    """The signals that stop a run gracefully: SIGINT, SIGTERM and, on POSIX, SIGHUP,
    unless SIGHUP is ignored (``nohup``, or a parent that ignores it: it stays ignored)."""
    wanted = [signal.SIGINT, signal.SIGTERM]
    if _SIGHUP is not None and signal.getsignal(_SIGHUP) is not signal.SIG_IGN:
        wanted.append(_SIGHUP)
    return tuple(wanted)


def is_hangup(signum: int) -> bool:
    """True for SIGHUP."""
    return signum == _SIGHUP


def note_hangup() -> None:
    """This process took a SIGHUP as its stop (its terminal is gone): a summary that
    cannot be written then is not an error (:func:`print_summary`)."""
    _hangups.append(1)


def hung_up() -> bool:
    """True once this process took a SIGHUP as a stop (:func:`note_hangup`)."""
    return bool(_hangups)


class StoppedWhileImporting(KeyboardInterrupt):
    """A stop signal that came while ``nexus run`` imported the app or the agent types
    (:func:`stops_interrupt`; a worker's SIGTERM, a SIGHUP): the run was not started."""

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        #: the first stop signal noted (``SIGTERM``: a worker's parent's stop; ``SIGHUP``)
        self.signame = signame


def _stopped_while_importing() -> StoppedWhileImporting:
    """The interrupt of an import for the first stop signal noted."""
    return StoppedWhileImporting(signal.Signals(_early_signals[0]).name)


def _note_early(signum: int, _frame: object) -> None:
    if is_hangup(signum):
        note_hangup()
    _early_signals.append(signum)
    if _interrupts["importing"]:
        _import_stops.append(signum)
    if _interrupts["armed"]:
        # Once: disarmed here, not by the code it interrupts (the exception may land in
        # the line that would), and a second stop is noted only (the run forces it).
        _interrupts["armed"] = False
        raise _stopped_while_importing()


def _interrupt_import(signum: int, _frame: object) -> None:
    """SIGINT's handler while the app is imported outside a worker, in place of Python's:
    it raises KeyboardInterrupt as Python's does, at each Ctrl-C, and notes when it came
    among the stops (:func:`stops_interrupt` decides by that order). A Ctrl-C after a
    stop signal of this import (a SIGTERM, a SIGHUP) is that stop's second: noted too,
    for the run to force it, as a second stop forces a run's."""
    if _import_stops and _import_stops[0] != signal.SIGINT:
        _early_signals.append(signum)
    _import_stops.append(signum)
    raise KeyboardInterrupt


@contextlib.contextmanager
def stops_interrupt() -> Iterator[None]:
    """Around the import of the user's module: a stop signal noted early (in a
    ``--workers`` worker the parent's SIGTERM; elsewhere a SIGHUP) raises
    :class:`StoppedWhileImporting` (a KeyboardInterrupt) where the import is, as Ctrl-C
    does, rather than waiting for the import to end (seconds with a slow one), and the
    app's ``main`` is not called after the stop. One noted before the block raises it
    at once, without the import; one the block did not end by (it came as the import
    returned, or the import caught ``BaseException`` and went on, or made another
    error of it) raises it as the block ends, in place of what it returned or raised:
    a stop noted until then always means not started. The signals stay noted (the run
    would take them). Before :func:`catch_stop_signals_early`, it does nothing.

    Outside a worker, a SIGINT is Python's KeyboardInterrupt there (see
    :func:`catch_stop_signals_early`), raised by :func:`_interrupt_import` while the
    block runs, which notes when it came: the first stop to come decides how the block
    ends, not the exception that went out last. A Ctrl-C first ends it by a
    KeyboardInterrupt (a SIGTERM after it still interrupts an import that went on, as
    before); a SIGTERM or SIGHUP first by :class:`StoppedWhileImporting`, and a Ctrl-C
    after it is noted as its second stop (the run forces it). An app that raises and
    catches a KeyboardInterrupt of its own is no Ctrl-C: a SIGTERM that comes while it
    handles it is the first stop."""
    if not _interrupts["enabled"]:
        yield
        return
    _interrupts["armed"] = True  # (before the look at those noted: none slips between)
    ours = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    previous = signal.signal(signal.SIGINT, _interrupt_import) if ours else None
    _import_stops.clear()
    _interrupts["importing"] = True
    try:
        if _early_signals:  # a stop before: no import
            raise _stopped_while_importing()
        yield
    finally:
        _interrupts["armed"] = _interrupts["importing"] = False
        # (Python's back, unless the import set SIGINT's handler of its own)
        if previous is not None and signal.getsignal(signal.SIGINT) is _interrupt_import:
            signal.signal(signal.SIGINT, previous)
        ctrl_c_first = ours and _import_stops[:1] == [signal.SIGINT]
        if _early_signals:  # (whatever the block ended with: not started)
            if ctrl_c_first:
                raise KeyboardInterrupt
            raise _stopped_while_importing()


def catch_stop_signals_early(*, worker: bool = True) -> None:
    """From as early as ``nexus run`` can: the stop signals (:func:`stop_signals`) are
    noted, and the run takes them as received as soon as its receiver is open; one
    that comes after the run (its summary being printed) is noted and ignored: the run
    is over. A SIGHUP that is ignored (``nohup``) stays ignored.

    In a ``--workers`` worker (``worker``): SIGINT, SIGTERM and SIGHUP. The parent starts
    each worker with them blocked (``_cluster_cmd``): a stop it passes on while the
    worker still starts (imports, loads its config) is held pending, not the end of the
    worker by SIGTERM's default action (no summary, taken for a death); they are let
    through here, once noted instead, and they interrupt the import of the app that
    follows (:func:`stops_interrupt`).

    Elsewhere (a run of its own, the ``--workers`` parent) SIGTERM and SIGHUP: a hangup
    may come twice (see :func:`_on_stop_signal`), and one more after the run would
    otherwise end the process by its default action while it writes the summary; one
    while the app is imported interrupts the import (:func:`stops_interrupt`), as a
    Ctrl-C does. A SIGTERM until the run's receiver opened (the config loaded, the app
    imported: a second or more) ended the process by its default action (status 143,
    no summary, nothing said), where one a moment later was the run's graceful stop. There, a SIGINT the
    process inherited ignored (a background job of a shell without job control, such as
    ``nexus run ... &`` in a script, or some CI runners) gets Python's own handler back:
    the run takes Ctrl-C as its stop whatever it inherited (its receiver does, once it
    runs), and so does the import of the app before it (a KeyboardInterrupt: the run
    was not started). (Outside the main thread, where Python takes no signal handler,
    nothing is done.)"""
    if threading.current_thread() is not threading.main_thread():
        return
    _interrupts["enabled"] = True
    if not worker and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    handled = tuple(s for s in stop_signals() if worker or s != signal.SIGINT)
    for signum in handled:
        signal.signal(signum, _note_early)
    # (those that came while nexus started, noted by its entry: the run's too)
    entry = sys.modules.get("_nexus_trio_main")
    if entry is not None and not worker:
        for signum in entry.stops_while_starting():
            _note_early(signum, None)
    # (once per process: it leaves a handler that is not this module's alone)
    atexit.unregister(_ignore_noted_signals)
    atexit.register(_ignore_noted_signals)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)


def _ignore_noted_signals() -> None:
    """At this process's exit (``atexit``): the signals :func:`_note_early` notes are
    ignored outright. Python's finalization, after the ``atexit`` calls, sets a signal
    whose handler is a Python function back to its default action, which for these ends
    the process: a ``--workers`` worker whose summary the parent had read, reached by
    the SIGTERM it passed on (another worker failed, a Ctrl-C) as it exited, was taken
    for one killed by SIGTERM (exit status 143, not its own), and a second SIGHUP as a
    run exited ended it with status 129. The run is over by then: they would be noted
    and ignored."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in stop_signals():
        if signal.getsignal(signum) is _note_early:
            signal.signal(signum, signal.SIG_IGN)


def take_early_signals() -> list[int]:
    """The stop signals :func:`catch_stop_signals_early` noted so far, in order; they are
    the caller's now (the next call returns only those noted after). The caller is a
    run's receiver: from now on a stop noted is one after the run began (see
    :func:`stops_not_taken`)."""
    _taken["by_a_run"] = True
    early, _early_signals[:] = list(_early_signals), []
    return early


#: whether a run's receiver (the run's own, the ``--workers`` parent's) took the stops
#: noted before it (:func:`take_early_signals`)
_taken = {"by_a_run": False}


def stops_not_taken() -> list[int]:
    """The stop signals :func:`catch_stop_signals_early` noted that no run took, in order:
    the command ended before any run began (``--generate-config``, a config or flag
    refused), which the entry ends the process by at its exit
    (``_nexus_trio_main.end_by_a_stop_not_taken``). Once a run took them, none: one
    noted after it is noted and ignored (:func:`note_stops_after_the_run`)."""
    return [] if _taken["by_a_run"] else list(_early_signals)


def _watched_signals() -> list[int]:
    wanted = list(stop_signals())
    usr1 = getattr(signal, "SIGUSR1", None)
    if usr1 is not None:
        wanted.append(usr1)
    return wanted


def note_stops_after_the_run() -> None:
    """For the ``nexus`` process itself (its entry point, :func:`nexus_trio.cli.main`):
    a SIGINT or SIGTERM that comes once the run is over — its summary being written, the
    process exiting — is noted and ignored, as a SIGHUP then is (see
    :func:`catch_stop_signals_early`): there is nothing left to force, and the summary
    and the run's status stand. Python's own handling of them came back when the run's
    receiver closed: a KeyboardInterrupt in the middle of the summary or in an exit
    function, or the process ended by SIGTERM's default action after its whole summary
    (status -15). Not for a run called in a process that goes on (a test): its Ctrl-C
    stays Python's."""
    _late_stops["noted"] = True


#: whether a stop signal after the run is noted (see :func:`note_stops_after_the_run`)
_late_stops = {"noted": False}


def _note_late_stops() -> None:
    """Called before ``trio.run``: the stop signals with Python's handling are noted from
    now on (see :func:`note_stops_after_the_run`); an ignored one stays ignored. The
    run's receiver hands each to the run while it is open, and one noted before it
    opens is the run's as it opens (:func:`take_early_signals`); after it, they are
    noted and ignored, and at the exit :func:`_ignore_noted_signals` ignores them
    outright. (Before ``trio.run``, not in it: Trio puts back Python's handler of
    SIGINT as its run ends.)"""
    if not _late_stops["noted"] or threading.current_thread() is not threading.main_thread():
        return
    for signum in stop_signals():
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(signum, _note_early)


@contextlib.contextmanager
def _each_signal(signums: list[int]) -> Iterator[trio.MemoryReceiveChannel[int]]:
    """The signals ``signums`` as they come, each arrival one item, in order.

    ``trio.open_signal_receiver`` merges a signal that comes again before it is taken
    (its documented behaviour): two SIGINTs that came before the run's signal task woke
    for the first (back to back, or 10 ms apart under a busy kernel of 10,000 agents)
    were one stop, and the second Ctrl-C did not force the exit. Here each arrival is
    handed to the run by ``run_sync_soon``, which a signal handler may call. What
    arrived and was not taken when the block ends is dropped: the run is over."""
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[int](math.inf)

    def offer(signum: int) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            send.send_nowait(signum)

    def arrived(signum: int, _frame: object) -> None:
        token.run_sync_soon(offer, signum)

    previous: list[tuple[int, Any]] = []
    try:
        for signum in signums:
            previous.append((signum, signal.signal(signum, arrived)))
        yield receive
    finally:
        for signum, handler in reversed(previous):
            signal.signal(signum, handler)
        send.close()
        receive.close()


async def _watch_signals(
    state: _State, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    usr1 = getattr(signal, "SIGUSR1", None)
    with _each_signal(_watched_signals()) as receiver:
        # (those noted before, now that the receiver takes the next ones)
        for signum in take_early_signals():
            _on_stop_signal(state, signum)
        task_status.started()
        async for signum in receiver:
            if signum == usr1:
                _dump(state, "SIGUSR1")
            else:
                _on_stop_signal(state, signum)


def _on_stop_signal(state: _State, signum: int) -> None:
    """A SIGINT/SIGTERM/SIGHUP: the first asks for the graceful stop, a next SIGINT or
    SIGTERM forces it. A SIGHUP never forces: a hangup may come twice (the shell passes
    its own on, and the kernel sends one more to the foreground job when the shell
    exits), and the terminal it came from is gone: nobody asked for a forced exit."""
    name = signal.Signals(signum).name
    if is_hangup(signum):
        note_hangup()
        if state.signals:
            log_guarded(log, logging.WARNING, "%s: the stop is already under way", name)
            return
    state.signals += 1
    if state.signals > 1:
        state.stop_live()
        log_guarded(
            log,
            logging.ERROR,
            "%s again: forced exit, without waiting for the shutdown",
            name,
        )
        flush_logs()  # (os._exit closes no handler; this waits FLUSH_TIMEOUT at most)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(FORCED_EXIT)
    log_guarded(
        log,
        logging.WARNING,
        "%s: shutting down gracefully (%s)",
        name,
        "the terminal hung up" if is_hangup(signum) else "send it again to force",
    )
    if state.opts.dump_on_signal:
        _dump(state, name)
    state.request_stop(name)


def _processed(stats: KernelStats) -> int:
    return stats.handled + stats.replies_delivered + stats.forwarded


def _final_sample(state: _State, kernel: Kernel) -> Sample:
    """The last frame: the run's rate and times, the same figures as the summary."""
    stats = kernel.stats()
    now = state.t_end if state.t_end is not None else trio.current_time()
    start = state.t_spawned if state.t_spawned is not None else state.t0
    stop = state.t_stop if state.t_stop is not None else now
    rss = rss_bytes()
    state.peak_rss = max(state.peak_rss, rss)
    return Sample(
        elapsed=stop - start,
        phase="done",
        stats=stats,
        rate=state.run_rate(_processed(stats), now),
        rss=rss,
        total=now - state.t0,
        rate_label="msg/s during run",
    )


def _sample(state: _State, kernel: Kernel, rate: float) -> Sample:
    rss = rss_bytes()
    state.peak_rss = max(state.peak_rss, rss)
    # the clock of the run (as --duration counts), or of the spawning before it
    since = state.t_spawned if state.t_spawned is not None else state.t0
    return Sample(
        elapsed=trio.current_time() - since,
        phase=state.phase,
        stats=kernel.stats(),
        rate=rate,
        rss=rss,
    )


async def _watch(state: _State, kernel: Kernel, title: str) -> None:
    """Refresh the live view (at most 4 times a second) or log a plain line every few seconds."""
    opts = state.opts
    # stats() is O(1); a redraw of the live view is not free: big runs redraw less often
    live_interval = 0.25 if opts.agents <= 100_000 else 1.0
    interval = live_interval if opts.live else PLAIN_INTERVAL
    # a worker of --workers names itself: N workers' lines share the parent's stderr
    worker = opts.node if opts.node is not None and _is_worker(opts.node) else None
    last_t = trio.current_time()
    first = kernel.stats()
    last_n = first.handled + first.replies_delivered + first.forwarded
    while True:
        await trio.sleep(interval)
        now = trio.current_time()
        s = kernel.stats()
        n = s.handled + s.replies_delivered + s.forwarded
        rate = (n - last_n) / (now - last_t) if now > last_t else 0.0
        last_t, last_n = now, n
        sample = _sample(state, kernel, rate)
        if state.live is not None:
            state.live.update(
                render_live(title, sample, opts.duration, state.spawn_progress), refresh=True
            )
        elif not opts.live:
            log_guarded(log, logging.INFO, "%s", plain_line(sample, node=worker))


class _StderrProxy(io.TextIOBase):
    """Writes to whatever ``sys.stderr`` is at the time (so rich's Live can redirect logs)."""

    def write(self, s: str) -> int:
        return sys.stderr.write(s)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()

    @property
    def writes_through_to(self) -> Any:
        """What each write goes to, unchanged (so that the log handler can write a record
        to the file beneath it whole: see ``nexus_trio.logs``)."""
        return sys.stderr


def stderr_proxy() -> TextIO:
    return cast(TextIO, _StderrProxy())


# --- the run ------------------------------------------------------------------------------------


def _title(opts: RunOptions) -> str:
    if opts.app:
        return f"app {opts.app}"
    if not opts.demo and opts.spawn:
        return f"spawn: {count_of(len(opts.spawn), 'process agent')}"
    if not opts.demo:
        return f"agent types {', '.join(opts.types or ())}"
    return f"{opts.workload} workload · {count_of(opts.agents, 'agent')}"


def _spawn(state: _State, kernel: Kernel) -> None:
    """Spawn the --spawn programs; a first start that fails stops the run (see _spawn)."""
    opts = state.opts
    # Subscribed before the spawns, so that no start or failure goes unseen.
    events = kernel.events(buffer=4096)

    def failed(program: SpawnedProgram) -> None:
        state.failed_programs.append(program)
        log_guarded(log, logging.ERROR, "%s", failure_text(program))
        state.request_stop("spawn failed")

    state.programs = spawn_programs(kernel, opts.spawn, opts.spawn_hint)
    assert state.outer is not None

    async def watch() -> None:
        async with events:
            await watch_starts(
                kernel,
                events,
                state.programs,
                failed,
                give_ups=True,
                all_started=state.programs_started,
            )

    state.outer.start_soon(watch)


def _spawn_progress(state: _State, total: int) -> Callable[[int], None]:
    """Progress of a bulk spawn: a bar in the live view above PROGRESS_THRESHOLD agents."""
    if total > PROGRESS_THRESHOLD:
        log_guarded(log, logging.INFO, "spawning %d agents", total)  # (many: see above)
        if state.live is not None:
            state.spawn_progress = (0, total)

    def update(done: int) -> None:
        if state.spawn_progress is not None:
            state.spawn_progress = (done, total)

    return update


async def _run_app(state: _State, kernel: Kernel, nursery: trio.Nursery) -> None:
    target = state.opts.target
    kind = _app_kind(target)
    if kind == "main":

        async def main() -> None:
            try:
                await target(kernel)
            except BaseException as exc:
                # Trio writes repr() of a task's error (its nursery's cancel reason): an
                # error or a sys.exit argument whose repr() raises made that a
                # TrioInternalError and a cascade of tracebacks, exit 1 (until the
                # fifty-seventh pass; inside a group too, until its review). The run
                # ends with a stand-in that says so.
                if (shown := _showable(exc)) is not exc:
                    raise shown  # noqa: B904 (_showable set its cause)
                raise
            state.request_stop("app finished")

        nursery.start_soon(main)
        return
    targets = list(target) if kind == "list" else [target]
    for t in targets:
        ref = kernel.spawn(t if isinstance(t, Supervisor) else as_spec(t))
        log_guarded(log, logging.INFO, "spawned %s", ref.name or ref.id)


async def _spawn_demo(state: _State, kernel: Kernel, body: trio.Nursery) -> None:
    """Spawn the demo's agents (a swarm worker: its share, once it knows where every
    agent runs), then drive them, unless the run was stopped meanwhile."""
    opts = state.opts
    swarm = state.swarm
    demo = Demo(
        kernel,
        opts.workload,
        opts.agents,
        rate=opts.rate,
        payload_size=opts.payload_size,
        seed=opts.seed,
        swarm=None if swarm is None else swarm.layout,
        resolve=None if swarm is None else swarm.resolve,
    )
    state.demo = demo
    progress = _spawn_progress(state, opts.agents)
    try:
        await demo.spawn(progress=progress, should_stop=state.stop_event.is_set)
    finally:
        state.spawn_progress = None
    gc.freeze()  # a million long-lived agents: keep them out of the GC's scans
    if not state.stop_event.is_set():  # (stopped while spawning: no traffic is started)
        body.start_soon(demo.drive)


def _tell_systemd(state: str) -> None:
    """sd_notify ``state`` when systemd gave the command a ``NOTIFY_SOCKET``; a failure
    is logged, the run goes on (as sd_notify's callers do)."""
    from ._sdnotify import notify

    failure = notify(state)
    if failure is not None:
        log_guarded(log, logging.WARNING, "%s", failure)


#: the longest why of a ``STATUS=stopping (why)`` (characters): an error's message can be
#: far longer than a datagram (EMSGSIZE) or a ``systemctl status`` line takes
STATUS_WHY_MAX: Final = 400


def _tell_systemd_stopping(state: _State, why: str) -> None:
    """``STOPPING=1`` with why (one line: sd_notify(3)'s ``STATUS=`` is), once, and only
    after ``READY=1``: a run that ends before it was ready is a failed start to systemd,
    told by its exit alone (see docs/deploy.md)."""
    if not state.told_ready or state.told_stopping:
        return
    state.told_stopping = True
    # (a NUL, as of an error's message, made systemd drop the whole datagram, STOPPING=1
    # with it: "Received notify message with embedded NUL bytes. Ignoring."; a control,
    # as ESC, reached `systemctl status` as it is: escaped as log text is; a lone
    # surrogate is '?', as notify() sends it)
    why = escape_control(" ".join(why.split()).encode(errors="replace").decode())
    if len(why) > STATUS_WHY_MAX:  # (a datagram has a bound; a status line is read)
        why = why[: STATUS_WHY_MAX - 1] + "…"
    _tell_systemd(f"STOPPING=1\nSTATUS=stopping ({why})")


def _why_ended(exc: BaseException, state: _State) -> str:
    """What ``exc`` (out of the run's body or its kernel block) says of the run's end, for
    ``STATUS=``: ``sys.exit(N)``, an interrupt (a KeyboardInterrupt that reached the run),
    else the error (``failed: Type: message``)."""
    exc = _unwrap(exc)
    if isinstance(exc, SystemExit):
        return f"sys.exit({_code_shown(exc.code)})"
    if isinstance(exc, _INTERRUPTS):
        return state.stopped_by or INTERRUPTED
    return f"failed: {_describe(exc)}"


async def _first_of(*events: trio.Event) -> None:
    """Return once any of ``events`` is set."""
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait, event)


async def _body(state: _State, kernel: Kernel) -> None:
    try:
        await _run_body(state, kernel)
    except BaseException as exc:
        # The app's main raised or called sys.exit(), an error of the workload: the
        # stop begins here (the kernel's drain follows), said as a signal's is. A cancel
        # alone (an escalation ends the kernel's block) is told by the run with the
        # error the block raises (see _run_async).
        if not only_cancels(exc):
            _tell_systemd_stopping(state, _why_ended(exc, state))
        raise


async def _run_body(state: _State, kernel: Kernel) -> None:
    opts = state.opts
    async with trio.open_nursery() as body:
        if opts.spawn:
            _spawn(state, kernel)
        if opts.target is not None:
            state.phase = "spawning"
            await _run_app(state, kernel, body)
        elif opts.demo:
            state.phase = "spawning"
            swarm = state.swarm
            # (a stop that came before, even as this worker joined: False at once)
            # (the swarm waits as the parent does for a worker to get ready: longer by
            # what [cluster] join_timeout exceeds its default)
            from ._cluster_cmd import start_grace

            joined_within = start_grace(opts.config.cluster.join_timeout)
            if swarm is not None and not await swarm.wait_for_workers(joined_within):
                missing = ", ".join(swarm.not_joined)
                log_guarded(
                    log,
                    logging.INFO,
                    "stopped while the workers joined%s: the swarm's workload was not started",
                    f" ({missing} had not)" if missing else "",
                )
            elif not state.stop_event.is_set():  # (a stop before: not started)
                await _spawn_demo(state, kernel, body)
        if opts.spawn:
            # The programs' handshakes are the run's start too: --duration counts from
            # when each has registered (or failed); a stop meanwhile gives them up.
            await _first_of(state.programs_started, state.stop_event)
        state.t_spawned = trio.current_time()
        state.processed_at_start = _processed(kernel.stats())
        state.phase = "running"
        if not state.stop_event.is_set():
            # (the log writes beneath standard error's stand-ins: see nexus_trio.logs)
            ascii_marks = stand_ins(getattr(sys.stderr, "encoding", None))
            log_guarded(
                log,
                logging.INFO,
                "%srunning %s for %s (Ctrl-C to stop)",
                _worker_label(opts),
                _title(opts).translate(ascii_marks or {}),
                f"{opts.duration:g} s" if opts.duration else "ever",
            )
            _tell_systemd("READY=1\nSTATUS=running")  # (Type=notify: the unit has started)
            state.told_ready = True
        with trio.move_on_after(opts.duration if opts.duration > 0 else math.inf):
            await state.stop_event.wait()
        state.request_stop("duration")
        _tell_systemd_stopping(state, state.stopped_by or "duration")
        state.note_stop(kernel)
        state.phase = "stopping"
        if state.demo is not None:
            state.demo.stop()
        body.cancel_scope.cancel()


async def _watch_shutdown(state: _State, kernel: Kernel) -> None:
    """An agent's ``kernel.shutdown()`` stops the run: noted when the shutdown starts,
    before any agent has stopped for it, as a stop by the duration or a signal is (the
    summary's agents, run time and rate), then the body ends as for such a stop and
    waits for the shutdown with the cluster still joined."""
    await kernel.wait_shutting_down()
    if state.t_shutdown is None:
        state.t_shutdown = trio.current_time()
    if state.t_stop is not None or state.block_left or state.stop_event.is_set():
        return  # the run's own stop, or the block's exit (an error, an escalation)
    state.note_stop(kernel)
    state.request_stop("kernel shutdown")
    log_guarded(
        log, logging.INFO, "an agent shut the kernel down (kernel.shutdown()): the run is over"
    )


async def run_async(opts: RunOptions, console: Console | None = None) -> tuple[dict[str, Any], int]:
    """Run as ``nexus run`` does; returns the summary and the exit status."""
    console = console or Console(stderr=True)
    agent_log = logging.getLogger("nexus_trio.agent")
    quiet = OneLineBridgeErrors()
    agent_log.addFilter(quiet)
    #: what the run took to return its summary and status (a Ctrl-C: 130, the app's
    #: ``sys.exit(N)``: N, an escalation to the kernel or an error of the run: 1), to go
    #: out in place of a cancel
    taken: list[BaseException] = []
    try:
        return await _run_async(opts, console, quiet.problems, taken)
    except BaseException as exc:
        if not taken or not only_cancels(exc):
            raise
        # A scope around the run was cancelled after the run took a Ctrl-C, the app's
        # sys.exit(), an escalation or an error (in the drain it began, say): the run's way out
        # (its nursery's exit) raised that scope's Cancelled in place of (summary,
        # status), which the scope would take, its caller going on as if nothing was
        # pressed, exited or failed. Trio loses no KeyboardInterrupt, SystemExit or
        # error to a cancel, nor does open_kernel: it goes out instead, with its own
        # context (until the fifty-first pass a Ctrl-C was lost, until the
        # fifty-second a sys.exit(), an escalation or an error). The return value is
        # lost, as any is to a cancel.
        raise_held(taken[0])
    finally:
        agent_log.removeFilter(quiet)


async def _run_async(
    opts: RunOptions,
    console: Console,
    problems: Mapping[str, str],
    taken: list[BaseException],
) -> tuple[dict[str, Any], int]:
    state = _State(opts)
    error: BaseException | None = None
    #: a join of the cluster that failed: its error says all (the URL, the auth tried,
    #: what the server said), so it is logged without the traceback of the CLI's internals
    join_error: BaseException | None = None
    #: the metrics endpoint that could not listen: said in one line too, with what to change
    listen_error: BaseException | None = None
    #: NodeReplaced, once the join imported it (the nats layer is loaded by a join only):
    #: said in one line too, exit status REPLACED_EXIT
    replaced_type: type[Exception] | None = None
    kernel: Kernel | None = None
    async with trio.open_nursery() as outer:
        state.outer = outer
        await outer.start(_watch_signals, state)
        if opts.live:
            state.live = Live(
                console=console,
                auto_refresh=False,
                redirect_stdout=True,
                redirect_stderr=True,
                transient=False,
            )
            state.live.start()
        try:
            async with open_kernel(opts.config, seed=opts.seed) as kernel:
                state.kernel = kernel
                if opts.metrics_port:
                    from ..metrics import add_readiness, serve_metrics

                    add_readiness(kernel, state.readiness)
                    try:
                        await outer.start(
                            serve_metrics, kernel, opts.metrics_host, opts.metrics_port
                        )
                    except (OSError, UnicodeError) as exc:  # (a host no resolver takes)
                        listen_error = _cannot_listen(exc, opts)
                        raise listen_error from exc
                outer.start_soon(_watch, state, kernel, _title(opts))
                outer.start_soon(_watch_shutdown, state, kernel)
                try:
                    async with contextlib.AsyncExitStack() as stack:
                        nats_url = opts.nats or opts.config.nats.url  # --nats, else [nats] url
                        cluster = None
                        if nats_url and state.stop_event.is_set():
                            # stopped as it started (a worker the parent stopped): no join
                            log_guarded(log, logging.INFO, "stopped before joining the cluster")
                        elif nats_url:
                            from .._nats import NodeReplaced, default_node_name, join_cluster
                            from .._nats._auth import redact

                            replaced_type = NodeReplaced

                            node = opts.node or default_node_name()
                            try:
                                cluster = await stack.enter_async_context(
                                    join_cluster(kernel, nats_url, node, types=opts.types)
                                )
                            except (TransportUnavailable, ValueError) as exc:
                                join_error = exc
                                raise
                            log_guarded(
                                log,
                                logging.INFO,
                                "joined the cluster at %s as %s%s",
                                redact(nats_url),
                                node,
                                f" (agent types: {', '.join(opts.types)})" if opts.types else "",
                            )
                            if _is_worker(node):
                                from ._cluster_cmd import notify_parent_ready

                                try:
                                    notify_parent_ready()  # (its start is bounded: _START_GRACE)
                                except ValueError as exc:  # (its variable: one line)
                                    join_error = exc
                                    raise
                            layout = layout_from_env(node) if _is_worker(node) else None
                            if layout is not None and opts.demo and opts.workload != "pool":
                                state.swarm = Swarm(
                                    cluster, layout, should_stop=state.stop_event.is_set
                                )
                        await _body(state, kernel)
                        if state.swarm is not None:
                            state.phase = "settling"
                            await state.swarm.settle()
                        # Drain here, with the cluster (if any) still attached for
                        # in-flight remote messages; leaving open_kernel then has nothing
                        # left to do. (Also after an agent's shutdown: this waits for it.)
                        state.phase = "shutting down"
                        if state.t_shutdown is None:
                            state.t_shutdown = trio.current_time()
                        await kernel.shutdown()
                finally:
                    state.block_left = True
                    if cluster is not None:
                        # Whatever ended the block (its end, an escalation to the root, an
                        # error of the workload, a settle or a leave that failed, a
                        # cancel), a worker that joined counts what crossed to and from
                        # the others, taken once its node has left (final: also what its
                        # leave lost), or the parent sums what came from them as sent
                        # here, and the books are off by all of it. (The workers its
                        # settle wrote off are lost peers for good, also those heard
                        # again since: see _swarm.)
                        state.cluster_counts = cluster_counts(
                            cluster, state.swarm.written_off if state.swarm is not None else ()
                        )
        except SupervisorEscalation as exc:
            error = exc
            taken.append(exc)
            log_guarded(log, logging.ERROR, "the kernel stopped: %s", exc)
        except Exception as exc:
            error = _unwrap(exc)
            taken.append(error)
            log_guarded(
                log,
                logging.ERROR,
                "the run failed: %s",
                _describe(error),
                exc_info=(
                    None
                    # (the NATS server lost while settling: its one line says it all)
                    if error is join_error
                    or error is listen_error
                    or isinstance(error, NatsServerLost)
                    # (replaced: its message names the later process and what to do)
                    or (replaced_type is not None and isinstance(error, replaced_type))
                    else error
                ),
            )
        except BaseException as exc:
            # sys.exit() in the app's main or in a handler: the run ends as for an error
            # (summary, accounting), with the status it asked for (see the status below).
            # A KeyboardInterrupt that reached it (an app that turns a signal into one,
            # as sync code does) ends it too, as interrupted: the summary says so, status
            # 130 as a Ctrl-C's. Until the forty-ninth pass it went on as it came: a
            # traceback, no summary. A trio.Cancelled (a scope around the run cancelled,
            # see _INTERRUPTS) goes on as it came, alone or in a group.
            exited = _unwrap(exc)
            if isinstance(exited, BaseExceptionGroup):
                # sys.exit() together with errors (tasks of one nursery): the errors are
                # the outcome (status 1), reported with the summary as a failed run's
                if exited.split((Exception, SystemExit, *_INTERRUPTS))[1] is not None:
                    raise
                error = exited
                taken.append(exited)
                log_guarded(
                    log, logging.ERROR, "the run failed: %s", _describe(error), exc_info=error
                )
            elif isinstance(exited, _INTERRUPTS):
                error = exited
                taken.append(exited)
                state.request_stop(INTERRUPTED)
                log_guarded(
                    log,
                    logging.ERROR,
                    "the run was interrupted: %s reached the run (its summary follows)",
                    type(exited).__name__,
                    exc_info=exited,
                )
            elif not isinstance(exited, SystemExit):
                raise
            else:
                error = exited
                taken.append(exited)
                state.request_stop("sys.exit")
                clean = _exit_status(exited) == 0  # a clean exit asked for: no error to trace
                log_guarded(
                    log,
                    logging.INFO if clean else logging.ERROR,
                    "the run ended: %s",
                    _describe(error),
                    exc_info=None if clean else error,
                )
        finally:
            if error is not None:  # (an escalation, an error of the drain: after READY=1)
                _tell_systemd_stopping(state, _why_ended(error, state))
            state.phase = "done"
            state.t_end = trio.current_time()
            if kernel is not None and state.live is not None:
                state.live.update(
                    render_live(_title(opts), _final_sample(state, kernel), opts.duration),
                    refresh=True,
                )
            state.stop_live()
            outer.cancel_scope.cancel()
    t_end = state.t_end if state.t_end is not None else trio.current_time()
    if state.t_stop is None:
        state.t_stop = t_end
    t_shutdown = state.t_shutdown if state.t_shutdown is not None else state.t_stop
    if kernel is not None:
        note_bridge_stats(state.programs, kernel)  # final: every agent has stopped
    spawned = spawn_summary(state.programs, problems)
    if error is None:
        # Failed first starts, and programs that had still not registered when the run
        # ended (a start that failed during the shutdown, or one still waiting).
        failing = []
        for program, row in zip(state.programs, spawned, strict=True):
            if not row["registered"] and row["problem"] is None and state.stopped_by:
                # Its start was still under way when the run was stopped (a signal,
                # --duration): given up for the stop, which is no failure of it.
                row["problem"] = program.problem = "stopped before it registered"
            elif not row["registered"]:
                program.problem = row["problem"]
                failing.append(program)
            elif program.given_up:  # its supervisor gave up on it (it kept failing)
                failing.append(program)
        if failing:
            error = SpawnFailed(failing)
            if not state.failed_programs:
                log_guarded(log, logging.ERROR, "%s", error)
    summary = build_summary(state, kernel, error, t_shutdown=t_shutdown, t_end=t_end)
    if opts.spawn:
        summary["spawned"] = spawned
    status = 0 if error is None and summary["conserved"] else 1
    if isinstance(error, SystemExit) and summary["conserved"]:
        status = _exit_status(error)
    elif isinstance(error, _INTERRUPTS):
        status = FORCED_EXIT  # (as a Ctrl-C's: 128 + SIGINT)
    elif replaced_type is not None and isinstance(error, replaced_type) and summary["conserved"]:
        status = REPLACED_EXIT  # (its own: see REPLACED_EXIT; a mismatch is 1, as ever)
    if not summary["conserved"] and kernel is not None:
        log_guarded(log, logging.ERROR, "accounting mismatch: %s", json.dumps(summary))
    return summary, status


@contextlib.contextmanager
def label_worker_lines(node: str | None) -> Iterator[None]:
    """In a worker of ``nexus run --workers``: ``worker-1: `` before each line of the run's
    logger that does not name the worker already, while the run lasts. The workers and the
    parent share one standard error, and a worker's ``the run failed: ...`` or ``SIGINT:
    shutting down gracefully`` read as the parent's, or as any worker's (two workers that
    failed alike wrote two identical lines); its running and progress lines name it, and
    are left as they are. Elsewhere: nothing."""
    if node is None or not _is_worker(node):
        yield
        return
    label = f"{node}: "
    # its whole name: worker-10, worker-1x and worker-1_a are other names (a node name is
    # letters, digits, - and _), not worker-1's
    names_it = re.compile(rf"(?<![\w-]){re.escape(node)}(?![\w-])").search

    def name_it(record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            try:
                named = names_it(record.getMessage()) is not None
            except Exception:  # (a bad format: the handler reports it, as for any record)
                named = True
            if not named:
                record.msg = label + record.msg
        return True

    log.addFilter(name_it)
    try:
        yield
    finally:
        log.removeFilter(name_it)


def _worker_label(opts: RunOptions) -> str:
    """``"worker-1: "`` in a worker process of ``nexus run --workers`` (whose log lines
    share the parent's standard error with the other workers'), else ``""``."""
    return f"{opts.node}: " if opts.node is not None and _is_worker(opts.node) else ""


def _is_worker(node: str) -> bool:
    """True in a worker process of ``nexus run --workers`` (the parent names it)."""
    from ._cluster_cmd import worker_node

    return worker_node() == node


class AppErrorUnshowable(RuntimeError):
    """An app's error whose ``repr()`` raises, in its place (it is the cause): Trio
    writes the repr of a task's error, and raised a TrioInternalError for it."""


def _showable(exc: BaseException) -> BaseException:
    """``exc``, an error of the app's ``main``, or where its ``repr()`` raises one Trio
    can write in its place: for ``sys.exit(obj)``, a ``SystemExit`` of what says so
    (status 1, as Python's for an object); for an error, an :class:`AppErrorUnshowable`
    with ``exc`` as its cause; for a group, the group of its members so replaced, so the
    summary still lists each (``; ``), a ``SystemExit`` among them still a ``sys.exit``
    (until the review of the fifty-seventh pass a group was one error, or crashed Trio
    if it held a ``BaseException``)."""
    if (unshowable := _repr_failure(exc)) is None:
        return exc
    shown: BaseException
    if isinstance(exc, BaseExceptionGroup):
        with contextlib.suppress(Exception):  # (an app's group: its derive() may raise)
            shown = exc.derive([_showable(member) for member in exc.exceptions])
            if _repr_failure(shown) is None:
                shown.__cause__ = exc.__cause__
                shown.__suppress_context__ = True
                return shown.with_traceback(exc.__traceback__)
    if isinstance(exc, SystemExit) and isinstance(said := _code_shown(exc.code), _ReprFailed):
        shown = SystemExit(said)
        shown.__suppress_context__ = True
        return shown.with_traceback(exc.__traceback__)
    shown = AppErrorUnshowable(
        f"{type(exc).__qualname__}: {_str_of(exc)} (its repr() raises {unshowable}, which"
        " Trio cannot take)"
    )
    shown.__cause__ = exc
    return shown


def _repr_failure(exc: BaseException) -> str | None:
    """The name of what ``repr(exc)`` raises, or None if it does not."""
    try:
        repr(exc)
    except Exception as failure:  # (any: an app's error)
        return type(failure).__name__
    return None


def _str_of(exc: BaseException) -> str:
    """``str(exc)``, or what says that it raised."""
    try:
        return str(exc)
    except Exception as failure:  # (any: an app's error)
        return f"<str() raised {type(failure).__name__}>"


class _ReprFailed(str):
    """What an argument of ``sys.exit`` whose ``repr()`` raises is said as:
    ``<repr() raised RuntimeError>``, itself as its repr (no quotes)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


#: the most of ``repr()`` of an argument of ``sys.exit`` the run's end shows (characters)
_CODE_SHOWN: Final = 200


def _code_shown(code: object) -> str:
    """``code``, an app's ``sys.exit`` argument, as the run's end says it (the summary's
    ``error``, its log line, ``STATUS=``): its ``repr()``, cut past 200 characters (one
    of 1 MB was written whole, in the summary and the log, until the fifty-seventh
    pass), or a :class:`_ReprFailed` if ``repr()`` raises (a Trio internal error then)."""
    try:
        text = repr(code)
    except Exception as failure:  # (any: an app's object; a __repr__ that is no str too)
        return _ReprFailed(f"<repr() raised {type(failure).__name__}>")
    if len(text) <= _CODE_SHOWN:
        return text
    return f"{text[:_CODE_SHOWN]}... ({len(text):,} characters)"


def _exit_status(exited: SystemExit) -> int:
    """The status Python exits with for ``exited``: None is 0, an integer that integer,
    anything else (a message, 0.0) 1."""
    code = exited.code
    return 0 if code is None else code if isinstance(code, int) else 1


def _unwrap(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _cannot_listen(exc: OSError | UnicodeError, opts: RunOptions) -> OSError:
    """The metrics endpoint's failure to listen (``exc`` names the address), with the flag
    or config key to change: a port in use is a common mistake, not a failure of the CLI
    to show with its traceback. A host that no resolver takes (``x..y``: the IDNA codec's
    UnicodeError) is said so too, with the host."""
    port, host = opts.metrics_port_hint, opts.metrics_host_hint
    if isinstance(exc, UnicodeError):
        return OSError(
            errno.EINVAL,
            f"the metrics server cannot listen on {opts.metrics_host!r}: no host name ({exc});"
            f" give {host} an address of this host (127.0.0.1; 0.0.0.0 for all of them), or"
            f" {port} 0 for no metrics endpoint",
        )
    if exc.errno == errno.EADDRINUSE:
        advice = f"another process listens there: give {port} a free port, or 0"
    elif exc.errno == errno.EACCES:
        advice = f"a port below 1024 needs privileges: give {port} a port from 1024, or 0"
    else:
        advice = (
            f"give {host} an address of this host (127.0.0.1; 0.0.0.0 for all of them), or {port} 0"
        )
    return OSError(exc.errno, f"{exc.strerror or exc}; {advice} for no metrics endpoint")


def _describe(exc: BaseException) -> str:
    exc = _unwrap(exc)
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    if isinstance(exc, SystemExit):
        return f"SystemExit: sys.exit({_code_shown(exc.code)}) in the app's code"
    # (an app's error whose __str__ raises, or is no str: it replaced the app's error as
    # the run's, with its traceback, and since the fifty-sixth pass as the why of
    # STATUS=stopping too)
    text = _str_of(exc)
    if isinstance(exc, _INTERRUPTS) and not text:
        return type(exc).__name__  # (a bare KeyboardInterrupt: no ': ' of nothing)
    return f"{type(exc).__name__}: {text}"


def build_summary(
    state: _State,
    kernel: Kernel | None,
    error: BaseException | None,
    *,
    t_shutdown: float,
    t_end: float,
) -> dict[str, Any]:
    opts = state.opts
    stats = kernel.stats() if kernel is not None else None
    t_spawned = state.t_spawned if state.t_spawned is not None else state.t_stop or t_end
    t_stop = state.t_stop if state.t_stop is not None else t_end
    peak = max(state.peak_rss, rss_bytes())

    def hist(name: str) -> dict[str, float]:
        if stats is None:
            return {"count": 0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0}
        h = getattr(stats, name)
        return {
            "count": h.count,
            "mean": h.mean,
            "p50": h.p50,
            "p90": h.p90,
            "p99": h.p99,
            "p999": h.p999,
            "max": h.maximum,
        }

    handled = stats.handled if stats else 0
    replies = stats.replies_delivered if stats else 0
    forwarded = stats.forwarded if stats else 0
    dead = stats.dead_lettered if stats else 0
    accepted = stats.accepted if stats else 0
    in_flight = stats.in_flight if stats else 0
    remote = state.cluster_counts or {}
    forwarded_in = int(remote.get("forwarded_in", 0))
    if not opts.demo:
        agents = state.agents_at_stop  # (an app's: those alive when the run stopped)
    elif state.demo is None:
        agents = 0  # stopped before the workload was spawned
    else:
        # those spawned: fewer than asked if the run was stopped while they were (a swarm
        # worker: its share)
        agents = len(state.demo.local_refs)
    summary: dict[str, Any] = {
        "app": opts.app,
        "workload": opts.workload if opts.demo else None,
        "agents": agents,
        # the demo's --agents (a swarm's: all workers'); None for an app
        "agents_asked": opts.agents if opts.demo else None,
        "stopped_by": state.stopped_by or ("error" if error else "unknown"),
        "error": None if error is None else _describe(error),
        "elapsed_s": {
            "total": t_end - state.t0,
            "spawn": t_spawned - state.t0,
            "run": t_stop - t_spawned,
            "shutdown": t_end - t_shutdown,
        },
        # accepted here, less what other nodes sent: the messages that started here
        "sent": accepted - forwarded_in,
        "accepted": accepted,
        "handled": handled,
        "replies_delivered": replies,
        "forwarded": forwarded,
        "forwarded_out": forwarded,
        "forwarded_in": forwarded_in,
        "dead_letters": dead,
        "dead_letters_by_reason": dict(stats.dead_letters_by_reason) if stats else {},
        "in_flight": in_flight,
        "rejected": dict(stats.rejected) if stats else {},
        "failed": stats.failed if stats else 0,
        "run_failures": stats.run_failures if stats else 0,
        "timed_out": stats.timed_out if stats else 0,
        "restarts": stats.restarts if stats else 0,
        # dead letters past [kernel] dead_letter_log_limit lines a second: no line each
        "dead_letter_lines_not_logged": stats.dead_letter_lines_not_logged if stats else 0,
        # handler failures past [kernel] failure_log_limit lines a second: no traceback each
        "failure_lines_not_logged": stats.failure_lines_not_logged if stats else 0,
        # the rate while the workload ran: the shutdown is in elapsed_s, not in the rate
        "msgs_per_s": state.run_rate(handled + replies + forwarded, t_end),
        "handle_latency": hist("handle_latency"),
        "queue_wait": hist("queue_wait"),
        "peak_rss_bytes": peak,
        # log records the kernel's handlers could not write (stderr on a full disk, ...)
        "log_records_lost": records_lost() - state.records_lost_before,
        # log calls that raised (a filter or handler of the application); the run went on
        "log_calls_failed": log_calls_failed() - state.log_calls_failed_before,
        "conserved": stats is not None
        and in_flight == 0
        and accepted == handled + replies + forwarded + dead,
    }
    if state.cluster_counts is not None:
        summary["node"] = remote.get("node")
        summary["lost_counted"] = remote.get("lost_counted", 0)
        summary["lost_counted_by_kind"] = remote.get("lost_counted_by_kind", {})
        summary["closed_socket_writes"] = remote.get("closed_socket_writes", 0)
        summary["lost_with_nodes_by_node"] = remote.get("lost_with_nodes_by_node")
        summary["membership"] = remote.get("membership", {})
        summary["lost_peers"] = remote.get("lost_peers", {})
        summary["peers_heard"] = remote.get("peers_heard")
        summary["swarm"] = state.swarm is not None
        if state.swarm is not None:
            summary["settled_books"] = state.swarm.settled_books
            # (the settled workers that counted it lost: the parent counts it from outside)
            summary["written_off_by"] = list(state.swarm.written_off_by)
    elif state.opts.nats is not None:
        summary["peers_heard"] = []  # it did not join (stopped first): it heard from none
    if opts.not_started is not None:
        summary["not_started"] = opts.not_started
    return summary


def execute_run(
    opts: RunOptions, *, err_console: Console | None = None, summary_out: TextIO | None = None
) -> int:
    """``trio.run`` the run, print the summary (table, or JSON with ``--json``, to
    ``summary_out`` if given, else stdout); the exit status."""
    lost_before = records_lost() if opts.records_lost_before is None else opts.records_lost_before
    opts = attrs.evolve(opts, records_lost_before=lost_before)
    started = time.perf_counter()
    _note_late_stops()
    summary, status = trio.run(run_async, opts, err_console)
    log_guarded(log, logging.DEBUG, "run took %.3f s of wall time", time.perf_counter() - started)
    # Records still queued for standard error are written now, or (its reader stopped
    # reading) counted lost within FLUSH_TIMEOUT: the summary counts them too. The count
    # is read again whole, not added to the summary's: a record the writer thread counted
    # lost after the summary was built (it was being written then) is in it too.
    flush_logs()
    summary["log_records_lost"] = records_lost() - lost_before
    print_summary(summary, json_out=opts.json, out=summary_out)
    return status


#: the summary table's least width in columns: the labels' column takes up to 24, and the
#: figures need room beside them (a narrower terminal wraps the lines)
SUMMARY_MIN_WIDTH = 40


class _SummaryConsole(Console):
    """rich's Console, but a reader gone (``BrokenPipeError``) is raised as any other
    failed write, not made ``SystemExit(1)`` by rich: :func:`print_summary` decides."""

    def on_broken_pipe(self) -> None:
        raise  # (called in rich's ``except BrokenPipeError``: that error)


def print_summary(summary: dict[str, Any], *, json_out: bool, out: TextIO | None = None) -> None:
    """Print the summary: JSON (``--json``) to ``out`` (else stdout), or the table on
    stdout.

    After a hangup (this process took a SIGHUP as its stop, :func:`hung_up`) the terminal
    is gone, and a write there fails (``EIO``, ``EPIPE``): that is logged (the log may
    go to a file) and the stream is pointed at /dev/null, so that neither this nor the
    interpreter's last flush of it makes a traceback or another exit status. Otherwise
    the ``OSError`` goes on (``nexus``'s entry point reports it, status 1)."""
    stream = out if out is not None else sys.stdout
    try:
        if json_out:
            stream.write(json.dumps(summary, indent=2) + "\n")
            stream.flush()
        else:
            console = _SummaryConsole(file=stream)
            # (a narrower one left the figures' column no room at all: labels alone)
            console.width = max(console.width, SUMMARY_MIN_WIDTH)
            console.print(summary_table(summary, ascii_marks=not encodes("✓✗", console.encoding)))
    except OSError as exc:
        if not hung_up():
            raise
        log_guarded(
            log,
            logging.WARNING,
            "the summary could not be written (the terminal hung up): %s",
            exc.strerror or exc,
        )
        _point_at_devnull(stream)


def _point_at_devnull(stream: TextIO) -> None:
    """Point ``stream``'s descriptor at /dev/null: what it still buffers goes there."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass
