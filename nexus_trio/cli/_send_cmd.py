"""``nexus send``: try an external agent from the shell — start it, send one message, print the answer.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import ast
import enum
import json
import logging
import math
import shlex
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Final

import typer

from .._config import LOG_LEVELS
from .._logcall import log_guarded
from ._commands import Command, file_path, finite_at_least, one_of, shown
from ._encoding import encodes
from ._warnings import log_config_warnings

_EPILOG = """\
[bold]Examples[/]

  nexus send "python3 examples/python_agent_example.py" '{"operation": "add", "a": 40, "b": 2}'

  nexus send "node examples/javascript_agent_example.js" \\
      '{"operation": "stats", "data": [1, 2, 3, 4]}' --kind Command

The agent is started under a kernel, gets one message, and is shut down (shutdown frame, \
grace, SIGTERM, SIGKILL). The answer's payload is printed as JSON on stdout; logs and the \
agent's stderr go to stderr. Exit status: 0 answered, 1 the agent failed (did not start, \
crashed, sent an error frame, timed out), 2 bad arguments, 3 the answer holds NaN or \
Infinity, which JSON has not: nothing is printed on stdout, stderr says where they are \
and shows the answer. Ctrl-C, SIGTERM and SIGHUP stop the agent gracefully, then exit \
130, 143 or 129.
"""


log = logging.getLogger("nexus_trio.cli")

#: the exit status of an answer strict JSON cannot hold (NaN, Infinity)
NOT_STRICT_JSON: Final = 3


class SendKind(enum.StrEnum):
    Query = "Query"
    Command = "Command"
    Event = "Event"


class _Failed(Exception):
    """The exchange failed; the text is for the user."""


#: seconds the handler of nexus send's message is given beyond --timeout (its handle
#: timeout), so that the wait for the answer ends first, in its own words
SEND_HANDLE_MARGIN = 1.0


def _no_answer(timeout: float) -> _Failed:
    """No answer came within ``timeout`` seconds (a request's, or a tell's wait)."""
    return _Failed(f"no answer within {timeout:g}s (--timeout gives it longer)")


def _log_level(text: str) -> str:
    """The ``parser=`` of ``--log-level``: one of the levels (in any case), said as ``nexus
    run -l`` says it; the config's check said ``override logging.level: [logging] level
    must be one of ...``, naming an override the user never wrote."""
    if text.lower() not in LOG_LEVELS:
        raise typer.BadParameter(
            f"must be one of {', '.join(LOG_LEVELS)}, got {shown(text, quoted=True)}"
        )
    return text


def register(app: typer.Typer) -> None:
    """Add the ``send`` command to ``app``."""

    @app.command(cls=Command, epilog=_EPILOG)
    def send(
        cmd: Annotated[str, typer.Argument(metavar="CMD", help="The agent's command line.")],
        payload: Annotated[
            str,
            typer.Argument(
                metavar="JSON",
                help="The message payload (a JSON value; - reads it from standard input).",
            ),
        ],
        name: Annotated[
            str | None, typer.Option("--name", help="Agent name (also NEXUS_AGENT_NAME).")
        ] = None,
        kind: Annotated[
            SendKind,
            typer.Option(
                "--kind",
                "-k",
                help="Query waits for the reply; Command/Event wait for the answer the "
                "agent routes back.",
                parser=one_of(SendKind),
            ),
        ] = SendKind.Query,
        timeout: Annotated[
            float,
            typer.Option(
                "--timeout",
                "-t",
                min=0.001,
                parser=finite_at_least(0.001),
                help="Seconds to wait for the answer.",
            ),
        ] = 10.0,
        register_timeout: Annotated[
            float,
            typer.Option(
                "--register-timeout",
                min=0.001,
                parser=finite_at_least(0.001),
                help="Seconds the agent has to register.",
            ),
        ] = 10.0,
        config: Annotated[
            Path | None,
            typer.Option(
                "--config", "-c", help="Config file (TOML).", parser=file_path, metavar="<file>"
            ),
        ] = None,
        log_level: Annotated[
            str,
            typer.Option(
                "--log-level",
                "-l",
                metavar=f"<{'|'.join(LOG_LEVELS)}>",
                parser=_log_level,
                help="Log level on stderr.",
            ),
        ] = "warning",
        compact: Annotated[
            bool, typer.Option("--compact", help="Print the answer on one line.")
        ] = False,
    ) -> None:
        """Start an external agent, send it one message, print its answer as JSON."""
        from ..bridges.process import process_agent, shell_syntax_problem
        from ..config import ConfigError, load_config
        from ..logs import configure_logging, flush_logs

        try:
            value = _read_payload(_from_stdin() if payload == "-" else payload)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'JSON'") from None
        try:
            argv = shlex.split(cmd)
        except ValueError as exc:
            from ..bridges.process import unsplit_comment_problem

            why = unsplit_comment_problem(cmd) or f"{exc} in {cmd!r}"
            raise typer.BadParameter(why, param_hint="'CMD'") from None
        if not argv:
            raise typer.BadParameter(
                f"empty command {cmd!r}: give the program to start, e.g. 'python3 agent.py'",
                param_hint="'CMD'",
            )
        if (problem := shell_syntax_problem(cmd, argv)) is not None:
            raise typer.BadParameter(problem, param_hint="'CMD'")
        from ._spawn import missing_script

        if shutil.which(argv[0]) is not None and (missing := missing_script(cmd, argv)):
            raise typer.BadParameter(missing, param_hint="'CMD'")
        try:
            loaded = load_config(config, overrides={"logging.level": log_level}, log_warnings=False)
        except ConfigError as exc:
            # (a file's problem is --config's; one of a variable names the variable, not
            # the flag of the key: NEXUS_LOGGING__LEVEL=xx was "Invalid value for
            # '--log-level'", a flag not given)
            flag = "'--config' / '-c'" if exc.path is not None else None
            raise typer.BadParameter(str(exc), param_hint=flag) from None
        from ._spawn import OneLineBridgeErrors, stop_grace

        try:
            # The agent's stop waits as long as the kernel's grace (at most the bridge's
            # own), as under nexus run --spawn.
            spec = process_agent(
                argv,
                name=name,
                restart="temporary",
                register_timeout=register_timeout,
                # --timeout is how long the answer is waited for: the kernel's handle
                # timeout ([kernel] handle_timeout_ms, 30 s) must not cut the handler
                # short first. A second more, so the wait ends first and says so.
                handle_timeout=timeout + SEND_HANDLE_MARGIN,
                shutdown_grace=stop_grace(loaded.config.kernel.shutdown_grace),
            )
        except (TypeError, ValueError) as exc:
            hint = "'--name'" if "name" in str(exc) else "'CMD'"
            raise typer.BadParameter(str(exc), param_hint=hint) from None
        configure_logging(loaded.config.logging)
        log_config_warnings(loaded)

        import trio

        # A child that did not start or exited is said in one line, as by nexus run
        # --spawn: the traceback would show only the kernel's and the bridge's internals.
        agent_log = logging.getLogger("nexus_trio.agent")
        one_line = OneLineBridgeErrors()
        agent_log.addFilter(one_line)
        try:
            try:
                answer = trio.run(_exchange, loaded.config, spec, value, kind, timeout)
            finally:
                # The records still queued for standard error (the log's writer thread,
                # behind under load) are written before the line that ends the command,
                # which is its last: they came after it now and then, as nexus run
                # flushes them before its summary.
                flush_logs()
        except _Failed as exc:
            typer.echo(f"nexus send: {exc}", err=True)
            raise typer.Exit(1) from None
        except _Stopped as exc:
            typer.echo(f"nexus send: stopped by {exc}: no answer; the agent was stopped", err=True)
            raise typer.Exit(128 + exc.signum) from None
        except KeyboardInterrupt:
            # Ctrl-C: the kernel's (its shutdown stopped the agent, the message it held
            # given up within the grace); said as a SIGTERM's end is, where typer wrote
            # an empty line and nothing of the message
            typer.echo(
                "nexus send: stopped by SIGINT (Ctrl-C): no answer; the agent was stopped",
                err=True,
            )
            raise typer.Exit(128 + signal.SIGINT) from None
        finally:
            agent_log.removeFilter(one_line)
        indent = None if compact else 2
        try:
            text = json.dumps(answer, ensure_ascii=False, indent=indent, allow_nan=False)
        except ValueError:
            # NaN and Infinity are not JSON: printed, they would break the script reading
            # stdout. No stand-in (null) either: that would be an answer the agent never
            # gave. Say where they are, and show the answer to the person instead.
            shown = json.dumps(answer, ensure_ascii=False, indent=indent)
            typer.echo(
                "nexus send: the answer is not strict JSON (JSON has no NaN or Infinity): "
                f"{_places(answer, _non_finite)}; the answer as the agent sent it:\n{shown}",
                err=True,
            )
            raise typer.Exit(NOT_STRICT_JSON) from None
        if not encodes(text, getattr(sys.stdout, "encoding", None)):
            # (an ASCII output, LC_ALL=C: JSON's own escapes, \u00e9, keep it JSON)
            text = json.dumps(answer, ensure_ascii=True, indent=indent, allow_nan=False)
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


class _Unwritable:
    """A number of the payload that JSON has not, as the user wrote it: ``NaN``,
    ``Infinity`` or ``-Infinity``, or one too large for a float (``1e999``)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _quote_hint(payload: str) -> str:
    """For a bare word (``hello``, the shell having taken the quotes ``"hello"`` had):
    how to write it as the JSON string it was surely meant to be; for a Python literal
    (``{'a': 1, 'ok': True}``, what ``print(a_dict)`` shows): the same value as JSON,
    saying what JSON writes otherwise (an int key as a string, a tuple as a list: the
    agent would get that) or what it has no form for (a set, bytes)."""
    text = payload.strip()
    if text[:1] in ("{", "[") and len(text) <= _LITERAL_LIMIT:
        try:
            # (a literal only: no name is looked up, no code is run)
            value = ast.literal_eval(text)
        except Exception:  # (not a literal)
            return ""
        syntax = "that is Python's syntax"
        if unwritable := _places(value, _no_json_form, keys=_no_json_key):
            return f" ({syntax}, and JSON has no form for {unwritable})"
        try:
            as_json = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError):  # (too deep: no hint)
            return ""
        if "'" in as_json:  # (not shown inside single quotes then)
            return ""
        changed = _places(value, _tuple, keys=_key_not_string)
        twice: list[str] = []  # ({1: 'a', '1': 'b'}: both keys "1" in JSON)

        def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
            keys = [key for key, _ in items]
            twice.extend(key for i, key in enumerate(keys) if key in keys[:i])
            return dict(items)

        json.loads(as_json, object_pairs_hook=pairs)
        if twice:
            changed += (
                f"; the key {json.dumps(twice[0])} twice in one object, of which the agent"
                " gets the last value"
            )
        return (
            f" ({syntax}: JSON writes strings in double quotes, and true, false and null;"
            f" as JSON: '{as_json}'"
            + (
                f", not the same value: JSON's keys are strings and it has no tuples"
                f" ({changed}), and JSON is what the agent is sent)"
                if changed
                else ")"
            )
        )
    if (
        not text
        or text[0] in '{["-0123456789'
        or text in ("true", "false", "null")
        or "'" in text  # (not shown inside single quotes then)
    ):
        return ""
    # (a long one is no word the shell took quotes from: written whole, 20 MB of
    # standard input made an error of 20 MB, which took minutes to draw, until the
    # fifty-seventh pass)
    quoted = json.dumps(text) if len(text) <= _WORD_LIMIT else '"..."'
    return f" (a JSON string keeps its double quotes, inside the shell's: '{quoted}')"


#: the longest bare word written whole, quoted, in the hint (a longer one is '"..."')
_WORD_LIMIT: Final = 200


#: the deepest payload nexus send takes, in levels of arrays and objects (the kernel's
#: writer, deep in its tasks, fails past about 320)
_DEPTH_LIMIT: Final = 256


def _depth(value: Any) -> int:
    """How many levels of arrays and objects ``value`` nests (``[[1]]``: 2), without
    recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


#: the longest payload read as a Python literal for the hint (a larger one is not)
_LITERAL_LIMIT: Final = 10_000


def _no_json_form(item: Any) -> str | None:
    """What ``item``, a value or a key of a Python literal, is if JSON has no form for
    it: a set, bytes, a complex number, Ellipsis, a float JSON has no number for
    (``1e999`` reads as infinity); a tuple as a key (as a value it is a list)."""
    if isinstance(item, set | frozenset):
        return "a set"
    if isinstance(item, bytes):
        return "bytes"
    if isinstance(item, complex):
        return "a complex number"
    if item is Ellipsis:
        return "Ellipsis"
    if isinstance(item, float) and not math.isfinite(item):
        return _name(item)
    return None


def _no_json_key(key: Any) -> str | None:
    """What ``key`` of a Python literal is if JSON has no key for it."""
    return "a tuple" if isinstance(key, tuple) else _no_json_form(key)


def _tuple(item: Any) -> str | None:
    """``a tuple`` for a tuple of a Python literal (JSON writes it as a list)."""
    return "a tuple" if isinstance(item, tuple) else None


def _key_not_string(key: Any) -> str | None:
    """What ``key`` of a Python literal is if it is not a string (JSON writes it as one:
    ``1`` as ``"1"``, ``True`` as ``"true"``)."""
    if isinstance(key, str):
        return None
    if key is None:
        return "None"
    return "an int" if type(key) is int else f"a {type(key).__name__}"


def _json_key(key: Any) -> str:
    """``key`` as JSON writes a key: itself if a string; ``true``, ``false``, ``null``,
    a number's digits; any other (no JSON key) as Python writes it."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool | int | float) or key is None:
        return json.dumps(key)  # (an int's digits, a float's repr, true, null)
    return repr(key)


def _from_stdin() -> str:
    """The payload ``-`` stands for: standard input, whole (a payload larger than an
    argument may be, 128 KiB on Linux, or one a program writes), as UTF-8 text."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        raise ValueError("- reads the payload from standard input, and there is none")
    data = stream.read()
    try:
        return str(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"standard input (-) is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def _read_payload(payload: str) -> Any:
    """The payload argument, read as strict JSON: Python's reader also takes NaN and
    Infinity, and reads ``1e999`` as infinity, none of which the message can carry to
    the agent (the bridge writes strict JSON); ValueError says where they are."""

    def number(text: str) -> float | _Unwritable:
        value = float(text)
        return value if math.isfinite(value) else _Unwritable(f"{text} (read as {_name(value)})")

    try:
        value = json.loads(payload, parse_constant=_Unwritable, parse_float=number)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}{_quote_hint(payload)}") from None
    except RecursionError:
        # (``[[[...``, 1,000 levels or more: the traceback of json's reader went out,
        # exit 1, until the fifty-seventh pass)
        from ..bridges.python import too_deep

        raise ValueError(f"not JSON a message can carry: {too_deep(payload)}") from None
    if (depth := _depth(value)) > _DEPTH_LIMIT:
        # (the kernel writes the message to the agent deep inside its tasks, where
        # about 320 levels fit: 400 to 999 levels started the agent, then failed,
        # "unserialisable", exit 1, until the review of the fifty-seventh pass)
        raise ValueError(
            f"not JSON a message can carry: nested {depth:,} levels deep, past the"
            f" {_DEPTH_LIMIT} levels nexus send takes"
        )
    places = _places(value, lambda item: item.text if isinstance(item, _Unwritable) else None)
    if places:
        raise ValueError(f"JSON has no NaN or Infinity: {places}")
    # (an escape of half a surrogate pair, or a byte of the argument that is not UTF-8:
    # no bridge could be sent it, and the agent would be started for nothing)
    places = _places(value, _lone_surrogate)
    if places:
        raise ValueError(
            f"JSON text must be Unicode: {places} (half of a surrogate pair, or a byte that"
            " is not UTF-8)"
        )
    return value


def _lone_surrogate(item: Any) -> str | None:
    """``a lone surrogate`` if ``item`` is a string that no UTF-8 encoder writes."""
    if isinstance(item, str) and not encodes(item, "utf-8"):
        return "a lone surrogate"
    return None


def _non_finite(value: Any) -> str | None:
    """``value``'s name if it is a float JSON has no word for (NaN, an infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return _name(value)
    return None


def _name(value: float) -> str:
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _places(
    document: Any,
    shown: Callable[[Any], str | None],
    limit: int = 5,
    keys: Callable[[Any], str | None] | None = None,
) -> str:
    """Where ``document`` holds the values ``shown`` names, as jq paths (``NaN at
    .result[1]``): the first ``limit`` of them in document order, then how many more
    there are. The keys are looked at by ``keys`` (``shown`` if None)."""
    key_shown = shown if keys is None else keys
    places: list[str] = []
    more = 0

    def found(place: str) -> None:
        nonlocal more
        if len(places) < limit:
            places.append(place)
        else:
            more += 1

    # A stack, not recursion: an answer may nest as deep as the bridge's reader allows.
    stack: list[tuple[str, Any]] = [("", document)]
    while stack:
        path, value = stack.pop()
        if (name := shown(value)) is not None:
            found(f"{name} at {path or '.'}")
        # (and what it holds: a tuple named holds more)
        if isinstance(value, dict):
            for key in value:
                if (name := key_shown(key)) is not None:
                    found(f"{name} in the key {_key_path(path, key)}")
            stack.extend((_key_path(path, key), item) for key, item in reversed(value.items()))
        elif isinstance(value, list | tuple):
            stack.extend(
                (f"{path or '.'}[{i}]", item) for i, item in reversed(list(enumerate(value)))
            )
    return ", ".join(places) + (f" and {more:,} more" if more else "")


def _key_path(path: str, key: Any) -> str:
    """``path.name`` for a key jq can write bare, else ``path["a b"]`` (``.["a b"]`` at the top)."""
    text = _json_key(key)
    if text.isidentifier() and text.isascii():
        return f"{path}.{text}"
    # (escaped where the text cannot be written as it is: a lone surrogate)
    return f"{path or '.'}[{json.dumps(text, ensure_ascii=not encodes(text, 'utf-8'))}]"


class _Stopped(Exception):
    """A signal (SIGTERM, SIGHUP) stopped the exchange; the agent was stopped gracefully."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


async def _exchange(config: Any, spec: Any, value: Any, kind: SendKind, timeout: float) -> Any:
    """:func:`_talk` under a kernel; a SIGTERM or SIGHUP (``timeout 5 nexus send``, a
    service manager, a closed terminal) ends the wait and stops the agent as leaving the
    kernel does (shutdown frame, grace, SIGTERM, SIGKILL), as Ctrl-C does: by their
    default action they ended this process at once, the agent killed without its
    shutdown frame. Raises :class:`_Stopped` then."""
    import trio

    from .. import open_kernel

    stopped: list[int] = []
    # (opened before the kernel: a signal from now on is this exchange's; one that comes
    # while the kernel stops the agent is taken and changes nothing, the stop is bounded.
    # Taken, not left in the receiver: Trio raises what is left there again as the
    # receiver closes, with the default action back, which ended the process then.)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async with open_kernel(config) as kernel:
            with trio.CancelScope() as scope:

                async def watch() -> None:
                    async for signum in signals:
                        if stopped:
                            continue  # (the stop is under way)
                        stopped.append(signum)
                        log_guarded(
                            log,
                            logging.WARNING,
                            "%s: stopping the agent gracefully",
                            signal.Signals(signum).name,
                        )
                        scope.cancel()

                # A system task: the exchange stays in the main task, where a Ctrl-C's
                # KeyboardInterrupt reaches it (and the kernel) as it did, not in a group.
                trio.lowlevel.spawn_system_task(watch)
                return await _talk(kernel, spec, value, kind, timeout)
    assert stopped  # (only the signal cancels the scope)
    raise _Stopped(stopped[0])


async def _talk(kernel: Any, spec: Any, value: Any, kind: SendKind, timeout: float) -> Any:
    """Start the agent of ``spec`` under ``kernel``, send it ``value``, return its answer."""
    import trio

    from .. import (
        EventKind,
        Message,
        MessageKind,
        NexusError,
        RequestFailed,
        RequestTimeout,
        agent,
    )

    async with kernel.events() as events:
        ref = kernel.spawn(spec)
        async for event in events:
            if event.agent_id != ref.id:
                continue
            if event.kind is EventKind.STARTED:
                break
            if event.kind in (EventKind.FAILED, EventKind.STOPPED):
                problem = f"the agent did not start: {event.error or event.reason}"
                if "did not register within" in problem:
                    problem += " (--register-timeout gives it longer)"
                raise _Failed(problem)
    if kind is SendKind.Query:
        try:
            return await kernel.request(ref, value, timeout=timeout)
        except RequestTimeout:
            raise _no_answer(timeout) from None
        except RequestFailed as exc:
            detail = exc.error if exc.error is not None else exc.reason
            raise _Failed(f"the message failed ({exc.reason}): {detail}") from None
        except NexusError as exc:
            raise _Failed(str(exc)) from None

    # Command/Event: the agent answers the sender, so send from a local agent.
    from ..bridges import bridge_stats

    def tells_unanswered() -> bool:
        """The agent is a process agent of protocol 1 (a tell gets no null answer)."""
        stats = bridge_stats(kernel).get(ref.id)
        return stats is not None and stats.protocol == 1

    answers: list[Message] = []
    arrived = trio.Event()

    @agent
    async def inbox(ctx: Any, msg: Message) -> None:
        answers.append(msg)
        arrived.set()

    sink = kernel.spawn(inbox)
    message = Message(sender=sink.id, to=ref.id, payload=value, kind=MessageKind(kind.value))
    async with kernel.dead_letters() as letters:
        await kernel.send(message)
        failure: list[Any] = []

        async def watch_dead_letters() -> None:
            async for letter in letters:
                if letter.message.id == message.id:
                    failure.append(letter)
                    arrived.set()
                    return

        async def watch_handled() -> None:
            # A null answer to a tell routes nothing: handled without a reply is null.
            # (Not so in protocol 1: a tell is handled once written, and an original
            # bridge writes its answer, if any, when its handler returns: the answer, or
            # the timeout, is waited for; a null printed then was no answer it gave.)
            if tells_unanswered():
                return
            while True:
                stats = {a.id: a for a in kernel.stats(agents=True).agents}
                mine = stats.get(ref.id)
                if mine is not None and mine.handled >= 1:
                    await trio.sleep(0.2)
                    arrived.set()
                    return
                await trio.sleep(0.01)

        with trio.move_on_after(timeout) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_dead_letters)
                nursery.start_soon(watch_handled)
                await arrived.wait()
                nursery.cancel_scope.cancel()
    if failure:
        letter = failure[0]
        detail = letter.error if letter.error is not None else letter.detail
        raise _Failed(f"the message failed ({letter.reason.value}): {detail}")
    if answers:
        return answers[0].payload
    if scope.cancelled_caught:
        if tells_unanswered():
            raise _Failed(
                f"no answer within {timeout:g}s: the agent speaks protocol 1 (the original"
                " bridges'), which writes nothing for a tell its handler answers with"
                " nothing, so a slow answer cannot be told from none (--timeout gives it"
                " longer; --kind Query waits for the reply)"
            )
        raise _no_answer(timeout)
    return None
