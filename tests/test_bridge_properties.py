"""Hypothesis: a hostile child process under a process agent.

The child (``CHILD``, written to ``tmp_path`` and run with ``sys.executable``) replays a
script of actions drawn for each of its starts: valid answers, answers to unknown or
duplicate ids, tells and requests of its own, malformed JSON, non-object JSON, frames of
the wrong kind, oversized lines, a last line without its newline, binary garbage, invalid
UTF-8, lone surrogates, huge numbers, NaN, stderr floods, exits (0 and not 0), hangs, a
closed stdout. Meanwhile the kernel side tells and asks it things, and stops the agent or
shuts the kernel down at a random point. These run in real time (a child process cannot
use a mock clock), with small deadlines, under :func:`tests.hang_guard.real_time_limit`.

For every example: the shutdown ends within its bound, no task is left, every accepted
message is accounted for, every request ends with its own answer or a clear error, every
unusable line the child wrote is counted (and the first one logged with a preview of it),
and every child process is reaped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexus_trio import (
    AgentNotFound,
    AgentRef,
    Config,
    Context,
    DeadLetter,
    DeadLetterReason,
    Kernel,
    KernelConfig,
    KernelShuttingDown,
    MailboxFull,
    Message,
    MessageKind,
    RequestFailed,
    RequestTimeout,
    SupervisionConfig,
    agent,
    open_kernel,
)
from nexus_trio.bridges import process_agent
from nexus_trio.bridges.process import BridgeStats, ProcessAgent
from nexus_trio.testing import assert_conserved

from .hang_guard import fault_settings, real_time_limit, tasks_living

CHILD = '''\
"""A bridge agent that replays a script of actions, hostile ones included.

Stdlib only, for tests/test_bridge_properties.py. ``argv[1]`` is a JSON file::

    {"protocol": 1 | 2, "features": [...], "lives": [[action, ...], ...],
     "journal": path, "counter": path, "sink": name}

Each start of the child takes the next life (the counter file counts the starts); past
the last one it is a well-behaved agent. After registering it plays its life's actions
in order, then answers every message. Every stdout line is journaled (one JSON object a
line, appended to ``journal``) before its write (``"attempt"``) and after it
(``"line"``): a child killed in between wrote the line, or part of it, or nothing. The
start (``pid``), each action begun and ended, a wait for a message, the stderr lines
written, the end of the actions (``"done"``) and a child that will never write again
(``"stuck"``) are journaled too.

Actions (JSON objects, ``"do"`` says which):

  answer (odd, bad)   read the next message and answer it; ``odd`` is raw JSON text put in
                      the answer (NaN, 1e999, a lone surrogate escaped, a huge integer ...);
                      ``bad``: the kernel cannot use the line (a 5000-digit integer)
  answer_twice        answer the next message twice
  error               fail the next message (error frame; protocol 1: error payload)
  ignore              read the next message and never answer it
  reply_unknown       an answer to a message never written
  pong_unknown        a pong to no ping
  tell / request      a send frame (Command / Query) to the sink
  tell_unknown        a send frame to an agent that does not exist
  bad (hex)           one stdout line of these bytes (malformed, garbage, wrong frame ...)
  stderr (n)          n lines on stderr
  exit (code, tail)   write ``tail`` (hex) without a newline, then exit with ``code``
  hang (ignore_term)  stop reading and writing forever (ignoring SIGTERM if asked)
  close_stdin         close stdin (the kernel cannot write to it), go on
  close_stdout        close stdout and stay alive, reading nothing
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import uuid
from typing import Any

with open(sys.argv[1]) as f:
    SPEC = json.load(f)
PROTOCOL: int = SPEC["protocol"]
JOURNAL = os.open(SPEC["journal"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
_counter = os.open(SPEC["counter"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
os.write(_counter, b"x")
LIFE = os.fstat(_counter).st_size - 1
ACTIONS: list[dict[str, Any]] = SPEC["lives"][LIFE] if LIFE < len(SPEC["lives"]) else []
stdin = sys.stdin.buffer


def note(**entry: Any) -> None:
    os.write(JOURNAL, (json.dumps({"life": LIFE, **entry}) + "\\n").encode())


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def emit(data: bytes, *, bad: bool = False) -> None:
    """Write one stdout line (``data`` ends with a newline, or is a tail before exit)."""
    line = data.removesuffix(b"\\n")
    entry = {"bad": bad, "size": len(line), "head": line[:200].hex()}
    note(event="attempt", **entry)
    try:
        write_all(1, data)
    except OSError:
        os._exit(0)  # the kernel closed the pipe: it is done with this child
    note(event="line", **entry)


def frame(kind: str, payload: Any, odd: str | None = None) -> bytes:
    text = json.dumps({"type": kind, "payload": payload}, separators=(",", ":"))
    if odd is not None:
        text = text.replace('"@ODD@"', odd)
    return text.encode() + b"\\n"


def next_message() -> dict[str, Any]:
    """The next ``message`` frame; pings are answered, a shutdown or EOF ends the child."""
    note(event="wait")
    while True:
        try:
            line = stdin.readline()
        except (OSError, ValueError):  # (closed by close_stdin)
            line = b""
        if not line:
            os._exit(0)
        try:
            got = json.loads(line)
        except ValueError:
            continue
        kind = got.get("type")
        if kind == "message":
            return dict(got["payload"])
        if kind == "shutdown":
            os._exit(0)
        if kind == "ping" and PROTOCOL >= 2:
            emit(frame("pong", got["payload"]))


def answer(msg: dict[str, Any], value: Any, odd: str | None = None, *, bad: bool = False) -> None:
    body = {
        "from": msg["to"],
        "to": msg["from"],
        "kind": "Response",
        "payload": value,
        "timestamp": "2026-01-01T00:00:00Z",
    }
    if PROTOCOL >= 2:
        body["id"] = str(uuid.uuid4())
        body["reply_to"] = msg["id"]
    body["conversation_id"] = msg.get("conversation_id") or msg["id"]
    if msg.get("trace_id") is not None:
        body["trace_id"] = msg["trace_id"]
    emit(frame("response", body, odd), bad=bad)


def echo(msg: dict[str, Any], odd: str | None = None) -> dict[str, Any]:
    value = {"echo": msg.get("payload"), "life": LIFE}
    if odd is not None:
        value["odd"] = "@ODD@"
    return value


def send(to: str, kind: str) -> None:
    payload = {"to": to, "kind": kind, "payload": {"from_child": LIFE}}
    emit(frame("send", payload))


def play(action: dict[str, Any]) -> None:
    do = action["do"]
    note(event="play", do=do)
    if do == "answer":
        msg = next_message()
        answer(msg, echo(msg, action["odd"]), action["odd"], bad=action["bad"])
    elif do == "answer_twice":
        msg = next_message()
        answer(msg, echo(msg))
        answer(msg, echo(msg))
    elif do == "error":
        msg = next_message()
        if PROTOCOL >= 2:
            failure = {"reply_to": msg["id"], "error": "scripted", "error_type": "ValueError"}
            emit(frame("error", failure))
        else:
            answer(msg, {"error": "scripted", "error_type": "ValueError", **echo(msg)})
    elif do == "ignore":
        next_message()
    elif do == "reply_unknown":
        ghost = str(uuid.uuid4())
        answer({"to": "me", "from": str(uuid.uuid4()), "id": ghost}, {"ghost": True})
    elif do == "pong_unknown":
        emit(frame("pong", {"id": "nobody-asked"}))
    elif do == "tell":
        send(SPEC["sink"], "Command")
    elif do == "request":
        send(SPEC["sink"], "Query")
    elif do == "tell_unknown":
        send("no-such-agent", "Event")
    elif do == "bad":
        emit(bytes.fromhex(action["hex"]) + b"\\n", bad=True)
    elif do == "stderr":
        count = action["n"]
        note(event="stderr attempt", n=count)
        write_all(2, b"".join(b"stderr line %d\\n" % i for i in range(count)))
        note(event="stderr", n=count)
    elif do == "exit":
        tail = bytes.fromhex(action["tail"])
        if tail:
            emit(tail, bad=action["bad"])
        os._exit(action["code"])
    elif do == "hang":
        note(event="stuck")
        if action["ignore_term"]:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(60)
    elif do == "close_stdin":
        try:
            os.close(0)
        except OSError:
            pass  # (closed already)
    elif do == "close_stdout":
        os.close(1)
        note(event="stuck")
        while True:
            time.sleep(60)
    else:
        raise ValueError(f"unknown action {do!r}")


def main() -> None:
    note(event="start", pid=os.getpid())
    register: dict[str, Any] = {"id": os.environ["NEXUS_AGENT_ID"], "name": "scripted"}
    if PROTOCOL >= 2:
        register["protocol"] = PROTOCOL
        register["features"] = SPEC["features"]
    emit(frame("register", register))
    for action in ACTIONS:
        play(action)
        note(event="played", do=action["do"])
    note(event="done")
    while True:
        msg = next_message()
        answer(msg, echo(msg))


main()
'''

#: stdout lines longer than this are discarded by the kernel (the smallest limit allowed
#: is 64; this one leaves room for the frames the child writes)
LINE_LIMIT = 4096
#: a shutdown that takes longer than this hangs (the process agent's own bound is 2.9 s)
SHUTDOWN_BOUND = 10.0
#: the log record of a child's start (its last argument is the pid)
STARTED = "process agent %s started %s (pid %d)"
#: how a send frame of the child starts (hex, as journaled)
SEND_HEAD = b'{"type":"send"'.hex()
#: how long the child is given to play its script once the kernel side is done
PLAY_LIMIT = 2.0
#: real time for one example, whatever happens
EXAMPLE_LIMIT = 30.0
#: what a request that got no answer may fail with (its query's dead-letter reason)
QUERY_REASONS = {
    "handler_timeout",
    "handler_error",
    "malformed",
    "request_timeout",
    "agent_stopped",
    "shutdown",
    "unserialisable",
}

#: raw JSON put into an answer, and whether the kernel can read the line then
ODD_VALUES = [
    # NaN is not JSON (RFC 8259; serde_json and JSON.parse refuse it): an invalid line
    # since the fifty-second pass, no longer an answer holding a float NaN
    ("NaN", True),
    # nor is a number too large for a double JSON to the kernel (serde_json: "number out
    # of range"): an invalid line since the fifty-second pass, no longer an answer of inf
    ("1e999", True),
    ("-1e999", True),
    ("1e-999", False),  # (it underflows to 0: finite)
    # a lone surrogate is not Unicode text: the bridge refuses the line (as from_json does)
    ('"\\ud800"', True),
    ('"\\udfff tail"', True),
    ("123456789012345678901234567890123456789", False),
    ("1" * 5000, True),  # past Python's int digits limit: not JSON to the kernel
]
#: stdout lines no frame can be made of
BAD_LINES = [
    b"{not json",
    b"[1, 2, 3]",
    b"42",
    b'"just a string"',
    b"null",
    b'{"payload": {}}',
    b'{"type": 7, "payload": {}}',
    b'{"type": "response"}',
    b'{"type": "response", "payload": "not an object"}',
    b'{"type": "error", "payload": [1]}',
    b'{"type": "send", "payload": {"kind": "Command"}}',
    b'{"type": "send", "payload": {"to": "sink", "kind": "Shout"}}',
    b'{"type": "register", "payload": {"id": "again", "name": "again"}}',
    b'{"type": "message", "payload": {}}',
    b'{"type": "ping", "payload": {"id": "p"}}',
    b'{"type": "\\ud800", "payload": {}}',
    b'{"type": "response", "payload": {"reply_to": "not-a-uuid", "payload": 1}}',
    b'{"type": "response", "payload": {"reply_to": 12345678901234567890, "payload": 1}}',
    b'{"type": "\xff\xfe", "payload": {}}',
    b"\xc3\x28\xa0\xa1 invalid utf-8",
    b"[" * 2000 + b"]" * 2000,  # nested deeper than the parser goes
]

garbage = st.binary(min_size=1, max_size=300).map(
    # a byte that is never UTF-8 first (the rest is anything but a newline)
    lambda data: b"\xc0" + data.replace(b"\n", b"?")
)
bad_line = st.one_of(st.sampled_from(BAD_LINES), garbage)


def _action(do: str, **fields: Any) -> dict[str, Any]:
    return {"do": do, **fields}


SIMPLE_ACTIONS = [
    _action("answer_twice"),
    _action("error"),
    _action("ignore"),
    _action("reply_unknown"),
    _action("pong_unknown"),
    _action("tell"),
    _action("request"),
    _action("tell_unknown"),
    _action("close_stdin"),
]
#: what ends the child's script: an exit (after a last line without its newline, maybe),
#: a hang (deaf to SIGTERM, maybe), a closed stdout
last_actions = st.one_of(
    st.tuples(
        st.sampled_from([0, 0, 1, 3]),
        st.sampled_from([b"", b'{"type": "respo', b"\xc0\xc1", b'{"type":"pong","payload":{}}']),
    ).map(
        # A tail that is no frame is a line the child did not finish: said with its exit,
        # not counted as an unusable line (a whole frame without its newline is taken).
        lambda exit: _action("exit", code=exit[0], tail=exit[1].hex(), bad=False)
    ),
    st.booleans().map(lambda ignore: _action("hang", ignore_term=ignore)),
    st.just(_action("close_stdout")),
)
child_actions = st.one_of(
    st.sampled_from(ODD_VALUES).map(lambda odd: _action("answer", odd=odd[0], bad=odd[1])),
    st.just(_action("answer", odd=None, bad=False)),
    st.sampled_from(SIMPLE_ACTIONS),
    st.sampled_from(SIMPLE_ACTIONS),
    bad_line.map(lambda line: _action("bad", hex=line.hex())),
    st.integers(LINE_LIMIT + 1, 4 * LINE_LIMIT).map(
        lambda size: _action("bad", hex=(b"x" * size).hex())
    ),
    st.integers(1, 3000).map(lambda n: _action("stderr", n=n)),
)
#: each start of the child plays one life: actions, and maybe a last one
life = st.tuples(st.lists(child_actions, max_size=12), st.none() | last_actions).map(
    lambda life: life[0] + ([life[1]] if life[1] is not None else [])
)
lives = st.lists(life, min_size=1, max_size=3)
#: what the kernel side does, in order: tells and requests (a NaN payload cannot be
#: written to the child), pauses
kernel_ops = st.lists(
    st.one_of(
        st.tuples(st.just("tell"), st.sampled_from([False, False, False, True])),
        st.tuples(
            st.just("request"),
            st.sampled_from([False, False, False, True]),
            st.sampled_from([0.3, 1.0]),
        ),
        st.tuples(st.just("sleep"), st.sampled_from([0.01, 0.05, 0.2])),
    ),
    min_size=5,
    max_size=25,
)
#: the agent stopped, or the kernel shut down, before the op at that index (None: the
#: ops all run, the child is given until its script is played, then the kernel shuts down)
interrupts = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(["stop", "shutdown"]), st.integers(0, 25)),
)


@attrs.define
class Run:
    """What one scenario did and what came of it."""

    outcomes: dict[int, list[tuple[Any, ...]]] = attrs.Factory(dict)
    asked: dict[int, Any] = attrs.Factory(dict)
    agents: list[ProcessAgent] = attrs.Factory(list)
    records: list[logging.LogRecord] = attrs.Factory(list)
    journal: list[dict[str, Any]] = attrs.Factory(list)
    letters: list[DeadLetter] = attrs.Factory(list)
    shutdown_seconds: float = 0.0
    in_flight: int = -1


class _Capture(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def capture_bridge_log(records: list[logging.LogRecord]) -> Iterator[None]:
    logger = logging.getLogger("nexus_trio.bridge")
    handler = _Capture(records)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def kernel_config() -> Config:
    return Config(
        kernel=KernelConfig(
            send_timeout_ms=200,
            handle_timeout_ms=400,
            request_timeout_ms=600,
            shutdown_grace_ms=300,
            dead_letter_buffer=100_000,
        ),
        supervision=SupervisionConfig(max_restarts=1000, backoff_initial_ms=0, backoff_max_ms=0),
    )


async def ask(kernel: Any, ref: AgentRef, run: Run, seq: int, payload: Any, timeout: float) -> None:
    """One request from outside; its outcome is recorded exactly once."""
    outcome: tuple[Any, ...]
    try:
        outcome = ("answer", await kernel.request(ref, payload, timeout=timeout))
    except RequestTimeout as exc:
        outcome = ("timeout", str(exc))
    except RequestFailed as exc:
        outcome = ("failed", exc.reason, str(exc))
    except KernelShuttingDown as exc:
        outcome = ("shutting_down", str(exc))
    except AgentNotFound as exc:
        outcome = ("not_found", str(exc))
    except MailboxFull as exc:
        outcome = ("full", str(exc))
    run.outcomes.setdefault(seq, []).append(outcome)


async def played(kernel: Kernel, journal: Path) -> None:
    """Wait (in real time, a bounded while) until the child played its script: its last
    start reached the end of its actions, or waits for a message when none is in flight,
    or reached a point past which it never writes again."""
    deadline = trio.current_time() + PLAY_LIMIT
    while trio.current_time() < deadline:
        text = journal.read_text() if journal.exists() else ""
        events = [json.loads(line)["event"] for line in text.splitlines()]
        if events and events[-1] == "stuck":
            return  # (what is in flight waits for the handle timeout and a new child)
        if events and events[-1] in ("done", "wait") and kernel.stats().in_flight == 0:
            return
        await trio.sleep(0.02)


def run_scenario(
    directory: Path,
    child: Path,
    *,
    protocol: int,
    features: list[str],
    lives: list[list[dict[str, Any]]],
    ops: list[tuple[Any, ...]],
    interrupt: tuple[str, int] | None = None,
    ping: bool = False,
    capacity: int | None = None,
) -> Run:
    """Run the kernel with one scripted process agent; every step bounded in real time."""
    directory.mkdir()
    run = Run()
    script = directory / "script.json"
    journal = directory / "journal"
    spec_text = {
        "protocol": protocol,
        "features": features,
        "lives": lives,
        "journal": str(journal),
        "counter": str(directory / "counter"),
        "sink": "sink",
    }
    script.write_text(json.dumps(spec_text))
    base = process_agent(
        [sys.executable, str(child), str(script)],
        name="scripted",
        register_timeout=5.0,
        line_limit=LINE_LIMIT,
        shutdown_grace=0.2,
        cancel_grace=0.1,
        ping_interval=0.2 if ping else None,
        ping_timeout=0.3,
        mailbox_capacity=capacity,
    )

    def make() -> ProcessAgent:
        behaviour = base.factory()
        assert isinstance(behaviour, ProcessAgent)
        run.agents.append(behaviour)
        return behaviour

    spec = attrs.evolve(base, factory=make)

    @agent(name="sink")
    async def sink(ctx: Context, msg: Message) -> Any:
        return {"sink": msg.payload} if msg.kind is MessageKind.QUERY else None

    async def scenario() -> None:
        tasks_before = tasks_living()
        async with trio.open_nursery() as requesters:
            async with open_kernel(kernel_config()) as kernel:
                kernel.spawn(sink)
                ref = kernel.spawn(spec)
                for seq, op in enumerate(ops):
                    if interrupt is not None and interrupt[1] == seq:
                        if interrupt[0] == "shutdown":
                            break
                        await kernel.stop(ref)
                    if op[0] == "sleep":
                        await trio.sleep(op[1])
                        continue
                    payload = {"seq": seq, "odd": math.nan} if op[1] else {"seq": seq}
                    if op[0] == "request":
                        run.asked[seq] = payload
                        requesters.start_soon(ask, kernel, ref, run, seq, payload, op[2])
                        continue
                    with contextlib.suppress(AgentNotFound, MailboxFull):
                        await kernel.send(ref, payload)
                else:
                    await played(kernel, journal)
                started = trio.current_time()
                with trio.fail_after(SHUTDOWN_BOUND):
                    await kernel.shutdown()
                run.shutdown_seconds = trio.current_time() - started
            run.in_flight = kernel.stats().in_flight
            assert_conserved(kernel)
            run.letters = kernel.recent_dead_letters()
        assert tasks_living() == tasks_before

    with capture_bridge_log(run.records), real_time_limit(EXAMPLE_LIMIT):
        trio.run(scenario)
    if journal.exists():
        run.journal = [json.loads(line) for line in journal.read_text().splitlines()]
    return run


def _alive(pid: int, child: Path) -> bool:
    """The child ``pid`` still exists (running, or a zombie nobody reaped)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return str(child).encode() in cmdline or not cmdline  # (a zombie has no command line)


def check(run: Run, child: Path) -> None:
    """The properties every example must have."""
    assert run.in_flight == 0
    assert run.shutdown_seconds < SHUTDOWN_BOUND
    # every request ended once, with its own answer or a clear error
    for seq, payload in run.asked.items():
        got = run.outcomes.get(seq, [])
        assert len(got) == 1, (seq, got)
        (outcome,) = got
        if outcome[0] == "answer":
            assert isinstance(outcome[1], dict) and outcome[1].get("echo") == payload, (
                seq,
                outcome,
            )
        else:
            assert outcome[-1], (seq, outcome)  # the error says something
            if outcome[0] == "failed":
                assert outcome[1] in QUERY_REASONS, (seq, outcome)
    # every unusable line is counted: those written whole at least, those begun at most
    stats: dict[int, BridgeStats] = {id(a.stats): a.stats for a in run.agents}
    counted = sum(s.invalid_lines + s.oversized_lines for s in stats.values())
    bad_written = [e for e in run.journal if e["event"] == "line" and e["bad"]]
    bad_begun = [e for e in run.journal if e["event"] == "attempt" and e["bad"]]
    assert len(bad_written) <= counted <= len(bad_begun), (counted, bad_written, bad_begun)
    # (a bad line fails the message in flight, if there is one: one message at most)
    malformed = [d for d in run.letters if d.reason is DeadLetterReason.MALFORMED]
    assert len(malformed) <= counted, (malformed, counted)
    # ... as is every line, every stderr line, every send and every answer to nothing
    written = [e for e in run.journal if e["event"] == "line"]
    begun = [e for e in run.journal if e["event"] == "attempt"]
    lines_in = sum(s.lines_in for s in stats.values())
    assert len(written) <= lines_in <= len(begun), (lines_in, len(written), len(begun))
    stderr_lines = sum(s.stderr_lines for s in stats.values())
    stderr_written = sum(e["n"] for e in run.journal if e["event"] == "stderr")
    stderr_begun = sum(e["n"] for e in run.journal if e["event"] == "stderr attempt")
    assert stderr_written <= stderr_lines <= stderr_begun, (stderr_lines, stderr_written)
    sends = sum(s.sends_routed + s.sends_failed for s in stats.values())
    sends_written = [e for e in written if e["head"].startswith(SEND_HEAD)]
    sends_begun = [e for e in begun if e["head"].startswith(SEND_HEAD)]
    assert len(sends_written) <= sends <= len(sends_begun), (sends, sends_written)
    discarded = sum(s.unmatched_responses + s.late_responses for s in stats.values())
    played = [e["do"] for e in run.journal if e["event"] == "played"]
    unanswerable = played.count("reply_unknown") + played.count("pong_unknown")
    assert discarded >= unanswerable, (discarded, played)
    # ... and the first one is logged, naming it
    if bad_begun and bad_begun[0] in [{**e, "event": "attempt"} for e in bad_written]:
        first = bad_begun[0]
        messages = [r.getMessage() for r in run.records if r.levelno >= logging.WARNING]
        if first["size"] > LINE_LIMIT:
            expected = f"{first['size']} bytes"
        else:
            expected = bytes.fromhex(first["head"])[:120].decode("utf-8", "replace")[:30]
        assert any(expected in m for m in messages), (expected, messages)
    # every child is reaped
    # (the log names every child started, also one killed before it could say its pid)
    started = {r.args[-1] for r in run.records if r.msg == STARTED and isinstance(r.args, tuple)}
    pids = {e["pid"] for e in run.journal if e["event"] == "start"}
    assert pids <= started, (pids, started)
    assert len(started) == sum(s.starts for s in stats.values())
    assert not [pid for pid in started if _alive(pid, child)]


@pytest.fixture
def child(tmp_path: Path) -> Path:
    path = tmp_path / "scripted_agent.py"
    path.write_text(CHILD)
    return path


@settings(
    fault_settings(25),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    protocol=st.sampled_from([1, 2, 2]),
    cancel=st.booleans(),
    ping=st.sampled_from([False, False, True]),
    lives=lives,
    ops=kernel_ops,
    interrupt=interrupts,
    capacity=st.sampled_from([None, None, 1, 3]),
    number=st.integers(0, 10**9),
)
def test_a_hostile_child_never_hangs_loses_or_leaks_anything(
    child: Path,
    protocol: int,
    cancel: bool,
    ping: bool,
    lives: list[list[dict[str, Any]]],
    ops: list[tuple[Any, ...]],
    interrupt: tuple[str, int] | None,
    capacity: int | None,
    number: int,
) -> None:
    run = run_scenario(
        child.parent / f"example-{number}-{os.urandom(4).hex()}",
        child,
        protocol=protocol,
        features=["cancel"] if cancel else [],
        lives=lives,
        ops=ops,
        interrupt=interrupt,
        ping=ping,
        capacity=capacity,
    )
    check(run, child)
