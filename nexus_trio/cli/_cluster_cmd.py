"""``nexus run --workers N``: N kernel processes on this host, joined through NATS as one swarm.

Each worker is ``python -m nexus_trio.cli run ... --nats URL --node worker-<i> --json
--no-live`` in its own process, so N workers use N cores. A demo workload (but ``pool``)
is spread over the workers as one swarm (``_swarm``: agent ``k`` on worker ``k mod N``,
so messages cross processes); an app runs in every worker. Without a NATS URL a private
``nats-server`` (JetStream on, 127.0.0.1, a port it picks) is started first and stopped
last. SIGINT/SIGTERM/SIGHUP are passed on to the workers as SIGTERM (a second SIGINT or
SIGTERM, or one after a worker died, kills them: a forced stop, exit status 130 as a
single run's; a SIGHUP never forces), from before the
private nats-server starts: a stop while the workers start is as graceful as a later one
(no worker is started after it; the workers start with both signals blocked, so that one
that comes while a worker still starts is held until it can take it: it interrupts the
import of the app, or its run takes it; see ``_run.catch_stop_signals_early``). Each worker
prints its JSON summary on stdout at the end; the parent adds them up into one and checks
the cluster's books: every message that started on some worker was handled,
dead-lettered, or counted as lost (see :func:`aggregate_summaries`). A worker that
ends without its summary (a crash, a signal from outside) is logged as soon as it exits
and the others are stopped as by a first signal; its books are counted from what the
others saw of it, or, if it died after the swarm settled, from its last record. A worker
that does not end but falls silent (SIGSTOP, a hang) is counted lost by the others, who
end without it: once every worker still running is one so counted by every worker that
ended with its summary, it is killed :data:`_LOST_GRACE` seconds and its ``[nats]
server_lost_wait`` later (one whose own connection is down rides out the wait) and
counted as a dead one. One frozen after the swarm settled (the others settled with it and ended) is
killed likewise, past its shutdown's bound (and its ``server_lost_wait``: a worker riding
out a NATS failover waits that long), and counted with its last record.
Whatever the others did, a worker asked to stop (the parent's signal passed on, or the
run's own stop) that has not ended :data:`_STOP_GRACE` seconds past its shutdown grace
and its ``[nats] server_lost_wait`` later (deaf to the SIGTERM, frozen while the others stopped first) is killed and counted
as a dead one, as systemd's ``TimeoutStopSec``: one stop always ends the run.
A worker says it is ready once it joined the cluster (:func:`notify_parent_ready`); one
not ready :data:`_START_GRACE` seconds after it started (hung at its import, its config,
its join) is killed, counted as a dead one, and stops the others, as ``TimeoutStartSec``
(unless it was asked to stop first: the stop's bound holds then).
When the parent's standard error is a pipe or socket, each worker's is relayed through
the parent whole line by whole line (two workers' long lines interleaved in the pipe).

A worker's command line is rebuilt from the parent's *parsed* options
(:func:`worker_argv`), never by editing ``sys.argv``: every spelling of ``--workers``
(``-W 2``, ``-W2``, ``--workers=2``) is gone from it by construction. Workers run with
``NEXUS_WORKER`` set and ``nexus run`` refuses ``--workers`` when it is, so a worker can
never start workers of its own; what the parent sets for a worker (:data:`FOR_THE_WORKER`)
is its own, kept from what its app starts (:func:`keep_from_children`). Workers (and
the private nats-server) die with the parent: on Linux they ask the kernel for SIGKILL
when the parent dies (``PR_SET_PDEATHSIG``), and
on every exit path the parent kills each worker's process group (a worker leads its own
group, which also keeps a terminal's Ctrl-C from reaching workers twice: once from the
terminal, once forwarded; the private nats-server leads its own too, so that the Ctrl-C
does not stop it under the workers).

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

import typer

from .._logcall import log_guarded
from .._plural import count_of
from ..logs import output_lock
from ._sdnotify import notify

if TYPE_CHECKING:
    from .._nats import NatsServer
    from ._group_endpoint import GroupEndpoint, GroupState

log = logging.getLogger("nexus_trio.cli")

#: set in each worker's environment (to its node name); ``nexus run --workers`` refuses to
#: run where it is set, so workers never start workers
WORKER_ENV: Final = "NEXUS_WORKER"
#: the ``[nats]`` keys a worker of a private nats-server runs without (its token is given)
PRIVATE_SERVER_UNSETS: Final = (
    "user",
    "password",
    "creds_file",
    "nkey_seed",
    "tls_ca",
    "tls_cert",
    "tls_key",
)
#: parameters of ``nexus run`` that the parent sets for each worker itself (or that only
#: the parent may act on), by their Python names
_PARENT_PARAMS: Final = frozenset(
    {"workers", "nats", "node", "json_out", "live", "metrics_port", "group_port"}
)
#: set in each worker's environment: the number of workers that make up the swarm
SWARM_ENV: Final = "NEXUS_SWARM_SIZE"
#: set in each worker's environment: the file descriptor of the pipe on which it tells the
#: parent it is ready (it joined the cluster: :func:`notify_parent_ready`), as systemd's
#: ``sd_notify(READY=1)``
READY_FD_ENV: Final = "NEXUS_READY_FD"
#: the largest descriptor number (a C int)
_FD_MAX: Final = 2**31 - 1
#: the variables the parent of ``--workers`` sets in each worker's environment for that
#: worker alone (:func:`keep_from_children` keeps them from what the worker starts)
FOR_THE_WORKER: Final = (WORKER_ENV, SWARM_ENV, READY_FD_ENV)
#: the most workers ``nexus run --workers`` starts, if set (else :func:`max_workers`)
MAX_WORKERS_ENV: Final = "NEXUS_MAX_WORKERS"
#: workers per core this process may use that ``--workers`` allows, and its floor
_WORKERS_PER_CORE: Final = 4
_MIN_WORKERS_BOUND: Final = 8
#: what ``run_workers`` queues for the private nats-server's end (workers: their index)
_SERVER: Final = -1
#: what ``run_workers`` queues as a worker says it is ready
_READY: Final = -2
#: seconds a worker's stdout (or standard error) may stay open with nothing in it after
#: the worker exited (held by a process it started): counted from the pipe's last byte,
#: not from the exit (see :func:`_read_output`)
_OUTPUT_GRACE: Final = 2.0
#: the bytes a pipe holds when ``F_GETPIPE_SZ`` cannot say (Linux's default)
_PIPE_CAPACITY: Final = 1 << 16
#: seconds a worker every other one counted lost may run on after they ended (then killed);
#: its ``[nats] server_lost_wait`` is added too (a worker whose connection is down, the
#: others' judge it lost, may be riding out a failover: its settle and its leave wait
#: that long for the connection back)
_LOST_GRACE: Final = 5.0
#: seconds, on top of the workers' shutdown grace, a worker every other one settled with
#: (or counted lost) may run on after they ended, to shut down and write its summary
#: (its spawned programs get 5 s after their ``shutdown`` frame and 5 s after SIGTERM);
#: its ``[nats] server_lost_wait`` is added too (see :func:`straggler_graces`)
_SETTLED_GRACE: Final = 20.0
#: seconds, on top of the workers' shutdown grace, a worker asked to stop (the parent's
#: signal passed on, or the run's own stop after a death) may run on before it is killed:
#: the swarm's settle (``_swarm.SETTLE_TIMEOUT``, 60 s) and a shutdown's time past its
#: grace (:data:`_SETTLED_GRACE`). A worker deaf to the SIGTERM or frozen (SIGSTOP) that
#: the others did not count lost (they stopped first) had kept the parent waiting for good;
#: its ``[nats] server_lost_wait`` is added too (see :func:`straggler_graces`)
_STOP_GRACE: Final = 80.0
#: seconds a worker has to get ready (import its ``--app``/``--types``, load its config,
#: join the cluster) before it is killed and the others stopped, as systemd's
#: ``TimeoutStartSec``; the swarm waits as long for every worker to join
#: (``_swarm.START_TIMEOUT``). One hung at its import had kept an ``--app`` run (whose
#: workers do not wait for each other) running for good. One asked to stop before it is
#: ready is bounded by :data:`_STOP_GRACE` from then on instead, as systemd's stop of a
#: unit still starting
_START_GRACE: Final = 120.0
#: the ``[cluster] join_timeout`` and ``notice_wait_at_leave`` (their defaults) that
#: :data:`_START_GRACE` and :data:`_SETTLED_GRACE` / :data:`_STOP_GRACE` make room for:
#: a worker configured to wait longer gets the difference on top (see :func:`start_grace`,
#: :func:`straggler_graces`), so that a setting its own join or leave honours is not cut
#: by the parent's kill timer
_JOIN_TIMEOUT_COUNTED: Final = 15.0
_NOTICE_WAIT_COUNTED: Final = 2.0
#: bytes of a line of a worker's standard error the relay holds at most while it waits for
#: the line's end (a longer one is passed on in pieces of this size)
_LONGEST_LINE: Final = 1 << 20
#: seconds between two looks of a relay of a worker's standard error, while this process's
#: takes nothing, at whether it was given up (see ``_Relay``)
_LOOK_AGAIN: Final = 0.05
#: the longest a kill timer waits (a thread's wait overflows past it, 292 years): a
#: larger shutdown grace (``[kernel] shutdown_grace_ms`` takes any finite number) is that
_LONGEST_WAIT: Final = threading.TIMEOUT_MAX
#: summary fields that add up across workers
_SUMMED: Final = (
    "agents",
    "sent",
    "accepted",
    "handled",
    "replies_delivered",
    "forwarded",
    "forwarded_out",
    "forwarded_in",
    "lost_counted",
    "closed_socket_writes",
    "dead_letters",
    "in_flight",
    "failed",
    "run_failures",
    "timed_out",
    "restarts",
    "msgs_per_s",
    "peak_rss_bytes",
    "log_records_lost",
    "log_calls_failed",
    "dead_letter_lines_not_logged",
    "failure_lines_not_logged",
)


def default_workers() -> int:
    """One worker per core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_worker_count(count: int, environ: Mapping[str, str] = os.environ) -> None:
    """Raise :class:`typer.BadParameter` if ``count`` workers are more than this host
    should run (see :func:`worker_count_problem`)."""
    problem = worker_count_problem(count, environ)
    if problem is not None:
        raise typer.BadParameter(problem, param_hint="'--workers'")


def worker_count_problem(count: int, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why ``count`` workers are more than this host should run, or None: more than 4
    per core this process may use, at least 8 (each worker is a Python process of about
    60 MB, busy on a core of its own), or than ``NEXUS_MAX_WORKERS`` if set (a value that
    is not a whole number of at least 1, in the flags' spelling, is the problem then)."""
    from ._commands import env_whole_number, shown

    raw = environ.get(MAX_WORKERS_ENV)
    if raw is not None:
        try:
            bound = env_whole_number(MAX_WORKERS_ENV, raw)
        except ValueError as exc:
            return str(exc)
        why = f"the most {MAX_WORKERS_ENV}={shown(raw)} allows"
    else:
        cores = default_workers()
        bound = max(_WORKERS_PER_CORE * cores, _MIN_WORKERS_BOUND)
        why = (
            f"the most this host runs ({_WORKERS_PER_CORE} per CPU core, "
            f"{count_of(cores, 'core')}; at least {_MIN_WORKERS_BOUND}): set "
            f"{MAX_WORKERS_ENV}={shown(str(count))} to run them anyway"
        )
    if count > bound:
        return f"{shown(str(count))} is more than {shown(str(bound))}, {why}"
    return None


def metrics_ports_problem(port: int, count: int) -> str | None:
    """Why ``count`` workers cannot serve their metrics on ``port`` + i, or None."""
    last = port + count - 1
    if port and last > 65535:
        return (
            f"worker i of --workers serves its metrics on {port} + i: worker-{count - 1} "
            f"would serve on {last}, past 65535"
        )
    return None


def group_port_problem(group_port: int, metrics_port: int, count: int) -> str | None:
    """Why the parent cannot serve the group's endpoint on ``group_port`` beside ``count``
    workers serving theirs on ``metrics_port`` + i, or None."""
    if not group_port:
        return None
    if not metrics_port:
        return (
            "the parent answers for the group by asking each worker's endpoint: give"
            " --metrics-port P (or [metrics] port) too (worker i serves on P + i)"
        )
    if metrics_port <= group_port < metrics_port + count:
        return (
            f"worker-{group_port - metrics_port} serves its metrics on {group_port}"
            f" (--metrics-port {metrics_port} + i): give the group another port"
        )
    return None


def worker_argv(ctx: typer.Context) -> list[str]:
    """``nexus run`` arguments for a worker, rebuilt from the parent's parsed options.

    Only options given on the parent's command line are passed on (defaults, the config
    file and ``NEXUS_*`` variables reach the worker by themselves: same directory, same
    environment), each in its long ``--name=value`` form, which a value starting with
    ``-`` cannot be mistaken in. The options the parent sets per worker (``--workers``,
    ``--nats``, ``--node``, ``--json``, ``--live/--no-live``, ``--metrics-port``,
    ``--group-port``) are never passed on.
    """
    out: list[str] = []
    for param in ctx.command.params:
        name = param.name
        if name is None or name in _PARENT_PARAMS or name not in ctx.params:
            continue
        source = ctx.get_parameter_source(name)
        # typer bundles its own click: compare by name, not with click's enum
        if source is None or source.name != "COMMANDLINE":
            continue
        if param.param_type_name != "option":
            raise TypeError(f"worker_argv: cannot pass on the argument {name!r}")
        value = ctx.params[name]
        long_name = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        if getattr(param, "is_flag", False):
            if value:
                out.append(long_name)
            elif param.secondary_opts:
                out.append(param.secondary_opts[0])
        elif param.multiple:
            out.extend(f"{long_name}={_option_text(item)}" for item in value)
        elif value is not None:
            out.append(f"{long_name}={_option_text(value)}")
    return out


def _option_text(value: object) -> str:
    """A parsed option value as the command line spells it (enums by their value)."""
    return str(getattr(value, "value", value))


#: :data:`READY_FD_ENV` as :func:`keep_from_children` took it out of ``os.environ``
#: (the worker's own, read here: :func:`given_to_this_worker`)
_given: dict[str, str] = {}


def given_to_this_worker(name: str) -> str | None:
    """The value of ``name`` (one of :data:`FOR_THE_WORKER`) the parent of ``--workers``
    gave this process: in ``os.environ`` if set there (:data:`WORKER_ENV` and
    :data:`SWARM_ENV` stay there; :data:`READY_FD_ENV` until taken, or set by a test),
    else as :func:`keep_from_children` took it, else None."""
    value = os.environ.get(name)
    return _given.get(name) if value is None else value


def take_given(name: str) -> str | None:
    """:func:`given_to_this_worker`, once: no later call (nor child) sees it."""
    value = os.environ.pop(name, None)
    given = _given.pop(name, None)
    return given if value is None else value


def worker_node() -> str | None:
    """This process's node name if it is a ``--workers`` worker (:data:`WORKER_ENV`, as
    the process was given it: :func:`given_to_this_worker`), else None. Every part of the
    command asks this; an app that picks its role by its worker's name is best to ask it
    too (``nexus_trio.cli.worker_node``), though ``os.environ["NEXUS_WORKER"]`` still
    holds it."""
    return given_to_this_worker(WORKER_ENV) or None


#: what :func:`keep_from_children` takes out of ``os.environ`` as well (internal: no app
#: reads it); :data:`WORKER_ENV` and :data:`SWARM_ENV` stay there (a documented contract)
_TAKEN_FROM_OS_ENVIRON: Final = (READY_FD_ENV,)


@contextlib.contextmanager
def keep_from_children() -> Iterator[None]:
    """For a ``nexus`` process's command: :data:`FOR_THE_WORKER`, which its parent set
    for it alone, are taken out of the process (C) environment, so that what it starts
    without an ``env=`` does not inherit them (``os.system``, ``os.exec*``, a
    ``subprocess`` or ``trio.run_process`` with their default ``close_fds=True``), as
    systemd's ``sd_listen_fds(unset_environment=1)`` consumes ``LISTEN_FDS`` and
    ``LISTEN_PID``: a ``nexus run`` that a worker's app starts is a one-process run, not
    one more worker-0. ``os.environ``, Python's copy of the environment as the
    interpreter started, keeps :data:`WORKER_ENV` and :data:`SWARM_ENV`: an app that
    picks its role by ``os.environ["NEXUS_WORKER"]`` works as documented (a child given
    ``env={**os.environ, ...}`` gets them from it: leave them out there).
    :data:`READY_FD_ENV`, internal, leaves ``os.environ`` too and is read where it was
    kept (:func:`given_to_this_worker`) until the command ends; then it is forgotten (a
    test's next command in the same process is not told to say ready by it)."""
    _given.clear()
    for name in FOR_THE_WORKER:
        if name in _TAKEN_FROM_OS_ENVIRON:
            value = os.environ.pop(name, None)  # (unsets the C environment too)
            if value is not None:
                _given[name] = value
        elif name in os.environ:
            os.unsetenv(name)  # (os.environ keeps it)
    try:
        yield
    finally:
        _given.clear()


def refuse_workers_in_a_worker() -> None:
    """Raise :class:`typer.BadParameter` if this process is a ``--workers`` worker."""
    node = worker_node()
    if node:
        raise typer.BadParameter(
            f"given inside a worker process ({WORKER_ENV}={node} is set): "
            "a worker does not start workers of its own",
            param_hint="'--workers'",
        )


def aggregate_summaries(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One summary for all workers, in the format of a single run's: counts and rates
    added up, times the longest, latencies merged (:func:`_merged_latency`), per-worker
    summaries kept. ``conserved`` only if every worker's own books balanced (accepted =
    handled + replies + forwarded out + dead letters) *and* the cluster's do: ``sent``
    (messages that started on a worker) = handled + replies delivered + dead letters +
    ``lost_counted`` (refused on arrival, lost in transit or with a lost node, refused by
    the NATS client) over all workers; ``cluster_balance`` shows both sides.

    A worker that died (``"died": True``: it printed no summary) is counted from outside,
    with what every other worker reported of it when it saw it lost (``lost_peers``):
    the messages that came out of it (tells, queries, replies) count as sent (they
    started there, as far as the others know), and those handed to it ended in it
    (``handed_to_dead_workers``: handled
    there, or lost with it; nobody can tell which). These exact counts replace the
    others' estimate of what was lost with it (``lost_with_nodes``, from its last
    heartbeat: an upper bound) in the cluster's books, which then read: sent = handled +
    replies + dead letters + lost (counted) + handed to dead workers. If a worker that
    outlived it did not see it lost, its books are unknown and ``conserved`` is false.

    A worker judged lost by some workers and settled with by others (frozen past their
    heartbeats, then thawed), or each side of a partition, is counted by its own books,
    and what the others counted lost with it is taken out the same way, per node
    (``lost_with_nodes_by_node``: see :func:`_estimates_of_workers`): the books are
    exact across the split. Every loss a worker judged is said in ``lost_seen``
    (:func:`lost_seen`), conserved or not.

    A worker that died after the swarm settled (every survivor reports its books as its
    last record said then, in ``settled_books``: final, the swarm had stopped and held
    nothing) is counted with that record instead (:func:`_counted_from_its_record`): its
    own counts, and what it still held (``lost_with_it``) as lost with it.

    The records of ``settled_books`` are kept once in the total, not in every worker's
    entry (N of them in each of N entries): see :func:`_settled_books_once`."""
    summaries = _written_off_as_dead(summaries)
    summaries = [_counted_from_outside(s, summaries) if s.get("died") else s for s in summaries]
    died = [s for s in summaries if s.get("died")]
    alive = [s for s in summaries if not s.get("died") and s.get("conserved") is not None]
    # (the run was stopped before they started: no books, nothing to count)
    not_started = [s for s in summaries if s.get("exit") == NOT_STARTED]
    total: dict[str, Any] = {"workers": len(summaries)}
    for key in _SUMMED:
        total[key] = sum(s.get(key) or 0 for s in summaries)
    reasons: dict[str, int] = {}
    rejected: dict[str, int] = {}
    for s in summaries:
        for reason, n in (s.get("dead_letters_by_reason") or {}).items():
            reasons[reason] = reasons.get(reason, 0) + n
        for reason, n in (s.get("rejected") or {}).items():
            rejected[reason] = rejected.get(reason, 0) + n
    total["dead_letters_by_reason"] = reasons
    total["rejected"] = rejected
    elapsed = [s.get("elapsed_s") or {} for s in summaries]
    total["elapsed_s"] = {
        key: max((e.get(key, 0.0) for e in elapsed), default=0.0)
        for key in ("total", "spawn", "run", "shutdown")
    }
    first = summaries[0] if summaries else {}
    total["app"] = first.get("app")
    total["workload"] = first.get("workload")
    # (every worker's: the swarm's --agents; None if no worker said: none started)
    total["agents_asked"] = next(
        (s["agents_asked"] for s in summaries if s.get("agents_asked") is not None), None
    )
    stops = sorted({str(s["stopped_by"]) for s in summaries if s.get("stopped_by")})
    total["stopped_by"] = ", ".join(stops) or "unknown"
    for key in ("handle_latency", "queue_wait"):
        total[key] = _merged_latency([s.get(key) or {} for s in summaries])
    errors = [s["error"] for s in summaries if s.get("error")]
    total["error"] = "; ".join(errors) if errors else None
    ended = total["handled"] + total["replies_delivered"] + total["dead_letters"]
    total["workers_died"] = [str(s.get("node")) for s in died if not s.get("written_off")]
    total["workers_written_off"] = [str(s.get("node")) for s in died if s.get("written_off")]
    # replaced by the exact counts of the dead workers' entries and the own books of
    # the live ones (see _estimates_of_workers)
    estimated = _estimates_of_workers(summaries, alive, bool(died))
    total["lost_counted"] -= estimated
    total["cluster_balance"] = {
        "sent": total["sent"],
        "handled_replied_or_dead": ended,
        "lost_counted": total["lost_counted"],
        "forwarded_out_minus_in": total["forwarded_out"] - total["forwarded_in"],
    }
    into_dead = sum(s.get("handed_to_it") or 0 for s in died)
    total["handed_to_dead_workers"] = into_dead
    total["cluster_balance"].update(  # 0 when no worker died: the same fields in every run
        {
            "handed_to_dead_workers": into_dead,
            "came_from_dead_workers": sum(s.get("sent") or 0 for s in died),
            "lost_with_nodes_estimate_replaced": estimated,
        }
    )
    in_server = _lost_in_dead_server(total, summaries, alive, ended)
    total["lost_in_dead_server"] = in_server
    # (said in one line, as lost_seen's: conserved with them, an operator is told)
    total["lost_in_dead_server_said"] = (
        f"{count_of(in_server, 'message')} forwarded out by a worker and forwarded in by none,"
        f" counted lost by none: in flight through the NATS server as it died"
        f" ({', '.join(_lost_server(summaries))} lost it as the run ended); a receiver"
        " counts a loss at its sender's next sequence mark, which never came"
        if in_server
        else None
    )
    total["cluster_balance"]["lost_in_dead_server"] = in_server  # (0 unless it died)
    total["conserved"] = (
        bool(alive or (not_started and not died))
        and len(alive) + len(died) + len(not_started) == len(summaries)
        and all(s.get("conserved") for s in alive)
        and all(s.get("books") in (SEEN_FROM_OUTSIDE, FROM_ITS_RECORD, NEVER_JOINED) for s in died)
        and total["sent"] == ended + total["lost_counted"] + into_dead + in_server
    )
    total["why_not_conserved"] = (
        [] if total["conserved"] else _why_not_conserved(total, summaries, alive, died, not_started)
    )
    total["lost_seen"] = lost_seen(summaries)
    total["settled_books"], total["settled_books_differ"] = _settled_books_once(summaries)
    total["per_worker"] = [_without_settled_books(s) for s in summaries]
    return total


def _lost_server(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    """The workers whose run ended as they lost the NATS server (_swarm.NatsServerLost,
    as a worker's summary names its error)."""
    return [
        str(s.get("node"))
        for s in summaries
        if str(s.get("error") or "").startswith("NatsServerLost: ")
    ]


def _lost_in_dead_server(
    total: Mapping[str, Any],
    summaries: Sequence[Mapping[str, Any]],
    alive: Sequence[Mapping[str, Any]],
    ended: int,
) -> int:
    """The tells that were in flight through the NATS server as it died, counted by the
    parent from the two sides' books (0 when they do not allow it). A receiver counts a
    lost tell at the gap its sender's next sequence number or mark shows; the tells last
    sent through a server that died have no next mark, and no worker counts them. When
    every worker reported its books and its cluster counts (none died) and each worker's
    own books balance (accepted = handled + replies + forwarded out + dead letters), the
    cluster's difference is exactly what some worker forwarded out and no worker
    forwarded in, nor counted lost: ``sent - ended - lost = sum(forwarded_out) -
    sum(forwarded_in) - lost``. Counted as lost in transit only when a worker lost the
    NATS server (the one cause the receivers cannot see) and the difference is positive;
    otherwise the books stay off and ``why_not_conserved`` says by how much."""
    if not _lost_server(summaries) or len(alive) != len(summaries):
        return 0
    if not all(s.get("conserved") and "lost_counted_by_kind" in s for s in alive):
        return 0  # (a worker without its books or its cluster counts: nothing is exact)
    difference = int(total["sent"]) - ended - int(total["lost_counted"])
    return max(difference, 0)


def _estimates_of_workers(
    summaries: Sequence[dict[str, Any]], alive: Sequence[dict[str, Any]], any_died: bool
) -> int:
    """What the live workers counted lost with other workers of the run
    (``lost_with_nodes``, an estimate from the lost one's last heartbeat): each of those
    is counted exactly otherwise, by its own books (a worker judged lost by some and
    settled with by others, or each side of a partition: what it took of what they
    handed to it is in its books, handled, dead or lost in transit) or from outside (a
    dead one: ``handed_to_it``). Per node when a worker's summary says
    (``lost_with_nodes_by_node``); from one that does not (more nodes than it keeps),
    all of its estimate if a worker died (as before the forty-fourth pass), else none."""
    workers = {str(s.get("node")) for s in summaries}
    estimated = 0
    for s in alive:
        by_node = s.get("lost_with_nodes_by_node")
        if isinstance(by_node, dict):
            estimated += sum(
                int(count)
                for node, count in by_node.items()
                if node in workers and node != s.get("node")
            )
        elif any_died:
            estimated += int((s.get("lost_counted_by_kind") or {}).get("lost_with_nodes", 0))
    return estimated


def lost_seen(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every loss of a worker that another worker judged (its membership's
    ``nodes_lost_by_node``, and the peers its summary lists lost), one line per pair,
    said in the summary whether or not the books are conserved: as Akka's cluster
    publishes every ``UnreachableMember`` and Erlang's ``net_kernel`` every
    ``nodedown``, an operator is told of a partition or a freeze its numbers do not
    show (the books balance once each side's own books replace the other's estimate).
    A worker that came back after the judge settled without it says so in its own
    summary (``written_off_by``): its line says so too (until the forty-fifth pass it
    read ``heard again, settled with`` when it had left before the judge's summary,
    which then no longer listed it among its ``lost_peers``: a real run's split).

    Past the names a worker counts per node (``nodes_lost_by_node`` is null once more
    than 4,096 nodes were judged lost: new names at every restart), its losses are still
    said and counted: one line more, ``worker-0 judged nodes lost 5,000 more times, not
    kept by name (...)``, the part of its ``nodes_lost`` (the sum, always kept) that no
    named line counts; until the forty-fifth pass they were left out silently."""
    lines: list[str] = []
    written_off_by = {  # (a worker written off by all: its own summary kept inside)
        str(s.get("node")): {
            *(s.get("written_off_by") or ()),
            *((s.get("own_summary") or {}).get("written_off_by") or ()),
        }
        for s in summaries
    }
    for s in summaries:
        if s.get("died") or s.get("conserved") is None:
            continue
        node = str(s.get("node"))
        lost_peers = s.get("lost_peers") or {}
        membership = s.get("membership") or {}
        times = membership.get("nodes_lost_by_node") or {}
        for peer in sorted(set(lost_peers) | set(times)):
            count = f" {count_of(int(times[peer]), 'time')}" if peer in times else ""
            if node in written_off_by.get(peer, ()):  # (its own summary says: it came back)
                then = "settled without, it came back after (written off by it)"
            elif peer in lost_peers:
                then = "still lost at its end, or settled without"
            else:
                then = "heard again, settled with"
            lines.append(f"{node} judged {peer} lost{count}: {then}")
        unnamed = int(membership.get("nodes_lost") or 0) - sum(int(n) for n in times.values())
        if unnamed > 0:
            lines.append(
                f"{node} judged nodes lost {count_of(unnamed, 'more time')}, not kept by name"
                " (past the 4,096 names it counts per node; those still lost at its end"
                " are named above)"
            )
    return lines


def _why_not_conserved(
    total: Mapping[str, Any],
    summaries: Sequence[dict[str, Any]],
    alive: Sequence[dict[str, Any]],
    died: Sequence[dict[str, Any]],
    not_started: Sequence[dict[str, Any]],
) -> list[str]:
    """Why the books of :func:`aggregate_summaries` are not conserved, one reason a line,
    each naming the worker it is about: a worker counted lost by some workers and settled
    with by others (its own books and their count of what was lost with it overlap, and
    neither says by how much: a summary lists what it took from the peers it lost only,
    and ``lost_with_nodes`` is one estimate for all of them), workers that each counted
    the other lost (a partition), a worker whose own books did not balance, a dead one
    whose books are unknown, and the cluster's difference."""
    why: list[str] = []
    if not (alive or (not_started and not died)):
        why.append("no worker reported its books")
    counted = [*alive, *died, *not_started]
    for s in summaries:
        if not any(s is c for c in counted):
            why.append(f"{s.get('node')}: no books in its summary")
    for s in alive:
        node = s.get("node")
        others = [o for o in alive if o is not s]
        lost_by = [str(o.get("node")) for o in others if node in (o.get("lost_peers") or {})]
        settled_by = [str(o.get("node")) for o in others if str(o.get("node")) not in lost_by]
        unsplit = [
            str(o.get("node"))
            for o in others
            if str(o.get("node")) in lost_by
            and not isinstance(o.get("lost_with_nodes_by_node"), dict)
        ]
        if lost_by and settled_by and unsplit:
            handed = sum(
                int((o.get("lost_peers") or {})[node].get("handed_to") or 0)
                for o in others
                if str(o.get("node")) in lost_by
            )
            why.append(
                f"{node}: counted lost by {', '.join(lost_by)} and settled with by"
                f" {', '.join(settled_by)}: its own books and their lost_with_nodes count"
                f" of it both hold what they handed to it ({handed}), by how much each is"
                " not known"
            )
        elif lost_by and unsplit:  # (lost to all, not written off: a partition, see above)
            why.append(
                f"{node}: counted lost by every other worker, as each of them was by"
                " another (a partition): each side's books count what went to the other as"
                " lost"
            )
        if not s.get("conserved"):
            why.append(
                f"{node}: its own books do not balance (accepted {s.get('accepted')}, not"
                " all handled, replied, forwarded out or dead letters)"
            )
    for s in died:
        if s.get("books") not in (SEEN_FROM_OUTSIDE, FROM_ITS_RECORD, NEVER_JOINED):
            why.append(f"{s.get('node')}: died, its books {s.get('books') or 'unknown'}")
    balance = total["cluster_balance"]
    ended, lost = balance["handled_replied_or_dead"], balance["lost_counted"]
    into_dead = balance["handed_to_dead_workers"]
    if balance["sent"] != ended + lost + into_dead:
        server_lost = _lost_server(alive)
        why.append(
            f"the cluster's books are off by {balance['sent'] - (ended + lost + into_dead)}:"
            f" sent {balance['sent']}, handled, replied or dead {ended}, lost (counted)"
            f" {lost}, handed to dead workers {into_dead}"
            + (
                f"; {', '.join(server_lost)} lost the NATS server as"
                f" {'it' if len(server_lost) == 1 else 'they'} settled: tells in flight"
                " through it then are counted by no worker (a receiver counts a gap at its"
                " sender's next sequence mark, which never came)"
                if server_lost
                else ""
            )
        )
    return why or ["unknown"]


def _written_off_as_dead(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The summaries with each worker that every other worker with books counted lost
    (``lost_peers``) entered as one that died, its own summary kept under
    ``own_summary``: it came back (its connection, or its process thawed) after they
    settled without it, and they counted what they handed to it and took from it; its
    own books would count that a second time (what it handled of it, and their
    ``lost_with_nodes`` estimate of it). As Erlang's nodes take a node judged down that
    comes back for a new incarnation: the books are the others' (see _swarm). Not when
    every worker with books is one (each counted every other lost: a partition, whose
    books are unknown)."""
    books = [s for s in summaries if not s.get("died") and s.get("conserved") is not None]

    def lost_to_all(summary: dict[str, Any]) -> bool:
        others = [o for o in books if o is not summary]
        node = summary.get("node")
        return bool(others) and all(node in (o.get("lost_peers") or {}) for o in others)

    written_off = [s for s in books if lost_to_all(s)]
    if not written_off or len(written_off) == len(books):
        return list(summaries)
    kept = ("node", "pid", "exit", "exit_status", "agents")
    out: list[dict[str, Any]] = []
    for s in summaries:
        if any(s is w for w in written_off):
            entry = {key: s[key] for key in kept if key in s}
            entry.update(
                died=True,
                written_off=True,
                error=None,
                conserved=None,
                own_summary={key: value for key, value in s.items() if key not in kept},
            )
            out.append(entry)
        else:
            out.append(s)
    return out


def _settled_books_once(
    summaries: Sequence[dict[str, Any]],
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, dict[str, int]]]]:
    """The workers' ``settled_books``, each worker's record once: the record every
    worker that reported it agrees on, and, for a worker whose records differ, each
    reporter's (normally none: the swarm settled on the same records)."""
    seen: dict[str, dict[str, dict[str, int]]] = {}  # node -> reporter -> its record
    for s in summaries:
        for node, record in (s.get("settled_books") or {}).items():
            seen.setdefault(node, {})[str(s.get("node"))] = record
    agreed: dict[str, dict[str, int]] = {}
    differ: dict[str, dict[str, dict[str, int]]] = {}
    for node, by_reporter in seen.items():
        first, *rest = by_reporter.values()
        if all(record == first for record in rest):
            agreed[node] = first
        else:
            differ[node] = by_reporter
    return agreed, differ


def _without_settled_books(summary: dict[str, Any]) -> dict[str, Any]:
    """A worker's entry with its ``settled_books`` (kept once for all, see
    :func:`_settled_books_once`) replaced by how many workers it reported."""
    if "settled_books" not in summary:
        return summary
    entry = {key: value for key, value in summary.items() if key != "settled_books"}
    entry["settled_with"] = len(summary["settled_books"] or {})
    return entry


#: ``exit`` of a worker that was not started: the run was stopped first (it has no books)
NOT_STARTED: Final = "not started"
#: ``books`` of a dead worker's entry counted from what the others saw of it
SEEN_FROM_OUTSIDE: Final = "counted by the other workers"
#: ``books`` of a dead worker that no other worker ever heard from: it never joined
NEVER_JOINED: Final = "never joined the cluster: no other worker heard from it (nothing to count)"
#: ``books`` of a worker that died after the swarm settled, counted with its last record
FROM_ITS_RECORD: Final = "its last record: it settled, then died"
#: the books of a worker's last record that its entry takes as they are
_RECORDED_BOOKS: Final = (
    "sent",
    "accepted",
    "handled",
    "replies_delivered",
    "forwarded_out",
    "forwarded_in",
    "dead_letters",
)


def _counted_from_outside(
    dead: dict[str, Any], summaries: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """A dead worker's entry with what the workers that outlived it saw of it (see
    :func:`aggregate_summaries`): ``sent`` what came out of it, ``handed_to_it`` what
    they handed to it; ``books`` says whether every one of them saw it lost."""
    node = dead.get("node")
    others = [s for s in summaries if not s.get("died") and s.get("conserved") is not None]
    seen = [(s.get("lost_peers") or {}).get(node) for s in others]
    entry = dict(dead)
    records = [(s.get("settled_books") or {}).get(node) for s in others]
    if others and all(records):
        # it died after the swarm settled: its counters were final (see _swarm)
        return _counted_from_its_record(entry, records)
    if others and all(seen):
        entry["sent"] = sum(int(p["taken_from"]) for p in seen if p)
        entry["handed_to_it"] = sum(int(p["handed_to"]) for p in seen if p)
        entry["books"] = SEEN_FROM_OUTSIDE
    elif others and all(_never_heard_of(node, s) for s in others):
        # No worker ever heard from it (it died before it joined, at its import say): it
        # took nothing and nothing came from it that any of them counted. (Had it sent
        # anything, the cluster's books would show it: taken in, sent nowhere.)
        entry["sent"] = 0
        entry["handed_to_it"] = 0
        entry["books"] = NEVER_JOINED
    else:
        missing = [str(s.get("node")) for s, p in zip(others, seen, strict=True) if not p]
        entry["books"] = f"unknown: not seen lost by {', '.join(missing)}" if missing else "unknown"
    return entry


def _never_heard_of(node: Any, summary: Mapping[str, Any]) -> bool:
    """True if the worker of ``summary`` says it never heard from ``node`` (a list of
    the nodes it heard from without it; not when it could not tell: null, or absent)."""
    heard = summary.get("peers_heard")
    return isinstance(heard, list) and node not in heard


def _counted_from_its_record(
    entry: dict[str, Any], records: Sequence[dict[str, int] | None]
) -> dict[str, Any]:
    """A worker that died after the swarm settled, counted with its last record as every
    survivor saw it then: what it held (nothing, normally) counted as lost with it."""
    record = records[0] or {}
    if any(r != record for r in records):
        entry["books"] = "unknown: the survivors' last records of it differ"
        return entry
    for key in _RECORDED_BOOKS:
        entry[key] = int(record.get(key, 0))
    entry["forwarded"] = entry["forwarded_out"]
    in_flight = int(record.get("in_flight", 0))
    entry["lost_with_it"] = in_flight + int(record.get("held", 0))
    entry["lost_counted"] = int(record.get("lost_counted", 0)) + entry["lost_with_it"]
    entry["handed_to_it"] = 0
    ended = sum(entry[k] for k in ("handled", "replies_delivered", "forwarded_out", "dead_letters"))
    balanced = entry["accepted"] == ended + in_flight
    entry["books"] = FROM_ITS_RECORD if balanced else "unknown: its last record does not balance"
    return entry


def _merged_latency(histograms: Sequence[dict[str, float]]) -> dict[str, float]:
    """The workers' latency summaries as one: counts added up, the mean weighted by
    count, and each percentile the highest of the workers' (an upper bound: percentiles
    of separate histograms cannot be merged exactly)."""
    count = sum(h.get("count", 0) for h in histograms)
    merged: dict[str, float] = {"count": count}
    merged["mean"] = (
        sum(h.get("mean", 0.0) * h.get("count", 0) for h in histograms) / count if count else 0.0
    )
    for key in ("p50", "p90", "p99", "p999", "max"):
        merged[key] = max((h.get(key, 0.0) for h in histograms if h.get("count")), default=0.0)
    return merged


def start_grace(join_timeout: float = _JOIN_TIMEOUT_COUNTED) -> float:
    """Seconds a worker has to get ready (:data:`_START_GRACE`), and the swarm to see every
    worker joined (``_swarm.START_TIMEOUT``, the same): longer by what ``[cluster]
    join_timeout`` exceeds its default (a join configured to take 200 s was killed at
    120 s), at most :data:`_LONGEST_WAIT`."""
    return min(_START_GRACE + max(0.0, join_timeout - _JOIN_TIMEOUT_COUNTED), _LONGEST_WAIT)


def straggler_graces(
    shutdown_grace: float, server_lost_wait: float, notice_wait_at_leave: float = 2.0
) -> tuple[float, float]:
    """Seconds a worker the others settled with may run on after they ended, and seconds
    a worker asked to stop may run on, before ``run_workers`` kills it: :data:`_SETTLED_GRACE`
    and :data:`_STOP_GRACE` on top of the workers' ``shutdown_grace`` and their
    ``server_lost_wait`` (a worker riding out a NATS failover waits that long at its
    settle, and its leave's steps as long: with ``[nats] server_lost_wait = 30`` the
    fixed graces killed it mid-wait), and what ``[cluster] notice_wait_at_leave`` exceeds
    its default (a leave that waits for the others' last notices that long), each at most
    :data:`_LONGEST_WAIT`.

    ValueError naming ``[nats] server_lost_wait`` if it is not a finite number of
    seconds >= 0 (the config refuses such a value first)."""
    if (
        isinstance(server_lost_wait, bool)
        or not isinstance(server_lost_wait, int | float)
        or not server_lost_wait >= 0
        or not math.isfinite(server_lost_wait)
    ):
        raise ValueError(
            "[nats] server_lost_wait must be a finite number of seconds >= 0,"
            f" got {server_lost_wait!r}"
        )
    waits = shutdown_grace + server_lost_wait
    waits += max(0.0, notice_wait_at_leave - _NOTICE_WAIT_COUNTED)
    return min(_SETTLED_GRACE + waits, _LONGEST_WAIT), min(_STOP_GRACE + waits, _LONGEST_WAIT)


def run_workers(
    workers: int,
    run_args: Sequence[str],
    *,
    nats_url: str | None = None,
    python: str | None = None,
    metrics_port: int = 0,
    shutdown_grace: float = 5.0,
    server_lost_wait: float = 5.0,
    notice_wait_at_leave: float = _NOTICE_WAIT_COUNTED,
    join_timeout: float = _JOIN_TIMEOUT_COUNTED,
    group_port: int = 0,
    metrics_host: str = "127.0.0.1",
    max_connections: int = 32,
) -> tuple[dict[str, Any], int]:
    """Run ``workers`` worker processes to the end; return the added-up summary and the
    worst exit status. ``run_args`` are ``nexus run`` arguments (see :func:`worker_argv`).
    With a ``metrics_port`` P, worker i serves its ``/metrics``, ``/healthz`` and ``/readyz``
    on P + i (``--metrics-port``; one port for all, the second worker could not listen); with 0,
    none serves them (whatever ``NEXUS_METRICS__PORT`` or the config file says). With a
    ``group_port`` Q (``--group-port``; it needs a ``metrics_port``) the parent serves the
    group's ``/healthz``, ``/readyz`` and ``/metrics`` on ``metrics_host``:Q, from before
    the first worker starts to the end (:mod:`._group_endpoint`), at most
    ``max_connections`` connections open at once (``[metrics] max_connections``, as each
    worker's own endpoint); one that cannot listen fails the run before anything starts
    (no worker is started, exit status 1).
    ``shutdown_grace`` is the workers' kernel shutdown grace (``[kernel]
    shutdown_grace_ms``, in seconds): a worker the others settled with that does not end
    :data:`_SETTLED_GRACE` seconds past it after they ended (frozen in its shutdown) is
    killed. ``server_lost_wait`` is the workers' ``[nats] server_lost_wait`` (seconds;
    the default is the key's): a worker may wait that long for its NATS connection back
    at its settle and at its leave (a failover), so each of the parent's kill timers (the
    settled one's and the stop's, see :func:`straggler_graces`, and the one of a worker
    every other one counted lost, :data:`_LOST_GRACE`) gives it that much longer; a
    stop is passed on as at once. ``notice_wait_at_leave`` and ``join_timeout`` are the
    workers' ``[cluster]`` keys: the kill timers of a leave and of a start grow by what
    they exceed their defaults (:func:`straggler_graces`, :func:`start_grace`).

    ValueError, before anything starts, if ``workers`` is below 1 or more than this host
    should run (the bound ``nexus run --workers`` checks: :func:`worker_count_problem`),
    or ``server_lost_wait`` is not a finite number of seconds >= 0."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    settled_grace, stop_grace = straggler_graces(
        shutdown_grace, server_lost_wait, notice_wait_at_leave
    )
    ready_grace = start_grace(join_timeout)
    # (validated by straggler_graces)
    lost_grace = min(_LOST_GRACE + server_lost_wait, _LONGEST_WAIT)
    problem = worker_count_problem(workers)
    if problem is not None:
        raise ValueError(f"--workers: {problem}")
    problem = metrics_ports_problem(metrics_port, workers)
    if problem is not None:
        raise ValueError(f"--metrics-port: {problem}")
    problem = group_port_problem(group_port, metrics_port, workers)
    if problem is not None:
        raise ValueError(f"--group-port: {problem}")
    from ._run import is_hangup, note_hangup, stop_signals, take_early_signals

    server: NatsServer | None = None
    # Credentials reach the workers in their environment, never in argv (``ps``).
    env = dict(os.environ)

    #: why the private nats-server did not start (no worker is started then), if it did not
    server_failed = ""

    def start_server() -> str:
        """The private nats-server's URL, once it runs (None given: started here); ""
        if it could not be started (``server_failed`` says why, logged)."""
        nonlocal server, server_failed
        if nats_url is not None:
            return _move_credentials_to_env(nats_url, env)
        import secrets

        from .._nats import NatsServer, NatsServerError

        token = secrets.token_urlsafe(32)  # a private server still refuses other local users
        # It dies with the parent too: a SIGKILLed parent must not leave it running. It
        # leads its own process group, as the workers do: a terminal's Ctrl-C reaches only
        # the parent, which stops the workers and then the server (reached by it, the
        # server exited at once, under the workers still settling through it).
        try:
            server = NatsServer(token=token, preexec_fn=_die_with_parent(), process_group=0).start()
        except NatsServerError as exc:
            # (not found, exited during its start, not ready in time): one error line
            # and a summary, as for any failed run, not a traceback
            server_failed = f"the private nats-server did not start: {exc}"
            log_guarded(log, logging.ERROR, "the run failed: %s", server_failed)
            return ""
        # The workers read the config as the parent does: its [nats] credentials and TLS
        # are for the server of [nats] url, which is not used here, and beside the private
        # server's token they failed every worker ("give one of user/password, token,
        # ...; got user/password and token"). An empty variable unsets a key.
        for key in PRIVATE_SERVER_UNSETS:
            env[f"NEXUS_NATS__{key.upper()}"] = ""
        env["NEXUS_NATS__TOKEN"] = token
        log_guarded(
            log,
            logging.INFO,
            "started nats-server at %s (pid %d) for %s",
            server.url,
            server.pid,
            count_of(workers, "worker"),
        )
        return server.url

    procs: list[subprocess.Popen[bytes]] = []
    #: per worker started, the read end of the pipe on which it says it is ready
    ready_reads: list[int] = []
    outputs: list[bytes] = [b""] * workers
    # per worker started: its exit status, how it ended, its summary (None: it printed none)
    statuses = [0] * workers
    codes = [0] * workers  # as Popen.returncode says it
    ends = ["not started"] * workers
    summaries: list[dict[str, Any] | None] = [None] * workers
    signals_seen: list[str] = []
    #: the worker whose death stopped the others (as a first signal would), if one did
    stopped_for_death = ""
    #: the worker whose failed run (its summary printed, a non-zero exit) stopped the
    #: others, if one did
    stopped_for_failure = ""
    #: the worker that did not get ready in time (killed) and stopped the others, if one did
    stopped_for_start = ""
    #: how the private nats-server ended, if it died before the workers did
    server_died = ""
    #: per worker pid, how far it was asked to stop (1: SIGTERM, 2 and more: SIGKILL)
    passed: dict[int, int] = {}
    #: the signal that forced the stop (the workers still running were killed), if one did
    forced_by = ""
    #: pids of the workers killed here because every other worker counted them lost (or
    #: settled with them), and why, in the words of their summary's error
    killed_here: dict[int, str] = {}
    #: per worker pid every other one counted lost, the timer that kills it
    lost_timers: dict[int, threading.Timer] = {}
    #: the workers' standard error is relayed whole line by whole line when the parent's is
    #: a pipe or socket (a terminal and a file take each write whole by themselves)
    relay_stderr = _is_pipe(2)
    #: then, per worker started, the relay of its standard error
    relays: list[_Relay] = []
    #: per worker pid asked to stop, when (``time.monotonic``) it is killed if it still runs
    #: (kept by the loop that waits for the workers: no thread is started in a handler)
    stop_deadlines: dict[int, float] = {}
    #: per worker pid not ready yet, when (``time.monotonic``) it is killed if it still is not
    start_deadlines: dict[int, float] = {}

    def stops_asked() -> int:
        # a death's stop is the first: a signal after it is the second, which forces
        stopped_by_the_run = (
            stopped_for_death or stopped_for_failure or stopped_for_start or server_died
        )
        return len(signals_seen) + (1 if stopped_by_the_run else 0)

    #: whether systemd was told READY=1 (every worker joined), then STOPPING=1 (once: the
    #: first stop, or the first end)
    told_ready = False
    told_stopping = False

    def say_stopping(why: str) -> None:
        # (Type=notify: as a single run says it at its stop; the workers cannot, they
        # were not given NOTIFY_SOCKET. Not before READY=1: a stop then is a failed start,
        # told by the exit alone, as a single run's; STOPPING=1 says a started one stopped)
        nonlocal told_stopping
        if told_stopping or not told_ready:
            return
        told_stopping = True
        failure = notify(f"STOPPING=1\nSTATUS=stopping ({why})")
        if failure is not None:
            log_guarded(log, logging.WARNING, "%s", failure)

    def pass_on() -> None:
        nonlocal forced_by
        say_stopping(
            signals_seen[0]
            if signals_seen
            else f"{stopped_for_death} died"
            if stopped_for_death
            else f"{stopped_for_failure} failed"
            if stopped_for_failure
            else f"{stopped_for_start} was not ready"
            if stopped_for_start
            else "the private nats-server died"
        )
        level = stops_asked()
        if level > 1 and not procs:  # (a second signal before any worker started)
            forced_by = forced_by or signals_seen[-1]
        for proc in procs:
            if passed.get(proc.pid, 0) < level and proc.poll() is None:
                passed[proc.pid] = level
                if level > 1:
                    forced_by = forced_by or signals_seen[-1]
                proc.send_signal(signal.SIGTERM if level == 1 else signal.SIGKILL)
                if level == 1:  # a graceful stop is bounded, as systemd's TimeoutStopSec
                    stop_deadlines[proc.pid] = time.monotonic() + stop_grace
                    # and only so: one asked to stop before it was ready (its import
                    # interrupted) is not killed as not ready while it stops (a start
                    # and stop past _START_GRACE at load lost its summary)
                    start_deadlines.pop(proc.pid, None)

    def forward(signum: int, _frame: FrameType | None) -> None:
        if is_hangup(signum):
            note_hangup()
            if stops_asked():  # (a hangup never forces: see _run._on_stop_signal)
                return
        signals_seen.append(signal.Signals(signum).name)
        pass_on()

    def kill_the_lost() -> None:
        # A worker frozen (SIGSTOP, a hung process) misses its heartbeats: the others count
        # it lost, settle without it and end; it would never end by itself (deaf to the
        # SIGTERM too, if stopped). One frozen after the swarm settled (before its
        # summary) is not counted lost: the others settled with it and ended. Once every
        # worker still running is one that every worker which ended with its summary
        # counted lost or settled with, the swarm ended without them: each is killed
        # unless it ends within _LOST_GRACE and its server_lost_wait (lost to all) or
        # its shutdown's bound.
        running = [(j, p) for j, p in enumerate(procs) if p.poll() is None]
        books = [s for s in summaries if s is not None]
        if not running or not books:
            return
        lost_to_all = set.intersection(*(set(s.get("lost_peers") or ()) for s in books))
        done_with = set.intersection(
            *(set(s.get("lost_peers") or ()) | set(s.get("settled_books") or ()) for s in books)
        )
        if any(f"worker-{j}" not in done_with for j, _ in running):
            return
        for j, p in running:
            if p.pid not in lost_timers:
                lost = f"worker-{j}" in lost_to_all
                grace = lost_grace if lost else settled_grace
                lost_timers[p.pid] = timer = threading.Timer(grace, kill_lost, (j, p, lost, grace))
                timer.daemon = True
                timer.start()

    def until_overdue() -> float | None:
        """Seconds until the first worker still running is past its stop's or its start's
        deadline (an ended one's are dropped as its end is taken, a ready one's start's as
        it says so; a killed one's are done with)."""
        deadlines = [  # (list(): a handler, or a worker getting ready, may change them)
            d
            for pid, d in [*list(stop_deadlines.items()), *list(start_deadlines.items())]
            if pid not in killed_here
        ]
        if not deadlines:
            return None
        return min(max(0.0, min(deadlines) - time.monotonic()), _LONGEST_WAIT)

    def kill_overdue() -> None:
        nonlocal stopped_for_start
        now = time.monotonic()
        for j, p in enumerate(procs):
            stop_by, start_by = stop_deadlines.get(p.pid), start_deadlines.get(p.pid)
            if p.pid in killed_here or p.poll() is not None:
                continue
            if stop_by is not None and stop_by <= now:
                message = "worker-%d (pid %d) still runs %gs after it was asked to stop"
                grace = stop_grace
                killed_here[p.pid] = f"it still ran {stop_grace:g}s after it was asked to stop"
            elif start_by is not None and start_by <= now:
                message = "worker-%d (pid %d) is not ready %gs after it started"
                grace = ready_grace
                killed_here[p.pid] = (
                    f"it was not ready {ready_grace:g}s after it started (it had not"
                    " imported its --app/--types, loaded its config and joined the cluster)"
                )
            else:
                continue
            # (as a death: the first stops the others still running, its share is gone)
            others = any(q is not p and q.poll() is None for q in procs)
            stopping = others and not stops_asked() and p.pid not in stop_deadlines
            log_guarded(
                log,
                logging.ERROR,
                message + ": killing it%s",
                j,
                p.pid,
                grace,
                "; stopping the other workers" if stopping else "",
            )
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            if stopping:
                stopped_for_start = f"worker-{j}"
                pass_on()

    def kill_lost(j: int, p: subprocess.Popen[bytes], lost: bool, grace: float) -> None:
        if p.poll() is not None or p.pid in killed_here:  # (it ended, or is being killed)
            return
        log_guarded(
            log,
            logging.ERROR,
            "worker-%d (pid %d) was %s by every other worker and still runs %gs"
            " after they ended: killing it",
            j,
            p.pid,
            "counted lost" if lost else "settled with",
            grace,
        )
        killed_here[p.pid] = (
            "counted lost by every other worker, it still ran after they ended"
            if lost
            else f"every other worker settled with it, it still ran {grace:g}s after they ended"
        )
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)

    # From before the private nats-server starts: a signal at any point of the start is
    # a graceful stop (no worker is started after it), not the parent's end by SIGTERM's
    # (or SIGHUP's) default action or a KeyboardInterrupt.
    def group_state() -> GroupState:
        """What the group endpoint says of the workers (read from its thread)."""
        from ._group_endpoint import ENDED, NOT_STARTED, RUNNING, STARTING, GroupState

        states = []
        for i in range(workers):
            if i >= len(procs):
                states.append((NOT_STARTED, ""))
                continue
            worker = procs[i]  # (each its own: not a name a later loop leaves behind)
            code = _end_of(worker)
            if code is not None:
                states.append((ENDED, _how_it_ended(code)))
            else:
                states.append((STARTING if worker.pid in start_deadlines else RUNNING, ""))
        return GroupState(stopping=bool(stops_asked() or forced_by), workers=tuple(states))

    group: GroupEndpoint | None = None
    if group_port:
        from ._group_endpoint import GroupEndpoint

        group = GroupEndpoint(
            metrics_host,
            group_port,
            [metrics_port + i for i in range(workers)],
            group_state,
            max_connections=max_connections,
        )

    def dump(_signum: int, _frame: FrameType | None) -> None:
        # SIGUSR1: each worker that is ready (its own SIGUSR1 watched: it joined) writes
        # its agent tree, relayed as its log lines; the parent has no kernel of its own.
        # Not while the run stops: a worker past its run would take the default action.
        # (Unhandled here until the fifty-fourth pass, its default action ended the parent,
        # status 138: `kill -USR1` on the service's process stopped the service.)
        if stops_asked() or usr1 is None:
            return
        for proc in procs:
            if proc.pid not in start_deadlines and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, usr1)

    previous = {sig: signal.signal(sig, forward) for sig in stop_signals()}
    usr1 = getattr(signal, "SIGUSR1", None)
    if usr1 is not None:
        previous[usr1] = signal.signal(usr1, dump)
    for signum in take_early_signals():  # (as the command started: a SIGHUP)
        forward(signum, None)
    try:
        if group is not None:
            try:
                group.start()
            except OSError as exc:
                # (no worker is started: as a private nats-server that did not start)
                server_failed = (
                    f"the group endpoint did not start: {exc}; give --group-port a free port"
                )
                log_guarded(log, logging.ERROR, "the run failed: %s", server_failed)
        url = start_server() if not server_failed else ""
        for i in range(workers):
            if signals_seen or server_failed:
                break  # stopped before this one started: it is not started
            argv = [python or sys.executable, "-m", "nexus_trio.cli", "run", *run_args]
            node = f"worker-{i}"
            argv += ["--nats", url, "--node", node, "--json", "--no-live"]
            # (0 too: a port of the environment or the config would be every worker's)
            argv.append(f"--metrics-port={metrics_port + i if metrics_port else 0}")
            ready_read, ready_write = os.pipe()
            try:
                started = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE if relay_stderr else None,
                    env={
                        **env,
                        WORKER_ENV: node,
                        SWARM_ENV: str(workers),
                        READY_FD_ENV: str(ready_write),
                    },
                    pass_fds=(ready_write,),
                    process_group=0,
                    preexec_fn=_worker_preexec(),
                )
                # (its start's deadline before it is in procs: a stop passed on to it
                # from then on drops it, see pass_on)
                start_deadlines[started.pid] = time.monotonic() + ready_grace
                procs.append(started)
            except BaseException:
                os.close(ready_read)
                raise
            finally:
                os.close(ready_write)
            ready_reads.append(ready_read)
            if signals_seen:
                # A signal came while starting: it reaches this worker too (it may have
                # come before the worker was in procs), and no more are started.
                pass_on()

        #: (worker index, exit code) as each one ends, in the order they end
        ended: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        printed: list[list[bytes]] = [[] for _ in procs]

        #: per worker started, set as it exits (its readers then end at the pipe's end,
        #: or once it has had nothing for _OUTPUT_GRACE: see _read_output)
        exited = [threading.Event() for _ in procs]
        #: per worker started, whether its stdout was read to its end (else a process it
        #: started holds it open: all the worker wrote was read, the holder is killed)
        read_to_end = [False] * len(procs)

        def read(i: int, proc: subprocess.Popen[bytes]) -> None:
            assert proc.stdout is not None
            # Closed here, by the one thread that reads it, at its end: closed by another
            # while this read, its number could be another file's by the next read.
            with proc.stdout:
                read_to_end[i] = _read_output(
                    proc.stdout.fileno(), exited[i], printed[i].append, _OUTPUT_GRACE
                )

        def await_ready(proc: subprocess.Popen[bytes], fd: int) -> None:
            try:
                said = os.read(fd, 1)  # (b"" once it exited without saying it)
            finally:
                os.close(fd)
            if said:
                start_deadlines.pop(proc.pid, None)
                ended.put((_READY, 0))  # (the wait for the workers reckons its deadlines)

        def watch(i: int, proc: subprocess.Popen[bytes], readers: list[threading.Thread]) -> None:
            # Its exit, not the end of its stdout, says it ended: a process it started
            # may hold its stdout (or standard error) open (an app's helper), for good.
            code = proc.wait()
            exited[i].set()
            if i < len(relays):
                relays[i].exited.set()
            # No bound in time on its stdout's reader: it ends by itself once the pipe
            # ended, or had nothing for _OUTPUT_GRACE after the exit (a holder that
            # writes nothing), or gave more than it holds (a holder that writes on); a
            # reader starved on a loaded machine reads its summary late, never loses it
            # (a bound counted from the exit, 2 s then 2 s, lost it past 4 s).
            readers[0].join()
            if i < len(relays):  # (its standard error's: see _Relay.wait_end)
                relays[i].wait_end(_OUTPUT_GRACE)
            if not read_to_end[i] or any(reader.is_alive() for reader in readers):
                # The holder dies now rather than at the end (_kill_group); what the
                # worker printed has been read by then.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            ended.put((i, code))

        while ready_reads:  # (each thread closes its own; the rest at the end)
            fd = ready_reads.pop()
            threading.Thread(
                target=await_ready, args=(procs[len(ready_reads)], fd), daemon=True
            ).start()
        for i, p in enumerate(procs):
            readers = [threading.Thread(target=read, args=(i, p), daemon=True)]
            if relay_stderr:
                assert p.stderr is not None
                relays.append(_Relay(p.stderr))
                readers.append(relays[-1].thread)
            for reader in readers:
                reader.start()
            threading.Thread(target=watch, args=(i, p, readers), daemon=True).start()
        if server is not None:  # it ends before the workers only if it died
            watched = server
            threading.Thread(
                target=lambda: ended.put((_SERVER, watched.wait())), daemon=True
            ).start()
        running_workers = len(procs)
        workers_ready = 0
        while running_workers:
            try:  # a signal's handler still runs while this waits
                i, code = ended.get(timeout=until_overdue())
            except queue.Empty:
                kill_overdue()  # (its end is queued by its watch)
                continue
            if i == _READY:
                workers_ready += 1
                if workers_ready == workers and not stops_asked() and not told_stopping:
                    # (Type=notify: the unit has started once every worker joined)
                    failure = notify(f"READY=1\nSTATUS=running: {workers} workers joined")
                    told_ready = True
                    if failure is not None:
                        log_guarded(log, logging.WARNING, "%s", failure)
                continue
            if i == _SERVER:
                assert server is not None
                # The workers cannot go on without it (nor settle, nor leave cleanly).
                stopping = not stops_asked()
                server_died = _how_it_ended(code)
                log_guarded(
                    log,
                    logging.ERROR,
                    "the private nats-server (pid %d) died: %s%s",
                    server.pid,
                    server_died,
                    "; stopping the workers" if stopping else "",
                )
                if stopping:
                    pass_on()
                continue
            running_workers -= 1
            proc = procs[i]
            stop_deadlines.pop(proc.pid, None)  # (no stop is passed on to it any more)
            start_deadlines.pop(proc.pid, None)
            outputs[i] = b"".join(printed[i])
            codes[i] = code
            statuses[i] = _status(code)
            ends[i] = _how_it_ended(code)
            summaries[i] = _summary_of(outputs[i])
            if summaries[i] is not None:
                if code != 0 and not stops_asked() and any(p.poll() is None for p in procs):
                    # Its run failed (an app that raised, a spawn that failed): its share
                    # of the workload (or its copy of the app) is gone, as a dead one's,
                    # and a run without --duration would never end by itself.
                    log_guarded(
                        log,
                        logging.ERROR,
                        "worker-%d (pid %d) failed: %s; stopping the other workers",
                        i,
                        proc.pid,
                        ends[i],
                    )
                    stopped_for_failure = f"worker-{i}"
                    pass_on()
                say_stopping(f"worker-{i} ended")  # (its --duration: the others end too)
                kill_the_lost()
                continue
            # It ended without its summary: it died (a crash, a signal from outside), or
            # was killed after a second signal here. Never silently; and the others stop
            # (their share of the workload is not re-placed: see docs/cli.md).
            if _killed_by_force(passed.get(proc.pid, 0), code):
                log_guarded(log, logging.WARNING, "%s", _forced_text(i, proc.pid))
                continue
            if proc.pid in killed_here and code == -signal.SIGKILL:
                continue  # (logged as it was killed)
            running = [p for p in procs if p.poll() is None]
            stopping = not stops_asked() and bool(running)  # (the first death stops them)
            log_guarded(
                log,
                logging.ERROR,
                "%s (pid %d) died: %s%s",
                f"worker-{i}",
                proc.pid,
                ends[i],
                "; stopping the other workers" if stopping else "",
            )
            if stopping:
                stopped_for_death = f"worker-{i}"
                pass_on()
    finally:
        for fd in ready_reads:  # (a worker's start raised: none was watched)
            os.close(fd)
        for timer in lost_timers.values():
            timer.cancel()
        if group is not None:
            group.close()
        for proc in procs:
            _kill_group(proc)
        try:
            if server is not None:
                server.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    entries: list[dict[str, Any]] = []
    for i in range(workers):
        if i >= len(procs):  # a stop came while the workers started: nothing to count
            entries.append(_not_started_entry(i))
            if server_failed:  # (or there was no nats-server or group endpoint for it)
                what = (
                    "group endpoint" if "group endpoint" in server_failed else "private nats-server"
                )
                entries[-1]["not_started"] = f"not started: the {what} did not start"
            continue
        proc = procs[i]
        entry = summaries[i]
        if entry is None:  # counted from what the others saw (aggregate_summaries)
            forced = _killed_by_force(passed.get(proc.pid, 0), codes[i])
            if forced:
                error = _forced_text(i, proc.pid)
            elif proc.pid in killed_here and codes[i] == -signal.SIGKILL:
                error = f"worker-{i} (pid {proc.pid}) killed by SIGKILL: {killed_here[proc.pid]}"
            else:
                error = f"worker-{i} (pid {proc.pid}) died: {ends[i]}"
            entry = {"node": f"worker-{i}", "died": True, "error": error, "conserved": None}
        else:
            entry["died"] = False
            # a worker whose run failed before it joined names no node
            entry["node"] = entry.get("node") or f"worker-{i}"
            entry.setdefault("error", None)
            entry.setdefault("conserved", False)
        entry.update(pid=proc.pid, exit_status=statuses[i], exit=ends[i])
        entries.append(entry)
    summary = aggregate_summaries(entries)
    # (lines: a record is one or more; those not written yet, the parent's standard error
    # unread, are counted here too: see _Relay)
    summary["log_records_lost"] += _relays_lost(relays, _OUTPUT_GRACE)
    summary["nats_server"] = {
        "private": nats_url is None,  # (asked for: also one that did not start)
        "pid": server.pid if server is not None else None,
        "died": bool(server_died),
        "exit": server_died or None,
    }
    if server_died:
        assert server is not None
        died = f"the private nats-server (pid {server.pid}) died: {server_died}"
        summary["error"] = "; ".join(filter(None, [died, summary["error"]]))
    if server_failed:
        summary["error"] = server_failed
        summary["stopped_by"] = "error"
    if stopped_for_death:
        summary["stopped_by"] = f"{stopped_for_death} died (the others were stopped)"
    elif stopped_for_failure:
        summary["stopped_by"] = f"{stopped_for_failure} failed (the others were stopped)"
    elif stopped_for_start:
        summary["stopped_by"] = f"{stopped_for_start} was not ready (the others were stopped)"
    elif server_died and not signals_seen:
        summary["stopped_by"] = "the nats-server died (the workers were stopped)"
    elif signals_seen:
        # The workers were stopped by the SIGTERM passed on: by the parent's signal, named
        # as it was (as a single run's); a worker that stopped before says its own.
        summary["stopped_by"] = _stopped_by_signal(
            signals_seen[0],
            [(str(e["stopped_by"]), e["pid"] in passed) for e in entries if e.get("stopped_by")],
        )
    status = max(statuses, default=0)
    if status == 0 and (
        not summary["conserved"]
        or summary["workers_died"]
        or summary["workers_written_off"]
        or server_died
        or server_failed
    ):
        # a worker that died with exit code 0 (no summary) fails the run too, and one
        # the others wrote off (counted lost, settled without it)
        status = 1
    if forced_by:  # as a single run's second Ctrl-C
        from ._run import FORCED_EXIT

        if procs:
            summary["stopped_by"] += (
                f"; forced by {forced_by}: the workers still running were killed"
            )
        else:  # (forced before the first worker was started: none was, none is killed)
            summary["stopped_by"] += f"; forced by {forced_by} before any worker started"
        status = FORCED_EXIT
    return summary, status


def _not_started_entry(i: int) -> dict[str, Any]:
    """The ``per_worker`` entry of a worker that was not started (a stop came first)."""
    return {
        "node": f"worker-{i}",
        "died": False,
        "pid": None,
        "exit_status": None,
        "exit": NOT_STARTED,
        "error": None,
        "conserved": None,
    }


def not_started_summary(workers: int, *, private_server: bool, stopped_by: str) -> dict[str, Any]:
    """The summary of a ``--workers`` run stopped before it started anything (no
    nats-server, no worker): the fields of every ``--workers`` summary, each worker
    ``not started`` with nothing to count."""
    summary = aggregate_summaries([_not_started_entry(i) for i in range(workers)])
    summary["nats_server"] = {"private": private_server, "pid": None, "died": False, "exit": None}
    summary["stopped_by"] = stopped_by
    return summary


def _stopped_by_signal(parent_signal: str, stops: Sequence[tuple[str, bool]]) -> str:
    """``stopped_by`` of a run the parent's signal stopped, from each worker's (and
    whether the parent passed the stop on to it): the SIGTERM passed on is named as the
    signal the parent got; the parent's signal if no worker said (none started)."""
    named = {parent_signal if passed and stop == "SIGTERM" else stop for stop, passed in stops}
    return ", ".join(sorted(named)) or parent_signal


def _killed_by_force(level: int, code: int) -> bool:
    """True for a worker this parent SIGKILLed itself (a forced stop) that died of it."""
    return level > 1 and code == -signal.SIGKILL


def _forced_text(i: int, pid: int) -> str:
    return f"worker-{i} (pid {pid}) killed by SIGKILL: the stop was forced"


def _summary_of(output: bytes) -> dict[str, Any] | None:
    """A worker's JSON summary, or None if it printed none (or only part of one)."""
    try:
        summary = json.loads(output)
    except ValueError:
        return None
    return summary if isinstance(summary, dict) else None


def _end_of(p: subprocess.Popen[Any]) -> int | None:
    """The ``Popen.returncode`` of a worker that ended (reaped or not), None while it
    runs: read from another thread than its watch's, whose blocking wait holds the
    ``Popen``'s lock, so ``poll()`` says None until that wait returns. Not reaped yet:
    :func:`_ended_unreaped`. Reaped meanwhile (``ChildProcessError``): its watch's wait
    took it and sets ``returncode`` in a moment, under that lock: waited for (a killed
    worker asked for as it was reaped read as running, and the group's answer named it
    by its port's ``Connection refused``: CI 219)."""
    code = p.poll()
    if code is not None:
        return code
    try:
        return _ended_unreaped(p.pid)
    except ChildProcessError:
        try:
            return p.wait(timeout=5)
        except subprocess.TimeoutExpired:  # (not expected: its wait sets it at once)
            return None


def _ended_unreaped(pid: int) -> int | None:
    """The ``Popen.returncode`` of a child that ended and has not been reaped yet, read
    without reaping it (``WNOWAIT``: its watch's wait still takes it); None if it still
    runs or this system cannot tell; ``ChildProcessError`` if it was reaped meanwhile."""
    waitid = getattr(os, "waitid", None)
    if waitid is None:
        return None
    try:
        info = waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        raise  # (reaped meanwhile: see _end_of)
    except OSError:
        return None
    if info is None:
        return None
    return int(info.si_status if info.si_code == os.CLD_EXITED else -info.si_status)


def _how_it_ended(code: int) -> str:
    """``exit code 3``, ``killed by SIGKILL`` (``Popen.returncode`` of a worker)."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child killed when this process dies (Linux only).

    ``PR_SET_PDEATHSIG`` fires when the thread that forked the child ends; workers are
    started from the thread that waits for them, so that is the parent's lifetime here.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _worker_preexec() -> Callable[[], None]:
    """A worker's ``preexec_fn``: it dies with the parent (:func:`_die_with_parent`) and
    starts with SIGINT, SIGTERM and SIGHUP (unless ignored: ``stop_signals``) blocked, so
    that a stop passed on while it starts is held pending until it lets them through
    (``catch_stop_signals_early``): the default action of SIGTERM (or a SIGHUP's) would
    end it without its summary, as a death."""
    die_with_parent = _die_with_parent()

    from ._run import stop_signals

    blocked = stop_signals()

    def preexec() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        if die_with_parent is not None:
            die_with_parent()

    return preexec


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group ``proc`` leads (the worker and whatever it started that
    stayed in its group), then reap the worker."""
    # ProcessLookupError: the group is gone, the worker and its children have exited
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def notify_parent_ready() -> None:
    """Tell the parent of ``--workers`` that this worker is ready (it joined the cluster):
    one byte on the pipe it was given (:data:`READY_FD_ENV`), once; nothing in a process
    the parent did not start so. The variable is removed, so that no program this worker
    starts says it for it. A value that is no descriptor number (set by something else
    than the parent) is a ValueError naming the variable."""
    value = take_given(READY_FD_ENV)
    if value is None:
        return
    fd = _ready_fd(value)
    with contextlib.suppress(OSError):  # (the parent gone: nothing to tell)
        try:
            os.write(fd, b"1")
        finally:
            os.close(fd)


def _ready_fd(value: str) -> int:
    """The descriptor number :data:`READY_FD_ENV` gives (ASCII digits, an ``int`` a
    descriptor can be): ``str.isdigit`` took ``²`` (then ``int`` raised a bare
    ValueError), ``-1`` was passed over without a word, and a huge number raised
    OverflowError in ``os.write``, each with a traceback. (Its length is looked at first:
    ``int`` of more than 4,300 digits raises a ValueError of its own, which named no
    variable.)"""
    digits = value.lstrip("0") or "0"  # (zeros before it are no digits of the int)
    if (
        value.isascii()
        and value.isdigit()
        and len(digits) <= len(str(_FD_MAX))
        and int(digits) <= _FD_MAX
    ):
        return int(digits)
    from ._commands import shown  # (cut: 5,000 digits were echoed whole)

    raise ValueError(
        f"{READY_FD_ENV}={shown(value, quoted=True)} is not a file descriptor number (0..{_FD_MAX}): it is"
        " set by `nexus run --workers` for its workers only; unset it"
    )


def _is_pipe(fd: int) -> bool:
    """Whether file descriptor ``fd`` is a pipe or a socket (journald's, ``| tee``),
    where writes of more than ``PIPE_BUF`` bytes by two processes interleave."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:  # (closed)
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class _Relay:
    """Passes a worker's standard error on to this process's, whole line by whole line.

    Two workers writing a long line (a traceback, a big record) to one pipe at once
    interleave in it past ``PIPE_BUF`` bytes (measured: 364 of 570 lines of 20 kB cut by
    the other's), and so do a line and a record of this process's own log thread: each
    line is written here whole, under the log handler's ``output_lock`` (which the log
    thread holds for each record), lines together up to ``PIPE_BUF`` bytes in one write,
    a longer line alone in pieces of ``PIPE_BUF`` bytes, each once the file takes it
    (``POLLOUT``), so that a relay never blocks in a write. A line longer than
    :data:`_LONGEST_LINE` is passed on in pieces of that size, each ended.

    Nothing is lost uncounted: a line the file refused (a reader gone, a full disk) is
    counted in :attr:`lost`, and so is, once :meth:`give_up` was called (this process's
    standard error unread as the run ends), every line still held, or still unread in
    the worker's pipe (read at once, not written: by the relay's thread as it ends, or,
    for one stuck inside a write, by :meth:`count_unread_now`). :meth:`lost_now` says
    the count.
    """

    def __init__(self, stderr: Any) -> None:
        self._file = stderr
        #: the thread that relays (started by the caller)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self._state = threading.Lock()
        #: lines not written: refused by the file (a reader gone, a full disk)
        self.lost = 0
        # lines read and held (the last one maybe without its end yet), being written,
        # and (once given up) still unread in the worker's pipe
        self._pending = self._writing = self._unread = 0
        self._given_up = False
        # (once given up) the pipe's newlines read to count them, and its last byte read
        self._newlines_unread, self._last_unread = 0, b""
        # held by whichever thread reads the pipe once given up, or closes it (the
        # relay's at its end, or count_unread_now's caller for one stuck in a write)
        self._draining = threading.Lock()
        self._closed = False
        #: set as the worker exits: the relay then ends at the pipe's end, or once the
        #: pipe had nothing for _OUTPUT_GRACE (held open by a process it started: see
        #: _read_output)
        self.exited = threading.Event()
        #: waits of _LOOK_AGAIN in a row in which this process's standard error took
        #: nothing (not writable; or its lock held with it not writable): a count, not a
        #: clock, so that a thread run late (this one, or the lock's holder) does not
        #: look blocked
        self._blocked = 0

    def _run(self) -> None:
        # Closed here, by the thread that reads it, at its end (see run_workers' read).
        try:
            self._relay()
        finally:
            with self._draining:
                self._closed = True
                self._file.close()

    def _relay(self) -> None:
        # (the pipe stays open until _run closes it)
        fd = self._file.fileno()
        pending = bytearray()
        waiting = _PipeWait(fd, self.exited, _OUTPUT_GRACE)
        while not self._given_up and waiting.more() and (chunk := os.read(fd, 1 << 16)):
            waiting.took(len(chunk))
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            if not cut and len(pending) >= _LONGEST_LINE:
                pending += b"\n"  # (ended: written, and counted, as a line)
                cut = len(pending)
            data = bytes(pending[:cut])
            del pending[:cut]
            with self._state:
                self._pending = 1 if pending else 0
                self._writing = data.count(b"\n")
            self._write_lines(data)
        if pending and not self._given_up:  # (its last line, without its end)
            with self._state:
                self._pending, self._writing = 0, 1
            self._write_lines(bytes(pending) + b"\n")
        if self._given_up:
            self._count_unread(fd)

    def wait_end(self, grace: float) -> None:
        """Wait for the relay's thread to end (the worker's pipe at its end, or idle: see
        :class:`_PipeWait`) as long as this process's standard error takes what it
        writes: until it took nothing for ``grace`` seconds in a row (a terminal stopped
        with Ctrl-S, a socket's buffer full), counted in the relay's own waits, so that a
        relay starved on a loaded machine is waited for, not given up."""
        while self.thread.is_alive() and self._blocked * _LOOK_AGAIN < grace:
            self.thread.join(_LOOK_AGAIN)

    def give_up(self) -> None:
        """Write no more: what is held and unread is counted lost (see the class doc)."""
        self._given_up = True

    def lost_now(self) -> int:
        """The lines lost so far, and (once given up) those not written: held, or unread
        in the worker's pipe (as counted when the relay's thread ended, or by
        :meth:`count_unread_now`)."""
        with self._state:
            held = self._pending + self._writing + self._unread
            return self.lost + (held if self._given_up else 0)

    def count_unread_now(self) -> None:
        """Given up, its thread still inside a write that blocks (a terminal stopped with
        Ctrl-S, a socket's buffer full): count the lines in the worker's pipe from here.
        They were uncounted: only the relay's thread counted them, at its end. (It reads
        nothing more of the pipe: it stops as its write returns.)"""
        if self._given_up:
            # (ValueError: closed by its thread meanwhile, which counted them)
            with contextlib.suppress(ValueError):
                self._count_unread(self._file.fileno())

    def _count_unread(self, fd: int) -> None:
        """Given up: count the lines still in the worker's pipe (the last one unended too;
        the end of the line held without its end is that line, counted as held); each
        read once, by whichever thread comes first (see count_unread_now)."""
        with self._draining:
            if self._closed:
                return
            newlines, last = 0, b""
            with contextlib.suppress(OSError):  # (BlockingIOError: nothing more now)
                os.set_blocking(fd, False)
                while chunk := os.read(fd, 1 << 16):
                    newlines += chunk.count(b"\n")
                    last = chunk[-1:]
            with self._state:
                self._newlines_unread += newlines
                self._last_unread = last or self._last_unread
                last = self._last_unread
                # the lines of what is held unended and what is unread, together
                lines = self._newlines_unread + (
                    1 if (self._pending or last) and last != b"\n" else 0
                )
                self._unread = lines - self._pending

    def _write_lines(self, data: bytes) -> None:
        """Write ``data`` (whole lines): lines together up to ``PIPE_BUF`` bytes in one
        write (a short line of this process's own goes between lines, never into one), a
        longer line alone."""
        lock = output_lock()
        while data:
            size = len(data)
            if size > select.PIPE_BUF:
                size = data.rfind(b"\n", 0, select.PIPE_BUF) + 1 or data.find(b"\n") + 1 or size
            piece, data = data[:size], data[size:]
            lines = piece.count(b"\n")
            while not lock.acquire(timeout=_LOOK_AGAIN):
                if not _writable(2):  # (the holder stuck in a write; not one run late)
                    self._blocked += 1
                if self._given_up:
                    return
            try:
                written = self._write(piece)
            finally:
                lock.release()
            with self._state:
                self._writing -= lines
                if written < len(piece):  # refused (or given up): counted lost
                    self.lost += lines
            if self._given_up:
                return

    def _write(self, piece: bytes) -> int:
        """Write ``piece`` to standard error in writes of at most ``PIPE_BUF`` bytes, each
        once it takes one; how much it took (less: refused, or given up while waiting)."""
        done = 0
        try:
            poller = select.poll()
            poller.register(2, select.POLLOUT)
        except (OSError, ValueError):  # (closed)
            return done
        while done < len(piece):
            if not poller.poll(_LOOK_AGAIN * 1000):
                self._blocked += 1
                if self._given_up:
                    return done
                continue
            try:
                done += os.write(2, piece[done : done + select.PIPE_BUF])
                self._blocked = 0
            except BlockingIOError:  # (a standard error made non-blocking)
                continue
            except OSError:
                return done
        return done


class _PipeWait:
    """Waits for bytes on the read end ``fd`` of a worker's pipe, to read it to its end
    as long as the worker may have written to it: once the worker ``exited``, all it wrote
    is in the pipe, so the wait gives up (:meth:`more` says False) only once the pipe had
    nothing for ``grace`` seconds after the exit (held open by a process the worker
    started, that writes nothing), or more bytes were read since the exit than the pipe
    holds (such a process writes on: the worker's were all read before). Neither is a
    bound a slow machine reaches by itself: a reader starved for long finds the bytes
    waiting (``poll`` says so at once), and the grace counts only a pipe with no byte in
    it. A process that writes little for good keeps it reading (a stop ends the run's
    wait, see ``run_workers``)."""

    def __init__(self, fd: int, exited: threading.Event, grace: float) -> None:
        self._fd, self._exited, self._grace = fd, exited, grace
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._capacity = _PIPE_CAPACITY
        try:
            import fcntl

            if hasattr(fcntl, "F_GETPIPE_SZ"):  # (Linux)
                self._capacity = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
        except (ImportError, OSError):  # (not a pipe)
            pass
        #: bytes read since the exit was seen (None: not seen yet)
        self._since_exit: int | None = None

    def more(self) -> bool:
        """Wait until the pipe has bytes or ended (True: read it), or give up (False)."""
        while True:
            exited = self._exited.is_set()
            if exited and self._since_exit is None:
                self._since_exit = 0
            if self._since_exit is not None and self._since_exit > self._capacity:
                return False
            # (a timeout means no byte came for all of it: a starved thread's too)
            if self._poller.poll(self._grace * 1000):
                return True
            if exited:
                return False

    def took(self, size: int) -> None:
        """``size`` bytes were read."""
        if self._since_exit is not None:
            self._since_exit += size


def _read_output(
    fd: int, exited: threading.Event, keep: Callable[[bytes], object], grace: float
) -> bool:
    """Read the pipe ``fd`` (a worker's stdout) into ``keep`` until its end (True), or
    until all the worker wrote was read while a process it started holds it open (False:
    see :class:`_PipeWait`); ``exited`` is set as the worker exits."""
    waiting = _PipeWait(fd, exited, grace)
    while waiting.more():
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return True
        keep(chunk)
        waiting.took(len(chunk))
    return False


def _writable(fd: int) -> bool:
    """Whether a write to ``fd`` would take bytes now (a closed one: True, it fails)."""
    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _relays_lost(relays: Sequence[_Relay], grace: float) -> int:
    """The lines the relays could not write: each is waited for to end (write what it
    holds) until this process's standard error took nothing for ``grace`` seconds in a
    row (:meth:`_Relay.wait_end`), then given up."""
    for relay in relays:
        relay.wait_end(grace)
    for relay in relays:
        relay.give_up()
    for relay in relays:
        relay.thread.join(4 * _LOOK_AGAIN)  # (it looks every _LOOK_AGAIN)
        if relay.thread.is_alive():  # (stuck inside a write)
            relay.count_unread_now()
    return sum(relay.lost_now() for relay in relays)


def _move_credentials_to_env(nats_url: str, env: dict[str, str]) -> str:
    """``nats_url`` without user info; the credentials it had go to ``env``."""
    from .._nats._auth import NatsAuth, split_credentials

    urls, auth = split_credentials([u.strip() for u in nats_url.split(",")], NatsAuth())
    for key, value in (("USER", auth.user), ("PASSWORD", auth.password), ("TOKEN", auth.token)):
        if value is not None:
            env[f"NEXUS_NATS__{key}"] = value
    return ",".join(urls)


def _status(code: int) -> int:
    """An exit status as a shell reports it (killed by signal N -> 128 + N)."""
    return 128 - code if code < 0 else code
