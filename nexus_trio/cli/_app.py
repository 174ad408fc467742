"""The typer application behind the ``nexus`` (and ``nexus-runtime``) command.

Commands: ``run``, ``config init``, ``config show``, ``version``, ``health``. Other modules
add theirs with a ``register(app)`` function (``nexus bench``, ``nexus send``, ...).

Exit statuses: 0 success; 1 the run failed (the app raised, supervision escalated to the
kernel, accounting mismatch), ``nexus health`` unhealthy, ``config init`` refused; 2 bad
usage: an invalid flag value (the message names the flag) or an invalid config file
(the message names file, line and key); 130 a second Ctrl-C forced the exit, or a
KeyboardInterrupt of the app ended the run (its summary says `interrupted`).

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import http
import http.client
import importlib
import io
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from .. import AppConfig, MetricsConfig, __version__
from .._config import MAX_AGENTS, server_lost_wait_of, shown, shown_path, values_as_toml
from . import _bench_cmd, _send_cmd
from ._commands import (
    PROGRAM_NAMES,
    Command,
    Group,
    RunByDefaultGroup,
    RunCommand,
    default_to_run,
    file_path,
    finite_at_least,
    host_name,
    one_of,
    refusal_not_written,
    say_refused_as_json,
    whole_number,
)
from ._commands import shown as cut
from ._encoding import stand_ins
from ._hosts import ascii_host, header_host, probe_host, url_host
from ._warnings import log_load

if TYPE_CHECKING:
    from ..config import LoadedConfig

__all__ = ["app", "default_to_run", "main"]

log = logging.getLogger("nexus_trio.cli")

_T = TypeVar("_T")

EXAMPLES = """\
[bold]Examples[/]

  nexus run --agents 1000 --duration 10      [dim]# demo ring, live view, summary[/]

  nexus run -n 10000 -w fanout --rate 50000 --metrics-port 9464

  nexus run --app myproject.agents:main      [dim]# your own agents[/]

  nexus run -n 100 -d 2 --json | jq .sent    [dim]# summary as JSON[/]

  nexus config init config.toml              [dim]# commented template[/]

  nexus config show -c config.toml           [dim]# effective values + sources[/]

  nexus health --port 9464                   [dim]# exit 0 if healthy[/]
"""

app = typer.Typer(
    name="nexus",
    cls=RunByDefaultGroup,
    help="nexus_trio: an agent kernel for Python on Trio.",
    epilog=EXAMPLES,
    rich_markup_mode="rich",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(
    cls=Group,
    help="Write a config template or show the effective config.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(config_app, name="config")


#: the embedded defaults of the [app] and [metrics] keys that run's flags override, shown
#: in help; a flag overrides the config only when it is on the command line
_APP_DEFAULTS = AppConfig()
_METRICS_DEFAULTS = MetricsConfig()


class LogLevel(enum.StrEnum):
    trace = "trace"
    debug = "debug"
    info = "info"
    warn = "warn"
    warning = "warning"
    error = "error"
    critical = "critical"


class LogFormat(enum.StrEnum):
    compact = "compact"
    full = "full"  # (the original's name of compact's layout)
    json = "json"
    pretty = "pretty"


class Workload(enum.StrEnum):
    ring = "ring"
    fanout = "fanout"
    request = "request"
    pool = "pool"


_DEFAULT_WORKLOAD = Workload(_APP_DEFAULTS.workload)
_PAYLOAD_MAX = 64 * 1024 * 1024  # bytes of a demo payload (--payload-size)


def _fail(message: str, status: int = 2) -> typer.Exit:
    # The message names what was wrong as the user wrote it (``[kernel]``, a value): text,
    # not markup.
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        Text.assemble(("nexus: error:", "bold red"), " ", message)
    )
    return typer.Exit(status)


#: what a config file named by ``--config`` that cannot be used at all says (not a
#: problem inside it, which names its line)
_UNUSABLE_FILE = ("config file not found", "config path is not a file", "cannot read config file")


def _config_failed(exc: Any, config: Path | None) -> Exception:
    """The error of a config that did not load (``exc``, a ``ConfigError``): a file given
    as ``--config`` that is not there, no file or unreadable is a bad value of the flag,
    in the usage box naming ``'--config' / '-c'`` and the path (as ``nexus send`` said
    it; ``run``, ``config show`` and ``health`` said ``nexus: error: PATH: config file
    not found``, without the flag); any other (a line of the file, a variable) names its
    file, line and key, ``nexus: error: ...``, exit 2."""
    if config is not None and exc.line is None and exc.message.startswith(_UNUSABLE_FILE):
        return typer.BadParameter(str(exc), param_hint="'--config' / '-c'")
    return _fail(str(exc))


def _flag_words(exc: Any) -> str:
    """The message of a config error (``exc``, a ``ConfigError``) of a value a flag gave:
    without the key's ``[app] agents`` before it, which the user did not write (the hint
    names the flag), ``must be at most 100000000 (...), got 99999999999``; a value from
    the config file keeps the key's wording, with its file and line."""
    prefix = "[{}] {} ".format(*exc.key.split(".", 1)) if exc.key and "." in exc.key else ""
    message = str(exc.message)
    return message[len(prefix) :] if prefix and message.startswith(prefix) else message


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(_version_text())
        raise typer.Exit()


def _version_text() -> str:
    import platform

    import trio

    return (
        f"nexus_trio {__version__} (trio {trio.__version__}, "
        f"Python {platform.python_version()}, {platform.system()})"
    )


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            help="Print the version and exit.",
            callback=_version_callback,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """nexus_trio: an agent kernel for Python on Trio.

    Runs thousands to millions of agents with bounded mailboxes, backpressure,
    supervision and graceful shutdown.
    """


@app.command(cls=Command)
def version() -> None:
    """Print the version of nexus_trio, Trio and Python."""
    typer.echo(_version_text())


# --- run ------------------------------------------------------------------------------------

_RUN_EPILOG = (
    "[bold]--app[/] names [i]package.module:attr[/] (the current directory is importable): "
    "an AgentSpec made with @agent or an Agent subclass (spawned once), a list of them and "
    "of Supervisors, a Supervisor, or [i]async def main(kernel)[/] (called once the kernel is up; the run ends "
    "when it returns, at --duration or at Ctrl-C). Without --app, --spawn and --types a demo "
    "workload runs: [i]ring[/] (tokens forwarded agent to agent), [i]fanout[/] (a driver "
    "sends round robin), [i]request[/] (pairs doing request/reply) or [i]pool[/] (a driver "
    "sends to a pool of workers, resized while it runs).\n\n"
    "[bold]--types[/] names [i]package.module:attr[/]: a dict of agent type names to @agent "
    "specs or Agent subclasses (e.g. [i]TYPES = {'counter': Counter}[/]), registered before "
    "the node joins the cluster (with --nats or --workers), so another member that places "
    "an agent of a type here (cluster.spawn) at once finds it; cluster_of(kernel)"
    ".register_type in main comes after the join, too late for such a placement.\n\n"
    "Ctrl-C, SIGTERM or SIGHUP (the terminal hung up): graceful shutdown, then the summary; "
    "a second Ctrl-C or SIGTERM exits at once (status 130). SIGUSR1: the agent tree "
    "(states, mailbox depths) goes to the log.\n\n"
    "Flags override the config file (\\[app], \\[metrics], \\[logging], \\[nats] url) and "
    "NEXUS_* variables. The keys without a flag (the kernel's limits: \\[kernel], "
    "\\[supervision], \\[runtime]; NATS credentials and server_lost_wait: \\[nats]; the cluster: "
    "\\[cluster]; the durable path: \\[durable]) are set in the config file or as "
    "NEXUS_SECTION__KEY variables (NEXUS_CLUSTER__HEARTBEAT_INTERVAL=0.5): [i]nexus config "
    "init FILE[/] writes every key, commented; [i]nexus config show[/] prints what a run "
    "uses and where each value came from (docs/config.md).\n\n"
    "Exit status: 0 ok, 1 the run failed, 2 bad flag or config, 130 forced.\n"
)


@app.command(cls=RunCommand, epilog=_RUN_EPILOG)
def run(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Config file (TOML).", parser=file_path, metavar="<file>"
        ),
    ] = None,
    log_level: Annotated[
        LogLevel | None,
        typer.Option("--log-level", "-l", help="Log level.", parser=one_of(LogLevel)),
    ] = None,
    log_format: Annotated[
        LogFormat | None,
        typer.Option("--log-format", "-f", help="Log format.", parser=one_of(LogFormat)),
    ] = None,
    agents: Annotated[
        int,
        typer.Option(
            "--agents",
            "-n",
            "--num-agents",
            min=1,
            max=MAX_AGENTS,
            parser=whole_number(1),
            help="Agents of the demo workload (config: \\[app] agents).",
        ),
    ] = _APP_DEFAULTS.agents,
    duration: Annotated[
        float,
        typer.Option(
            "--duration",
            "-d",
            min=0,
            parser=finite_at_least(0, "0 = until Ctrl-C"),
            help="Seconds to run; 0 = until Ctrl-C (config: \\[app] duration).",
        ),
    ] = _APP_DEFAULTS.duration,
    generate_config: Annotated[
        Path | None,
        typer.Option(
            "--generate-config",
            metavar="FILE",
            parser=file_path,
            help="Write a commented config template to FILE (- for standard output) and exit.",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="With --generate-config: overwrite FILE if it exists (as config init --force).",
        ),
    ] = False,
    app_ref: Annotated[
        str | None,
        typer.Option(
            "--app",
            metavar="MODULE:ATTR",
            help="Run your agents instead of the demo: an @agent spec, an Agent subclass, a"
            " Supervisor, a list of these, or async def main(kernel).",
        ),
    ] = None,
    types_ref: Annotated[
        str | None,
        typer.Option(
            "--types",
            metavar="MODULE:ATTR",
            help="Agent types for placements: a dict type name -> @agent spec or Agent"
            " subclass, registered before the node joins; needs --nats or --workers"
            " (config: \\[app] types).",
        ),
    ] = None,
    workload: Annotated[
        Workload,
        typer.Option(
            "--workload",
            "-w",
            help="Demo workload (config: \\[app] workload).",
            parser=one_of(Workload),
        ),
    ] = _DEFAULT_WORKLOAD,
    rate: Annotated[
        float,
        typer.Option(
            "--rate",
            min=0,
            parser=finite_at_least(0, "0 = unpaced"),
            help="Demo messages per second in total; 0 = unpaced.",
        ),
    ] = 0.0,
    payload_size: Annotated[
        int,
        typer.Option(
            "--payload-size",
            min=0,
            max=_PAYLOAD_MAX,
            parser=whole_number(0, _PAYLOAD_MAX),
            help="Demo payload size in bytes.",
        ),
    ] = 16,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON on stdout.")
    ] = False,
    metrics_port: Annotated[
        int,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            parser=whole_number(0, 65535),
            help="Serve /metrics, /healthz and /readyz on this port; 0 = off"
            " (config: \\[metrics] port).",
        ),
    ] = _METRICS_DEFAULTS.port,
    metrics_host: Annotated[
        str,
        typer.Option(
            "--metrics-host", help="Address of the metrics endpoint (config: \\[metrics] host)."
        ),
    ] = _METRICS_DEFAULTS.host,
    group_port: Annotated[
        int,
        typer.Option(
            "--group-port",
            min=0,
            max=65535,
            parser=whole_number(0, 65535),
            help="With --workers and --metrics-port P: the parent serves /healthz, /readyz"
            " and /metrics for the whole group on this port (each worker's, asked on P + i);"
            " 0 = off (config: \\[metrics] group_port).",
        ),
    ] = 0,
    dump_on_signal: Annotated[
        bool,
        typer.Option(
            "--dump-on-signal",
            help="Also write the agent tree to the log on SIGINT/SIGTERM/SIGHUP (SIGUSR1 always does).",
        ),
    ] = False,
    spawn: Annotated[
        list[str] | None,
        typer.Option(
            "--spawn", metavar="CMD", help="Spawn an external agent process (repeatable)."
        ),
    ] = None,
    nats: Annotated[
        str | None,
        typer.Option(
            "--nats",
            metavar="URL",
            help="Join a cluster through NATS at URL (config: \\[nats] url; the cluster's"
            " other keys: \\[nats], \\[cluster], \\[durable], no flags).",
        ),
    ] = None,
    node: Annotated[
        str | None,
        typer.Option(
            "--node", metavar="NAME", help="Node name in the cluster; HOST-PID if not given."
        ),
    ] = None,
    live: Annotated[
        bool | None,
        typer.Option(
            "--live/--no-live",
            help="Force the live view on or off; on if stderr is a terminal if not given.",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", parser=whole_number(), help="Seed for backoff jitter and the demo."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            "-W",
            min=0,
            parser=whole_number(0),
            help=(
                "Run N kernel processes on this host connected through NATS (0 = one per "
                "core); without --nats a local nats-server is started and stopped. A message "
                "between workers goes through NATS: the ring, whose every hop crosses, runs "
                "slower than in one process."
            ),
        ),
    ] = None,
) -> None:
    """Run a kernel: your agents (--app) or a demo workload, with a live view and a summary."""
    from .._logcall import log_guarded
    from ..config import ConfigError, load_config
    from ..logs import configure_logging, log_calls_failed, output_lock, records_lost
    from ._cluster_cmd import worker_node
    from ._run import (
        RunOptions,
        catch_stop_signals_early,
        execute_run,
        label_worker_lines,
        note_stops_after_the_run,
        stderr_proxy,
    )

    # (a worker takes SIGINT/SIGTERM too: the parent's stop may come while it starts)
    catch_stop_signals_early(worker=worker_node() is not None)
    if _entry["process"]:
        note_stops_after_the_run()  # (this process ends with the run)
    if generate_config is not None:
        _refuse_flags_beside_template(ctx)
        _write_template(generate_config, force=force, overwrite="--force replaces it")
        return
    if force:
        # (the original's --generate-config FILE, given again over the file it wrote, is
        # told to add --force; without --generate-config it would be ignored)
        raise typer.BadParameter(
            "is for --generate-config FILE (overwrite FILE if it exists): nothing else of"
            " run writes a file; drop the flag",
            param_hint="'--force'",
        )

    commands: list[tuple[str, ...]] = []
    for command in spawn or ():
        commands.append(_split_command(command, "'--spawn'"))
    if nats is not None:
        _check_nats(nats)

    flag_of = {
        "logging.level": "--log-level",
        "logging.format": "--log-format",
        "app.agents": "--agents",
        "app.duration": "--duration",
        "app.workload": "--workload",
        "app.app": "--app",
        "app.types": "--types",
        "app.spawn": "--spawn",
        "metrics.port": "--metrics-port",
        "metrics.host": "--metrics-host",
    }

    def given(value: Any, name: str) -> Any:
        """A flag's value if it was on the command line, else None: the config decides."""
        source = ctx.get_parameter_source(name)
        return value if source is not None and source.name == "COMMANDLINE" else None

    def given_by(name: str, dotted: str) -> str:
        """The flag, if it was on the command line, else the config key and its source."""
        if given(True, name) is not None:
            return "--" + name.replace("_", "-")
        return _key_hint(loaded, dotted)

    overrides: dict[str, Any] = {
        "logging.level": log_level.value if log_level else None,
        "logging.format": log_format.value if log_format else None,
        "app.agents": given(agents, "agents"),
        "app.duration": given(duration, "duration"),
        "app.workload": given(workload.value, "workload"),
        "app.app": app_ref,
        "app.types": types_ref,
        "app.spawn": list(spawn) if spawn else None,
        "metrics.port": given(metrics_port, "metrics_port"),
        "metrics.host": given(metrics_host, "metrics_host"),
    }
    try:
        loaded = load_config(config, overrides=overrides, log_warnings=False)
    except ConfigError as exc:
        flag = flag_of.get(exc.key or "") if exc.origin and "override" in exc.origin else None
        if flag is not None:
            # (named as click names a flag's bad value: every spelling, '--agents' /
            # '-n' / '--num-agents', where this said '--agents' alone)
            spelt = next((p.opts for p in ctx.command.params if flag in p.opts), [flag])
            hint = " / ".join(f"'{opt}'" for opt in spelt)
            raise typer.BadParameter(_flag_words(exc), param_hint=hint) from None
        failed = _config_failed(exc, config)
        if json_out and worker_node() is None and not isinstance(failed, typer.BadParameter):
            # (a usage error's is said so by the root group: RunByDefaultGroup.invoke)
            say_refused_as_json("config error", str(exc), 2)
        raise failed from None
    _refuse_demo_flags(ctx, loaded, app_ref, types_ref, spawn)
    types_hint = "'--types'" if types_ref is not None else _key_hint(loaded, "app.types")
    app_hint = "'--app'" if app_ref is not None else _key_hint(loaded, "app.app")
    if loaded.config.app.types and workers is None and not (nats or loaded.config.nats.url):
        # (checked before anything is imported: a single kernel has no placements to serve)
        raise typer.BadParameter(
            "needs --nats URL or --workers N (or [nats] url in the config): agent types are"
            " for placements from other members of a cluster",
            param_hint=types_hint,
        )
    if workers is not None and node is not None:
        # (the parent names its workers worker-<i>, by which the swarm finds its members:
        # a --node here would be dropped without a word)
        raise typer.BadParameter(
            "--workers names its workers worker-0, worker-1, ... itself (the swarm finds"
            " its members by those names): drop --node. One NATS server holds one swarm of"
            " --workers (a second one given the same --nats finds the name worker-0 taken):"
            " start another swarm without --nats, on a private server of its own",
            param_hint="'--node'",
        )
    if group_port and workers is None:
        raise typer.BadParameter(
            "is the port of a --workers run's parent (one endpoint for all its workers):"
            " a single run serves its own on --metrics-port",
            param_hint="'--group-port'",
        )
    if given(metrics_host, "metrics_host") is not None and not loaded.config.metrics.port:
        # (refused, not ignored, as a demo flag with --app: no endpoint listens on it)
        raise typer.BadParameter(
            f"{cut(metrics_host, quoted=True)} is the address of the metrics endpoint, which is off (no"
            " --metrics-port, [metrics] port 0): give --metrics-port P too, or drop the flag",
            param_hint="'--metrics-host'",
        )
    if workers is not None:  # (each worker checks all again; the above must not start them)
        _run_workers(
            ctx,
            workers,
            nats,
            json_out,
            loaded,
            app_hint,
            types_hint,
            group_port=group_port,
        )
        return
    cfg = loaded.config
    summary_out, real_stderr = None, sys.stderr
    if json_out and worker_node() is not None:
        # A worker's stdout carries its JSON summary to the parent, and nothing else: what
        # the app prints (at import too) goes to stderr, which the parent passes through.
        # Whole lines: a print is two writes (the text, then its end), and a log record
        # the worker's log thread wrote between them went into the middle of the line
        # ("hi from the app2026-... INFO ... joined the cluster", then a lone end).
        # And what it writes to sys.stderr goes in whole lines, each under the log
        # handler's lock: a long line (past PIPE_BUF, which a full pipe takes in pieces)
        # and a record the log thread wrote meanwhile cut into each other.
        lines = WholeLines(sys.stderr, lock=output_lock)
        summary_out = sys.stdout
        sys.stdout = sys.stderr = lines
    if nats is None and cfg.nats.url:
        _check_nats(cfg.nats.url, _key_hint(loaded, "nats.url"))  # (the extra too)
    if node is not None and not (nats or cfg.nats.url):
        raise typer.BadParameter(
            f"{node!r} needs --nats URL (or [nats] url in the config)", param_hint="'--node'"
        )
    if node is not None:  # (refused here, before anything starts, not after the connect)
        from .._nats._wire import check_node_name

        try:
            check_node_name(node)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--node'") from None
    records_lost_before, log_calls_failed_before = records_lost(), log_calls_failed()
    configure_logging(
        cfg.logging, stream=None if cfg.logging.format == "pretty" else stderr_proxy()
    )
    if worker_node() is None:
        # (a --workers worker loads the file, environment and flags its parent loaded, and
        # the parent said which and their warnings before it started any worker: said by
        # each worker too, a -W N run said the file N times and each warning N + 1 times)
        log_load(loaded)

    not_started = None
    try:
        target = _loaded_app(cfg.app.app, app_hint, loaded)
        types = _loaded_types(cfg.app.types, types_hint, loaded)
    except _ImportInterrupted as exc:
        if exc.signame is None:  # (a Ctrl-C)
            raise _interrupted(exc) from None
        # A stop while it imported (a worker the parent stopped, a hangup): it runs
        # nothing, and prints the summary of a run stopped as it started, saying so
        # (exit 0; a worker's is that of one stopped before it joined the cluster).
        target = types = None
        not_started = f"stopped while importing {exc.what}: the run was not started"
        log_guarded(log, logging.WARNING, "%s: %s", exc.signame, not_started)
        commands = []
    spawn_hint = "--spawn"
    if not commands and not_started is None:
        spawn_hint = _key_hint(loaded, "app.spawn")
        commands = [_split_command(c, spawn_hint, loaded) for c in cfg.app.spawn]
    show_live = live if live is not None else _can_redraw(sys.stderr)
    opts = RunOptions(
        config=cfg,
        agents=cfg.app.agents,
        duration=cfg.app.duration,
        workload=cfg.app.workload,
        rate=rate,
        payload_size=payload_size,
        app=cfg.app.app,
        target=target,
        types=types,
        json=json_out,
        metrics_port=cfg.metrics.port,
        metrics_host=cfg.metrics.host,
        metrics_port_hint=given_by("metrics_port", "metrics.port"),
        metrics_host_hint=given_by("metrics_host", "metrics.host"),
        dump_on_signal=dump_on_signal,
        spawn=tuple(commands),
        spawn_hint=spawn_hint,
        nats=nats,
        node=node,
        live=show_live,
        seed=seed,
        demo=target is None and not commands and types is None and not_started is None,
        records_lost_before=records_lost_before,
        log_calls_failed_before=log_calls_failed_before,
        not_started=not_started,
    )
    try:
        with label_worker_lines(node):
            status = execute_run(opts, summary_out=summary_out)
    finally:
        if isinstance(sys.stdout, WholeLines):
            sys.stdout.flush()  # (a last line without its end)
        if summary_out is not None:
            sys.stderr = real_stderr
    if status:
        raise typer.Exit(status)


def _can_redraw(stream: Any) -> bool:
    """Whether ``stream`` is a terminal a live view can redraw: not a dumb one (``TERM``
    ``dumb`` or ``unknown``, as rich judges it: an editor's shell, some CI consoles),
    where rich draws no frame until the last, and the run would show nothing while it
    runs."""
    term = os.environ.get("TERM", "").lower()
    return bool(stream.isatty()) and term not in ("dumb", "unknown")


class _ImportInterrupted(Exception):
    """A Ctrl-C (KeyboardInterrupt), or a stop signal noted early (a ``--workers``
    worker's SIGTERM, a SIGHUP), while the app or the agent types were imported: the run
    was not started."""

    def __init__(self, what: str, signame: str | None = None) -> None:
        super().__init__(what)
        #: what was being imported and which flag (or key) named it
        self.what = what
        #: the stop signal noted early that interrupted it (``_run.stops_interrupt``: a
        #: worker's SIGTERM, a SIGHUP); None: a KeyboardInterrupt (a Ctrl-C outside a worker)
        self.signame = signame


def _interrupted(exc: _ImportInterrupted) -> typer.Exit:
    """Say that the run was interrupted before it started (no traceback); status 130, as
    a forced stop's."""
    from ._run import FORCED_EXIT

    Console(stderr=True, highlight=False, soft_wrap=True).print(
        Text.assemble(
            ("nexus: interrupted:", "bold red"),
            f" SIGINT while importing {exc.what}: the run was not started",
        )
    )
    return typer.Exit(FORCED_EXIT)


def _loaded(
    load: Callable[[str], _T],
    reference: str | None,
    hint: str,
    loaded: LoadedConfig | None = None,
    key: str = "",
) -> _T | None:
    """``load(reference)``, None without a reference; a usage error naming ``hint`` (the
    flag or config key the reference came from) if it cannot be loaded; _ImportInterrupted
    for a Ctrl-C while it is imported, or a stop signal noted early (a ``--workers``
    worker's SIGTERM, a SIGHUP; also one that came before or that the import swallowed,
    see ``_run.stops_interrupt``)."""
    from ._run import AppError, StoppedWhileImporting, stops_interrupt

    if not reference:
        return None
    try:
        with stops_interrupt():  # (a worker: the parent's stop interrupts the import)
            return load(reference)
    except AppError as exc:
        where = ""
        if exc.missing is not None and loaded is not None:
            # (a config file's module beside the file, where nexus runs elsewhere)
            top = exc.missing.partition(".")[0]
            found, base = _beside_the_config(loaded, key, [f"{top}.py", f"{top}/"])
            if found is not None:
                where = (
                    f"; {cut(found.rstrip('/'))} is beside the config file, in {base}: run"
                    " nexus from there (systemd: WorkingDirectory=), or put it on PYTHONPATH"
                )
        raise typer.BadParameter(str(exc) + where, param_hint=hint) from None
    except KeyboardInterrupt as exc:
        # (the first stop decides, by the signals' arrival: see _run.stops_interrupt)
        signame = exc.signame if isinstance(exc, StoppedWhileImporting) else None
        raise _ImportInterrupted(
            f"{cut(reference, quoted=True)} ({hint.strip(chr(39))})", signame
        ) from None


def _loaded_app(reference: str | None, hint: str, loaded: LoadedConfig | None = None) -> Any:
    """The object ``--app`` (or the config's ``[app] app``, of ``loaded``; ``hint`` names
    which) names, as :func:`_loaded`."""
    from ._run import load_app

    return _loaded(load_app, reference, hint, loaded, "app.app")


def _beside_the_config(
    loaded: LoadedConfig, key: str, paths: Sequence[str]
) -> tuple[str | None, str]:
    """The first of ``paths`` (relative paths that the value of the config key ``key``
    names) that is not in the current directory but is beside the config file the value
    came from, and that file's directory: a config file's ``[app] app`` and ``[app] spawn``
    are taken from the directory nexus runs in, not the file's (a systemd unit's
    ``WorkingDirectory``), so that a mistake says where the path is instead. (None, '')
    when the value did not come from the file, or the file is in the current directory."""
    if loaded.path is None or not loaded.sources.get(key, "").startswith("file "):
        return None, ""
    base = os.path.dirname(os.path.abspath(loaded.path))
    if os.path.realpath(base) == os.path.realpath(os.getcwd()):
        return None, ""
    for path in paths:
        if (
            path
            and not path.startswith("-")
            and not os.path.isabs(path)
            and not os.path.exists(path)
            and os.path.exists(os.path.join(base, path))
        ):
            return path, base
    return None, ""


#: the flags of the demo workload alone (``--seed`` and ``-d`` are for any run)
_DEMO_FLAGS = ("agents", "workload", "rate", "payload_size")


def _refuse_demo_flags(
    ctx: typer.Context,
    loaded: LoadedConfig,
    app_ref: str | None,
    types_ref: str | None,
    spawn: list[str] | None,
) -> None:
    """A demo flag on the command line of a run that has agents of its own (``--app``,
    ``--spawn``, ``--types`` or their keys), where no demo runs: a usage error naming
    both, not a flag silently ignored (``-n 100 --spawn CMD`` runs one agent)."""
    cfg = loaded.config.app
    given = [
        ("--app", app_ref, ""),
        ("--spawn", spawn, ""),
        ("--types", types_ref, ""),
        (_key_hint(loaded, "app.app"), cfg.app, "NEXUS_APP__APP="),
        (_key_hint(loaded, "app.spawn"), cfg.spawn, "NEXUS_APP__SPAWN='[]'"),
        (_key_hint(loaded, "app.types"), cfg.types, "NEXUS_APP__TYPES="),
    ]
    instead, unset = next(((hint, unset) for hint, value, unset in given if value), ("", ""))
    if not instead:
        return
    # (the config's key can be unset for one run, to run the demo)
    or_unset = f", or run the demo with {unset} nexus run ..." if unset else ""
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name or "")
        if param.name in _DEMO_FLAGS and source is not None and source.name == "COMMANDLINE":
            raise typer.BadParameter(
                f"is for the demo workload, which does not run with {instead} (it runs"
                f" instead): drop the flag{or_unset}",
                param_hint=" / ".join(f"'{opt}'" for opt in param.opts),
            )


def _refuse_flags_beside_template(ctx: typer.Context) -> None:
    """A flag on the command line of ``run --generate-config FILE``, which writes the
    template and runs nothing: a usage error naming it, not a flag silently ignored
    (``--generate-config FILE -W 2`` wrote the same template as without ``-W 2``), as a
    demo flag beside ``--app`` is."""
    for param in ctx.command.params:
        if param.name in ("generate_config", "force"):
            continue
        source = ctx.get_parameter_source(param.name or "")
        if source is not None and source.name == "COMMANDLINE":
            raise typer.BadParameter(
                "is not used by --generate-config, which writes the commented template (the"
                " defaults) and exits: drop the flag (give it to the run that reads the file,"
                " or set its key in the file)",
                param_hint=" / ".join(f"'{opt}'" for opt in param.opts),
            )


def _key_hint(loaded: LoadedConfig, dotted: str) -> str:
    """A config key as a usage error names it, with where its value came from, so that a
    mistake is found in the file it is in (a search path has three): ``[app] spawn (file
    /etc/nexus/config.toml)``, ``[app] app (env NEXUS_APP__APP)``."""
    section, key = dotted.split(".", 1)
    return f"[{section}] {key} ({loaded.sources.get(dotted, 'default')})"


def _loaded_types(
    reference: str | None, hint: str, loaded: LoadedConfig | None = None
) -> dict[str, Any] | None:
    """The agent types ``--types`` (or the config's ``[app] types``, of ``loaded``;
    ``hint`` names which) names, as :func:`_loaded` (a reference that names no types is
    an error of the load)."""
    from ._run import load_types

    return _loaded(load_types, reference, hint, loaded, "app.types")


def _run_workers(
    ctx: typer.Context,
    workers: int,
    nats: str | None,
    json_out: bool,
    loaded: LoadedConfig,
    app_hint: str,
    types_hint: str,
    *,
    group_port: int = 0,
) -> None:
    """``nexus run --workers N ...``: N worker processes, one summary added up.

    The app and the agent types (``app_hint`` and ``types_hint`` name the flag or key that
    gave them) are loaded here first, as each worker loads them: one that cannot be is one
    usage error, said as a single run says it (a config file's module beside the file
    too), before the nats-server and the workers start, not N worker failures. The parent
    logs as the config's ``[logging]`` says (the flags are in it), as the workers do."""
    cfg = loaded.config
    from ._cluster_cmd import (
        check_worker_count,
        default_workers,
        group_port_problem,
        metrics_ports_problem,
        not_started_summary,
        refuse_workers_in_a_worker,
        run_workers,
        worker_argv,
    )

    refuse_workers_in_a_worker()
    count = workers or default_workers()
    check_worker_count(count)
    problem = metrics_ports_problem(cfg.metrics.port, count)
    if problem is not None:
        source = ctx.get_parameter_source("metrics_port")
        from_flag = source is not None and source.name == "COMMANDLINE"
        raise typer.BadParameter(
            problem, param_hint="'--metrics-port'" if from_flag else "[metrics] port"
        )
    # (--group-port given wins over [metrics] group_port, which a single run ignores: a
    # config shared by single runs and --workers runs is not refused in the former)
    source = ctx.get_parameter_source("group_port")
    group_from_flag = source is not None and source.name == "COMMANDLINE"
    if not group_from_flag:
        group_port = cfg.metrics.group_port
    problem = group_port_problem(group_port, cfg.metrics.port, count)
    if problem is not None:
        raise typer.BadParameter(
            problem, param_hint="'--group-port'" if group_from_flag else "[metrics] group_port"
        )
    _check_nats(nats, "'--nats'" if nats is not None else "'--workers'")
    if nats is None:  # a private nats-server is started: its binary, before anything starts
        from .._nats import NatsServerError, find_nats_server

        try:
            find_nats_server()
        except NatsServerError as exc:
            raise typer.BadParameter(
                f"{exc}; or give --nats URL of a running server", param_hint="'--workers'"
            ) from None
    from ._run import is_hangup, print_summary, stderr_proxy, take_early_signals

    try:
        with contextlib.redirect_stdout(sys.stderr):  # (stdout is for the summary)
            _loaded_app(cfg.app.app, app_hint, loaded)
            _loaded_types(cfg.app.types, types_hint, loaded)
    except _ImportInterrupted as exc:
        # Before the nats-server and any worker: a summary as for any stop before the
        # first worker started (every --workers run prints one), and status 130 for a
        # Ctrl-C; 0 for a hangup (a stop asked for, the import interrupted at once).
        # The stops noted are this run's: the first interrupted the import, and a
        # SIGTERM (or SIGINT) after it forces, as once the workers start (a hangup
        # never does); it was noted and dropped, exit 0.
        noted = take_early_signals()
        forcing = [signal.Signals(s).name for s in noted[1:] if not is_hangup(s)]
        if exc.signame is not None:
            stopped_by = f"{exc.signame}; stopped while importing {exc.what}"
        else:
            stopped_by = f"SIGINT; interrupted while importing {exc.what}"
        stopped_by += ", before any worker started"
        if exc.signame is not None and forcing:
            stopped_by += f"; forced by {forcing[0]} before any worker started"
        summary = not_started_summary(count, private_server=nats is None, stopped_by=stopped_by)
        print_summary(summary, json_out=json_out)
        if exc.signame is not None and forcing:
            raise typer.Exit(130) from None
        if exc.signame is not None:
            return
        raise _interrupted(exc) from None
    from ..logs import configure_logging, flush_logs, log_calls_failed, records_lost

    lost_before, failed_before = records_lost(), log_calls_failed()
    # the parent's own lines (a worker that died, the private nats-server), in the level
    # and format of the workers' lines: [logging] of the config, the flags included
    configure_logging(
        cfg.logging, stream=None if cfg.logging.format == "pretty" else stderr_proxy()
    )
    log_load(loaded)
    summary, status = run_workers(
        count,
        worker_argv(ctx),
        nats_url=nats,
        metrics_port=cfg.metrics.port,
        shutdown_grace=cfg.kernel.shutdown_grace,
        server_lost_wait=server_lost_wait_of(cfg),
        notice_wait_at_leave=cfg.cluster.notice_wait_at_leave,
        join_timeout=cfg.cluster.join_timeout,
        group_port=group_port,
        metrics_host=cfg.metrics.host,
        max_connections=cfg.metrics.max_connections,
    )
    # The workers' losses are in their summaries; the parent's own lines lost (its
    # standard error is theirs: on a full disk, all of them) are added, once written or
    # counted lost (within FLUSH_TIMEOUT, as a single run's).
    flush_logs()
    summary["log_records_lost"] += records_lost() - lost_before
    summary["log_calls_failed"] += log_calls_failed() - failed_before
    print_summary(summary, json_out=json_out)  # (after a hangup: see print_summary)
    if status:
        raise typer.Exit(status)


def _split_command(command: str, hint: str, loaded: LoadedConfig | None = None) -> tuple[str, ...]:
    """``command`` as argv; ``hint`` names the flag or key it came from in an error
    (``[app] spawn`` of ``loaded``, when given: a path in it is checked against the
    config file's directory, see :func:`_beside_the_config`)."""
    try:
        argv = tuple(shlex.split(command))
    except ValueError as exc:
        from ..bridges.process import unsplit_comment_problem

        why = unsplit_comment_problem(command) or f"{exc} in {command!r}"
        raise typer.BadParameter(why, param_hint=hint) from None
    if not argv:
        raise typer.BadParameter("empty command", param_hint=hint)
    from ..bridges.process import shell_syntax_problem

    if (problem := shell_syntax_problem(command, argv)) is not None:
        raise typer.BadParameter(problem, param_hint=hint)
    if loaded is not None:
        from ._spawn import opened_paths

        # Only a path the command certainly opens from here (a program given by a relative
        # path, an interpreter's script): an argument the program resolves itself (beside
        # its script, in a directory of an option: uv run --directory) is its business.
        found, base = _beside_the_config(loaded, "app.spawn", opened_paths(argv))
        if found is not None:
            raise typer.BadParameter(
                f"{found!r} (in {command!r}) is not in the current directory"
                f" ({os.getcwd()}) but beside the config file, in {base}: a command of the"
                " config runs in the directory nexus runs in, not the file's; run nexus"
                f" from {base} (systemd: WorkingDirectory=), or write the path out"
                f" ({os.path.join(base, found)!r})",
                param_hint=hint,
            )
    if shutil.which(argv[0]) is None:
        raise typer.BadParameter(
            f"program {argv[0]!r} not found (not on PATH, or not executable)"
            + _quoted_command_hint(command, argv),
            param_hint=hint,
        )
    from ._spawn import missing_script

    if (missing := missing_script(command, argv)) is not None:
        raise typer.BadParameter(missing, param_hint=hint)
    return argv


def _quoted_command_hint(command: str, argv: tuple[str, ...]) -> str:
    """What to write instead, when a program not found is a whole command in quotes
    (``NEXUS_APP__SPAWN='"node w.js"'``, as an env file that keeps quotes gives it) or a
    comma-separated list (``"a,b"``): a command is split as a shell splits it, so its
    quotes are shell quoting (``'"/opt/my app/agent" -v'`` is a program with a blank in
    its path), not a string's, as they are around a text key's value
    (``NEXUS_METRICS__HOST='"0.0.0.0"'``); several commands are a TOML array."""
    program = argv[0]
    if "," in program:
        listed = command.strip().strip("\"'")  # ("a,b", a, b: the whole command's items)
        parts = [part.strip() for part in listed.split(",") if part.strip()]
        array = ", ".join(f'"{part}"' for part in parts[:3])
        return f"; several commands are a TOML array, not a list with commas: [{array}]"
    if len(argv) == 1 and command.strip()[:1] in "\"'" and any(c.isspace() for c in program):
        return (
            "; the whole command is in quotes, so it is one program name (a command is"
            f" split as a shell splits it): write it without them, {program}"
        )
    return ""


def _check_nats(url: str | None, hint: str = "'--nats'") -> None:
    """A NATS URL (if given) that looks like one, and the nats extra installed; ``hint``
    names the flag or config key (with its source) the URL or the need came from."""
    if url is not None and "://" not in url:
        if hint.startswith("'--"):
            got = cut(url, quoted=True)  # (as every refused flag value)
        else:  # a config key: shown as TOML writes it
            with values_as_toml():
                got = shown(url)
        raise typer.BadParameter(
            f"expected a URL like nats://127.0.0.1:4222, got {got}", param_hint=hint
        )
    try:
        importlib.import_module("nexus_trio._nats")
    except ImportError as exc:
        raise typer.BadParameter(
            f"NATS support is not installed (no module named {exc.name or exc!r}); "
            "pip install 'nexus_trio[nats]'",
            param_hint=hint,
        ) from None
    if url is not None:
        from .._nats._auth import check_server_url

        try:
            for one in url.split(","):
                check_server_url(one.strip())
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint=hint) from None


# --- config --------------------------------------------------------------------------------------


@config_app.command("init", cls=Command)
def config_init(
    file: Annotated[
        Path,
        typer.Argument(
            help="Where to write the template; - for standard output.",
            parser=file_path,
            metavar="FILE",
        ),
    ],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented config template (every key with its default and meaning)."""
    _write_template(file, force=force, overwrite="--force replaces it")


def _write_template(file: Path, *, force: bool, overwrite: str) -> None:
    """Write the template to ``file`` and say where it went; ``-`` is standard output (the
    template alone, so that ``nexus config init - > x.toml`` and a pipe get a loadable file).
    ``overwrite`` says how to replace a file that exists, in this command's words."""
    from ..config import ConfigError, render_template, write_template

    if str(file) == "-":
        typer.echo(render_template(), nl=False)
        return
    try:
        written = write_template(file, force=force)
    except ConfigError as exc:
        message = str(exc)
        if not force and "file exists; refusing" in message and exc.path is not None:
            # (the file is there: write_template's "use --force / force=True" names a
            # flag this command may not have, and the Python API's keyword)
            message = f"{shown_path(exc.path)}: file exists; refusing to overwrite it ({overwrite})"
        raise _fail(message, 1) from None
    typer.echo(f"wrote {shown_path(written)}")


@config_app.command("show", cls=Command)
def config_show(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Config file (TOML); else the search path.",
            parser=file_path,
            metavar="<file>",
        ),
    ] = None,
) -> None:
    """Print the effective config, each value with where it came from: built in, a file, env."""
    from ..config import ConfigError, load_config, render_effective

    try:
        loaded = load_config(config, log_warnings=False)
    except ConfigError as exc:
        raise _config_failed(exc, config) from None
    _say_load_warnings(loaded)  # (also printed in the output, as # warning: comments)
    typer.echo(render_effective(loaded), nl=False)


def _say_load_warnings(loaded: LoadedConfig) -> None:
    """A command without logging of its own (``config show``, ``health``) says the load's
    warnings on standard error, one ``nexus: warning:`` line each."""
    for warning in loaded.warnings:
        typer.echo(f"nexus: warning: {warning}", err=True)


# --- health --------------------------------------------------------------------------------------


@app.command(cls=Command)
def health(
    host: Annotated[
        str | None,
        typer.Option(
            "--host",
            parser=host_name,
            help="Host of the metrics endpoint; the config's \\[metrics] host if not given"
            " (a wildcard address: this machine's loopback).",
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            "--port",
            "-p",
            min=1,
            max=65535,
            parser=whole_number(1, 65535),
            help="Metrics port; the config's \\[metrics] port if not given.",
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option("--timeout", min=0.1, parser=finite_at_least(0.1), help="Seconds to wait."),
    ] = 3.0,
    ready: Annotated[
        bool,
        typer.Option(
            "--ready",
            help="Check readiness (/readyz: running, started, the cluster joined, its NATS"
            " connections up) instead of liveness (/healthz).",
        ),
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Config file (TOML); else the search path.",
            parser=file_path,
            metavar="<file>",
        ),
    ] = None,
) -> None:
    """Check a running kernel's /healthz (--ready: /readyz); exit 0 if healthy (ready), else 1."""
    if port is None or host is None:
        from ..config import ConfigError, load_config

        try:
            loaded = load_config(config, log_warnings=False)
        except ConfigError as exc:
            raise _config_failed(exc, config) from None
        _say_load_warnings(loaded)
        metrics = loaded.config.metrics
        if port is None:
            port = metrics.port
            if not port:
                raise typer.BadParameter(
                    "no port: pass --port or set [metrics] port in the config",
                    param_hint="'--port'",
                )
        if host is None:
            host = probe_host(metrics.host)
    path = "/readyz" if ready else "/healthz"
    # (an international name as the endpoint's listener looked it up: urllib sent it in
    # the Host header as is, which took no character past Latin-1: `unreachable`)
    url = f"http://{url_host(ascii_host(host))}:{port}{path}"
    status, body, problem = _probe_health(url, timeout, f"{header_host(ascii_host(host))}:{port}")
    from ..logs import escape_control

    # what the endpoint sent is outside text: escaped, so that it can neither drive the
    # terminal nor add a line (the answer is one line)
    body, problem = escape_control(body), escape_control(problem)
    if status is not None and 200 <= status < 300:  # (urllib raises for the others)
        typer.echo(f"{url}: {status} {body}")
        return
    if status == 404:
        # Ours always serves /healthz (503 when unhealthy): another server listens there,
        # and its whole error page (a web server's HTML) tells the user nothing.
        # (a nexus_trio from before /readyz answers 404 there too)
        cut = f"{body[:_HEALTH_SHOWN]}..." if len(body) > _HEALTH_SHOWN else body
        older = ", or a nexus_trio older than /readyz" if ready else ""
        typer.echo(
            f"{url}: not a nexus metrics endpoint{older}: 404 (no {path} there: is {port} the"
            f" kernel's --metrics-port / [metrics] port?) {cut}".rstrip(),
            err=True,
        )
    elif status is not None:
        said = "not ready" if ready else "unhealthy"
        typer.echo(f"{url}: {said}: {status} {body}", err=True)
    else:
        typer.echo(f"{url}: {problem}", err=True)
    raise typer.Exit(1)


#: the most of a /healthz body read (ours is one short line)
_HEALTH_BODY_LIMIT = 64 * 1024
#: the most of another server's 404 page shown (characters)
_HEALTH_SHOWN = 120


def _probe_health(url: str, timeout: float, host: str) -> tuple[int | None, str, str]:
    """``(status, body, "")`` of a GET of ``url`` with the ``Host`` header ``host``
    (:func:`header_host`), or ``(None, "", problem)``.

    ``timeout`` bounds the whole check, not each read: an endpoint that answers without
    end, or a byte at a time, gets no more (the request runs in a daemon thread that is
    left behind when time is up; the command exits right after). A body is read up to
    64 KiB (a longer one is a bad answer, as is one that is not HTTP: named). A timeout
    past what a thread's or a socket's wait takes (``threading.TIMEOUT_MAX``, 292 years)
    is that.
    """
    import threading
    import urllib.parse

    timeout = min(timeout, threading.TIMEOUT_MAX)

    outcome: list[tuple[int | None, str, str]] = []
    where = urllib.parse.urlsplit(url).netloc
    request = urllib.request.Request(url, headers={"Host": host})
    opener = urllib.request.build_opener(
        _NoSelfConnectionHandler(), _NoRedirectHandler(), _NoProxyForAddressesHandler()
    )

    def get() -> None:
        try:
            with opener.open(request, timeout=timeout) as response:
                body = response.read(_HEALTH_BODY_LIMIT + 1)
                if len(body) > _HEALTH_BODY_LIMIT:
                    limit = _HEALTH_BODY_LIMIT // 1024
                    outcome.append((None, "", f"bad answer: a body past {limit} KiB"))
                    return
                outcome.append((response.status, body.decode("utf-8", "replace").strip(), ""))
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                outcome.append((None, "", _not_ours_3xx(exc.code, exc.headers.get("Location"))))
                return
            body = exc.read(_HEALTH_BODY_LIMIT).decode("utf-8", "replace").strip()
            outcome.append((exc.code, body, ""))
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ConnectionRefusedError) and request.has_proxy():
                # (the proxy refused, not the endpoint: until the fifty-eighth pass this
                # said "nothing is listening on" the endpoint, which may well be up)
                outcome.append((None, "", _proxy_refused(request.host, where)))
            elif isinstance(reason, ConnectionRefusedError):
                outcome.append(
                    (None, "", f"unreachable: nothing is listening on {where} (connection refused)")
                )
            else:
                outcome.append((None, "", f"unreachable: {reason}"))
        except http.client.HTTPException as exc:
            outcome.append((None, "", f"bad answer: {type(exc).__name__}: {exc}"))
        except ValueError as exc:  # (a host no resolver takes, [metrics] host = "x..y")
            outcome.append((None, "", f"unreachable: {exc}"))

    thread = threading.Thread(target=get, name="nexus health", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return None, "", f"unreachable: no whole answer within {timeout:g}s"
    return outcome[0]


def _proxy_refused(proxy: str, where: str) -> str:
    """What a check through the environment's proxy (``http_proxy``) that the proxy
    refused is said as: the proxy named, not the endpoint (the check never reached it)."""
    return (
        f"unreachable: nothing is listening on the proxy {proxy} (http_proxy; connection"
        f" refused), so {where} was not asked: start the proxy, or name the host in"
        " no_proxy to ask it directly"
    )


#: the redirects (RFC 9110 section 15.4): another 3xx (300 Multiple Choices, 304 Not
#: Modified, 305 Use Proxy) points nowhere to go
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _not_ours_3xx(code: int, location: str | None) -> str:
    """What a 3xx answer to ``nexus health`` is said as: a redirect names where it points;
    another 3xx (``304 Not Modified``, ``305 Use Proxy``) is named by its status, as it
    points nowhere to follow (until the fifty-seventh pass each was said as a redirect,
    ``304 redirects to 'nowhere'``). Ours never answers 3xx."""
    if code in _REDIRECTS:
        where = "without a Location" if location is None else f"to {cut(location, quoted=True)}"
        what = f"{code} redirects {where} (not followed: ours never redirects"
    else:
        try:
            what = f"{code} {http.HTTPStatus(code).phrase}"
        except ValueError:  # (a code no RFC gives a name)
            what = f"{code}"
        if location is not None:
            what += f", Location {cut(location, quoted=True)}"
        what += " (ours never answers 3xx"
    return (
        f"not a nexus metrics endpoint: {what}; is the port the kernel's --metrics-port /"
        " [metrics] port?)"
    )


class _NoProxyForAddressesHandler(urllib.request.ProxyHandler):
    """The environment's proxy (``http_proxy``), except for a host ``no_proxy`` names, an
    IP address too. urllib matches ``no_proxy`` against the URL's host with its
    brackets, ``[::1]``, so ``no_proxy=::1`` (as curl and most tools take it) never
    matched ``http://[::1]:P/healthz``, and the check went through the proxy (until the
    fifty-seventh pass): the proxy's answer said healthy, or unreachable. An IPv6 entry
    of ``no_proxy`` is matched with or without brackets, as the same address (``::1``,
    ``[::1]``, ``0:0:0:0:0:0:0:1``), or as a CIDR block (``::1/128``, ``::/0``), as curl
    does; an IPv4 host as an address or a CIDR block too (``127.0.0.0/8``, ``10.0.0.0/8``),
    which urllib matches as text only (a block went through the proxy until the
    fifty-eighth pass). A host name is matched by urllib, not by what it resolves to
    (as curl does)."""

    def proxy_open(self, req: urllib.request.Request, proxy: str, type: str) -> Any:
        if _no_proxy_names_address(req.host):
            return None
        return super().proxy_open(req, proxy, type)


def _no_proxy_names_address(hostport: str) -> bool:
    """Whether ``hostport`` (``[::1]:9464``, ``10.1.2.3:9464``) is an IP address an entry
    of the environment's ``no_proxy`` names, as an address or a CIDR block of its
    version."""
    import ipaddress
    import urllib.parse

    host = urllib.parse.urlsplit(f"//{hostport}").hostname or ""
    entries = urllib.request.getproxies_environment().get("no", "")
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:  # (a name: urllib's match is right)
        return False
    for entry in entries.split(","):
        # (an entry is an address or, as curl takes since 7.86, a CIDR block: ::1/128,
        # fe80::/10, 10.0.0.0/8; an IPv6 block was never matched until the review of the
        # fifty-seventh pass, an IPv4 block until the fifty-eighth)
        named, slash, prefix = entry.strip().partition("/")
        try:
            block = ipaddress.ip_network(
                named.strip("[]").partition("%")[0] + slash + prefix, strict=False
            )
        except ValueError:
            continue
        if block.version == address.version and address in block:
            return True
    return False


class _NoSelfConnection(http.client.HTTPConnection):
    """An HTTP connection that refuses to be connected to itself.

    With nothing listening on a port P of the ephemeral range, a connection from the same
    address to P can be given P as its own port and meet itself (TCP's simultaneous
    open): it is then connected, to itself, and reads its own request back as the answer.
    That is taken for what it is: nothing listens there, as when the connection is
    refused."""

    def connect(self) -> None:
        super().connect()
        try:
            itself = self.sock.getsockname() == self.sock.getpeername()
        except OSError:  # (not connected after all: the request says how)
            return
        if itself:
            self.sock.close()
            self.sock = None
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, "the connection met itself: nothing is listening"
            )


class _NoSelfConnectionHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_NoSelfConnection, req)


class _NoRedirectHandler(urllib.request.HTTPRedirectHandler):
    """A redirect is not followed: the metrics endpoint never sends one, so another
    server answers there, and the answer of wherever it points (``200 ok`` of any web
    server) said ``healthy``, exit 0 (until the fifty-sixth pass). urllib then raises the
    3xx as an ``HTTPError``, which :func:`_probe_health` names with its ``Location``."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# --- commands of other modules ----------------------------------------------------------------

_bench_cmd.register(app)
_send_cmd.register(app)


class WholeLines(io.TextIOBase):
    """A text stream that passes ``target`` whole lines, one write each (and on
    :meth:`flush`, what it holds of a line): what a worker's app prints goes so to its
    standard error, where the log handler writes each record whole from another thread
    (see ``nexus_trio.logs``); ``print`` writes a line's text and its end apart."""

    def __init__(self, target: Any, *, lock: Callable[[], threading.Lock] | None = None) -> None:
        self.target = target
        self._held = ""
        #: (a fork makes the child a new one: see _new_locks_in_child)
        self._lock = threading.Lock()
        _ALL_WHOLE_LINES.add(self)
        #: if given, what gives the lock held while each write to ``target`` is written
        #: and flushed (the log handler's ``output_lock``: a record then never goes into
        #: one of the lines), asked at each write: a fork makes the child a new one (the
        #: one before may be held by a thread of the parent, which the child has not)
        self._output_lock = lock

    def write(self, text: str) -> int:
        with self._lock:
            held = self._held + text
            cut = held.rfind("\n") + 1
            self._held = held[cut:]
            if cut:
                self._write(held[:cut])
        return len(text)

    def _write(self, text: str) -> None:
        if self._output_lock is None:
            self.target.write(text)
            return
        with self._output_lock():
            self.target.write(text)
            self.target.flush()

    def flush(self) -> None:
        with self._lock:
            held, self._held = self._held, ""
            if held:
                self._write(held)
        self.target.flush()

    @property
    def writes_through_to(self) -> Any:
        """The stream beneath: the log handler writes its records to the file beneath it
        itself (whole, under ``output_lock``), not through the lines held here (a record
        would go after an app's unfinished line, on it)."""
        return self.target

    def isatty(self) -> bool:
        return bool(self.target.isatty())

    def fileno(self) -> int:
        return int(self.target.fileno())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self.target, "encoding", "utf-8"))


#: every WholeLines of this process (see _new_locks_in_child)
_ALL_WHOLE_LINES: weakref.WeakSet[WholeLines] = weakref.WeakSet()


def _new_locks_in_child() -> None:
    """After a fork, in the child: a new lock for each :class:`WholeLines`. Another
    thread of the parent may have held one as the child was forked (inside a write to a
    full pipe, say): the child has not that thread, and its first write waited for
    ever. (As ``nexus_trio.logs`` does for ``output_lock``.)"""
    for lines in list(_ALL_WHOLE_LINES):
        lines._lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # (not on Windows, which does not fork)
    os.register_at_fork(after_in_child=_new_locks_in_child)


class LabelledLines(WholeLines):
    """A text stream that writes ``label`` before each line it passes to ``target`` (a
    worker's usage error: see ``_commands.RunByDefaultGroup.invoke``), at once."""

    def __init__(self, target: Any, label: str) -> None:
        super().__init__(target)
        self.label = label
        self._at_start = True

    def write(self, text: str) -> int:
        if not text:
            return 0
        lines = text.split("\n")
        out = [
            ("" if i == 0 and not self._at_start else self.label) + line if line else line
            for i, line in enumerate(lines)
        ]
        self._at_start = text.endswith("\n")
        self.target.write("\n".join(out))
        return len(text)


class _WatchedStream:
    """``sys.stdout`` or ``sys.stderr`` while the command runs: the stream itself, except
    that a write or flush that raises ``OSError`` is remembered, so that :func:`main` can
    tell a failure of its own output (a full disk, a reader gone) from any other. A stream
    the command was started without (``2>&-``: Python makes it ``None``) fails its writes
    with ``EBADF``, as the closed descriptor would."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.error: OSError | None = None
        #: stand-ins for the characters of nexus's output the stream's encoding has not
        #: (an ASCII or latin-1 terminal: ``LC_ALL=C``, ``PYTHONIOENCODING=ascii``), None
        #: when it has them all
        self.stand_ins = _stand_ins(stream)

    def _target(self) -> Any:
        if self.stream is None:
            raise OSError(errno.EBADF, "it is closed")
        return self.stream

    def write(self, text: str) -> int:
        if self.stand_ins is not None:
            text = text.translate(self.stand_ins)
        try:
            return int(self._target().write(text))
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self._target().flush()
        except OSError as exc:
            self.error = exc
            raise

    def isatty(self) -> bool:
        return self.stream is not None and bool(self.stream.isatty())

    @property
    def writes_through_to(self) -> Any:
        """The stream each write goes to, unchanged (so that the log handler can write a
        record to the file beneath it whole: see ``nexus_trio.logs``)."""
        return self.stream

    def __getattr__(self, name: str) -> Any:
        if self.stream is None:
            raise AttributeError(name)
        return getattr(self.stream, name)


def _stand_ins(stream: Any) -> dict[int, str] | None:
    """The stand-ins (:func:`._encoding.stand_ins`) for the marks ``stream``'s encoding
    cannot encode, None if it can encode them all. A text stream that can be
    reconfigured is also made to escape (``backslashreplace``, as Python's own standard
    error does) any other character it cannot encode (an agent's name, an app's print)
    instead of raising ``UnicodeEncodeError`` out of the command."""
    table = stand_ins(getattr(stream, "encoding", None))
    if table is None:
        return None
    if getattr(stream, "errors", "strict") == "strict":
        with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
            stream.reconfigure(errors="backslashreplace")
    return table


def _output_failure(exc: OSError, streams: dict[str, _WatchedStream]) -> str | None:
    """The name of the standard stream whose write raised ``exc``, if one did (the same
    exception object: another error with the same errno, say from the application, is not
    taken for one and keeps its traceback)."""
    for name, stream in streams.items():
        if stream.error is exc:
            return name
    return None


def _silence(stream: Any) -> None:
    """Point a broken standard stream at /dev/null, so that the interpreter's last flush
    of it at exit cannot fail again (what Python's documentation advises for EPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _output_failed(exc: OSError, failed: str, out: _WatchedStream, err: _WatchedStream) -> NoReturn:
    """The command's own output (``failed``, the standard stream whose write raised
    ``exc``) could not be written: said on standard error (a reader gone, ``EPIPE``:
    quietly), status 1 (:func:`main`)."""
    sys.stdout, sys.stderr = out.stream, err.stream
    _silence(out.stream if failed == "standard output" else err.stream)
    if exc.errno != errno.EPIPE and failed == "standard output":
        with contextlib.suppress(OSError, AttributeError):  # stderr may be closed too
            sys.stderr.write(f"nexus: error: cannot write to {failed}: {exc.strerror or exc}\n")
            sys.stderr.flush()
    sys.exit(1)


#: whether :func:`main` runs the command: the process is ``nexus``'s own and ends with it
#: (not so for a command invoked by a test, whose process goes on)
_entry = {"process": False}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``nexus`` and ``nexus-runtime`` console scripts (each named as
    it was invoked, so that shell completion attaches to the name the user types).

    When the command's own output cannot be written (``OSError`` from standard output or
    standard error: a full disk, a reader gone), it says so on standard error, without a
    traceback, and exits with status 1; a reader gone (``EPIPE``) ends it quietly, as
    click does.
    """
    from ._cluster_cmd import keep_from_children
    from ._sdnotify import take_notify_socket

    invoked = Path(sys.argv[0]).name
    _entry["process"] = True
    out, err = _WatchedStream(sys.stdout), _WatchedStream(sys.stderr)
    sys.stdout, sys.stderr = out, err
    try:
        # (a worker's own variables, and systemd's NOTIFY_SOCKET: not for what it starts)
        with keep_from_children(), take_notify_socket():
            app(args=argv, prog_name=invoked if invoked in PROGRAM_NAMES else "nexus")
    except SystemExit as exc:
        unwritten = refusal_not_written()
        if unwritten is not None:  # (a refused run --json's object: its error said first)
            _output_failed(unwritten, "standard output", out, err)
        # (a Ctrl-C's 130 stands over a stop noted before it that no run took: the
        # scripts' entry does not end the process by that one at its exit)
        entry = sys.modules.get("_nexus_trio_main")
        if entry is not None:
            entry.exiting_with(exc.code)
        raise
    except OSError as exc:
        failed = _output_failure(exc, {"standard output": out, "standard error": err})
        if failed is None:
            raise
        _output_failed(exc, failed, out, err)
    finally:
        if isinstance(sys.stdout, WholeLines):  # (a worker's, its run not started: a
            with contextlib.suppress(OSError, ValueError):  # usage error) what it holds
                sys.stdout.flush()
        sys.stdout, sys.stderr = out.stream, err.stream
