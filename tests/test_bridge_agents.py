"""The agent-side bridges (Python module, Node file) and the two examples, as real processes.

Each test starts a child the way the kernel does (pipes on stdin/stdout/stderr), plays the
kernel's part of the protocol by hand and checks the exact frames, stderr lines and exit
code. Frames sent to the children are built with :meth:`Message.to_json`, and responses are
decoded with :func:`decode_message`, so both ends agree with the kernel's own codec.
Real time is used (generous fail-safe timeouts); every child is reaped.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_trio import AgentRef, Kernel, Message, MessageKind
from nexus_trio._message import decode_message

ROOT = Path(__file__).resolve().parent.parent
PY_BRIDGE = ROOT / "nexus_trio" / "bridges" / "python.py"
JS_BRIDGE = ROOT / "nexus_trio" / "bridges" / "nexus-bridge.js"
PY_EXAMPLE = ROOT / "examples" / "python_agent_example.py"
JS_EXAMPLE = ROOT / "examples" / "javascript_agent_example.js"
KERNEL_ID = uuid.UUID("0f0f0f0f-0000-4000-8000-000000000001")
TIMEOUT = 30.0  # fail-safe per step; a loaded 2-core machine may start children slowly
RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


#: the reason in the summary when the JavaScript tests are skipped
NODE_MISSING = "Node 18+ not on PATH"
#: CI sets it: a machine without Node fails the JavaScript tests instead of skipping them
REQUIRE_NODE = os.environ.get("NEXUS_REQUIRE_NODE") == "1"


def _find_node() -> tuple[str | None, str]:
    """(path of Node 18+, or None; what is wrong otherwise)."""
    node = shutil.which("node")
    if node is None:
        return None, NODE_MISSING
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
    found = version.stdout.strip()
    match = re.match(r"v(\d+)\.", found)
    if match and int(match.group(1)) >= 18:
        return node, ""
    return None, f"{NODE_MISSING} (found node {found or 'that does not run'})"


NODE, NODE_PROBLEM = _find_node()
#: on tests that need Node: skipped, saying why, when it is missing (unless REQUIRE_NODE).
#: Decided at collection: a skip raised inside a trio test loses its reason in the summary.
needs_node = pytest.mark.skipif(NODE is None and not REQUIRE_NODE, reason=NODE_PROBLEM)


def node_or_skip() -> str:
    """Node 18+ on PATH; without it the test fails when NEXUS_REQUIRE_NODE=1, else skips."""
    if NODE is None:
        if REQUIRE_NODE:
            pytest.fail(f"{NODE_PROBLEM}, and NEXUS_REQUIRE_NODE=1: the JavaScript tests need it")
        pytest.skip(NODE_PROBLEM)
    return NODE


# --- probe agents: one per language, steered by the payload ------------------------------

PY_PROBE = """
import asyncio, os, subprocess, sys, time
from nexus_trio.bridges.python import NexusAgent

class Unreadable(Exception):
    def __str__(self):
        raise RuntimeError("no text")

class UnreadableValue(ValueError):
    def __str__(self):
        raise RuntimeError("no text")

class NoItems(dict):  # a mapping whose items() raises (as json's encoder reads it)
    def __init__(self, error):
        super().__init__(a=1)
        self.error = error

    def items(self):
        raise self.error

class Probe(NexusAgent):
    default_name = "probe"

    def on_start(self):
        self.log("probe started")

    def handle_message(self, message):
        p = message["payload"]
        do = p.get("do")
        if do == "echo":
            return p.get("value")
        if do == "none":
            return None
        if do == "raise":
            raise ValueError(p["text"])
        if do == "raise_huge":
            raise ValueError(p["text"] * p["times"])
        if do == "raise_huge_name":
            raise type(p["text"] * p["times"], (Exception,), {})("short")
        if do == "raise_group":
            inner = ExceptionGroup("inner", [KeyError("k")])
            runs = [RuntimeError(str(i)) for i in range(p["runs"])]
            raise ExceptionGroup("boom", [ValueError("a"), inner, *runs])
        if do == "unserialisable":
            return {"ok": {1, 2}}
        if do == "nan":
            return float("nan")
        if do == "lone_surrogate":  # a file name that is not UTF-8, read by os.listdir
            return {"cut": ["whole", b"x\\xff".decode("utf-8", "surrogateescape")]}
        if do == "send_lone_surrogate":
            try:
                self.send(message["from"], {"text": "\\ud800"})
            except TypeError as exc:
                return str(exc)
            return "sent"
        if do == "raise_unreadable":  # an exception whose __str__ raises
            raise Unreadable()
        if do == "raise_lone_surrogate":  # a file name that is not UTF-8, in the error's text
            raise ValueError("no file " + b"x\\xff".decode("utf-8", "surrogateescape"))
        if do == "items_raise":  # a ValueError of the result's own code, not a float's
            return NoItems(ValueError("no items"))
        if do == "items_raise_unreadable":
            return NoItems(UnreadableValue())
        if do == "deep":  # a result nested deeper than the recursion limit
            return self._deep()
        if do == "deep_circular":  # one that holds itself 5,000 levels down
            top = inner = {}
            for _ in range(2_500):
                inner["next"] = [{}]
                inner = inner["next"][0]
            inner["top"] = top
            return top
        if do == "send_deep":
            try:
                self.send(message["from"], self._deep())
            except TypeError as exc:
                return str(exc)
            return "sent"
        if do == "pair":  # a character outside the BMP: escaped as a valid pair
            return "x\\U0001F600"
        if do == "print":
            print("stray print")
            sys.stdout.write("stray sys.stdout.write\\n")
            sys.stdout.flush()
            os.write(1, b"stray os.write\\n")
            subprocess.run(["echo", "stray child process"], check=True)
            return "printed"
        if do == "send":
            self.send(p["to"], p["payload"], p.get("kind", "Command"), trace_id=p.get("trace_id"))
            return "sent"
        if do == "message":
            return {k: message.get(k) for k in ("from", "to", "kind", "id")}
        if do == "flood":  # more stderr than a pipe holds
            for i in range(p["lines"]):
                self.log(f"flood line {i}")
            return p["lines"]
        if do == "spin":  # long work, polling for a cancel
            self.log("working")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                self.check_cancelled()
                time.sleep(0.01)
            return "finished"
        if do == "async_sleep":
            return self._await_sleep()
        if do == "wait_file":  # busy until the test creates the file
            self.log("working")
            while not os.path.exists(p["path"]):
                time.sleep(0.01)
            return "done"
        raise KeyError(do)

    async def _await_sleep(self):
        self.log("working")
        await asyncio.sleep(60)
        return "finished"

    def _deep(self):
        value = []
        for _ in range(100_000):
            value = [value]
        return value

    def on_stop(self):
        self.log("probe stopped")

if __name__ == "__main__":
    sys.exit(Probe().run_agent())
"""

JS_PROBE = """
const fs = require('fs');
const { NexusAgent, runMain } = require(%(bridge)s);
// a Proxy whose every trap (get, getPrototypeOf: instanceof) throws another such Proxy
const hostileProxy = () => new Proxy({}, new Proxy({}, { get() { throw hostileProxy(); } }));

class Probe extends NexusAgent {
  onStart() {
    this.log('probe started');
    // A live timer must not keep the process alive after a shutdown frame.
    this.timer = setInterval(() => {}, 1000);
  }

  async handleMessage(message) {
    const p = message.payload;
    switch (p.do) {
      case 'echo': return p.value;
      case 'none': return undefined;
      case 'raise': throw new RangeError(p.text);
      case 'raise_huge': throw p.text.repeat(p.times); // (a string: no Error)
      case 'raise_group': {
        const runs = Array.from({ length: p.runs }, (_, i) => new Error(String(i)));
        throw new AggregateError([new TypeError('a'), new AggregateError([new RangeError('k')], 'inner'), ...runs], 'boom');
      }
      case 'raise_huge_name': {
        const error = new Error('short');
        error.name = p.text.repeat(p.times);
        throw error;
      }
      case 'reject': return Promise.reject(new TypeError(p.text));
      case 'throw_symbol': throw Symbol('gone'); // String() takes it; a template throws
      case 'throw_unreadable': throw { toString() { throw new Error('no text'); } };
      // an object whose own 'constructor' field is no class (parsed JSON can hold one)
      case 'throw_oddly_named': throw { constructor: { name: 42 } };
      // half of the emoji's surrogate pair, in the error's text
      case 'raise_lone_surrogate': throw new RangeError(`no file ${'x\\ud83d\\ude00'.slice(0, 2)}`);
      case 'unserialisable': return { ok: 1n };
      case 'nan': return NaN;
      case 'circular': { const o = {}; o.self = o; return o; }
      case 'deep': { let v = []; for (let i = 0; i < 100000; i++) v = [v]; return v; }
      case 'deep_circular': {
        const top = {}; let inner = top;
        for (let i = 0; i < 50000; i++) { inner.next = [{}]; inner = inner.next[0]; }
        inner.top = top; return top;
      }
      // a part 5,001 levels deep held at the top and 50 levels down: 5,052 there
      case 'deep_shared': {
        const shared = []; let inner = shared;
        for (let i = 0; i < 5000; i++) { inner.push([]); inner = inner[0]; }
        const top = [shared]; inner = top;
        for (let i = 0; i < 50; i++) { inner.push([]); inner = inner[inner.length - 1]; }
        inner.push(shared); return top;
      }
      // shallow, but its toJSON gives a new object holding it again, without end
      case 'to_json_recursing': return { toJSON() { return { again: this }; } };
      // shallow, but a getter gives a new object with the getter, without end
      case 'getter_recursing': { const make = () => ({ get again() { return make(); } }); return make(); }
      // half of the emoji's surrogate pair: what cutting a string by length does
      case 'lone_surrogate': return { cut: ['whole', 'x\\ud83d\\ude00'.slice(0, 2)] };
      case 'send_lone_surrogate':
        this.send('sink', { text: '\\udfff' });
        return 'sent';
      case 'send_hostile_proxy':
        this.send('sink', { a: [hostileProxy()] });
        return 'sent';
      case 'sleep':
        await new Promise((resolve) => setTimeout(resolve, p.ms));
        return p.value;
      case 'print':
        console.log('stray console.log');
        console.info('stray console.info');
        process.stdout.write('stray process.stdout.write\\n');
        return 'printed';
      case 'send':
        this.send(p.to, p.payload, p.kind || 'Command', { traceId: p.trace_id });
        return 'sent';
      case 'message':
        return { from: message.from, to: message.to, kind: message.kind, id: message.id };
      case 'flood': // more stderr than a pipe holds
        for (let i = 0; i < p.lines; i += 1) this.log(`flood line ${i}`);
        return p.lines;
      case 'spin':
      case 'async_sleep':
        // Long work that gives up when the kernel cancels the message.
        this.log('working');
        await new Promise((resolve, reject) => {
          const timer = setTimeout(resolve, 60000);
          this.signal.addEventListener('abort', () => {
            clearTimeout(timer);
            reject(new Error('gave up'));
          });
        });
        return 'finished';
      case 'wait_file': // busy until the test creates the file
        this.log('working');
        while (!fs.existsSync(p.path)) await new Promise((resolve) => setTimeout(resolve, 10));
        return 'done';
      default: throw new Error(`unknown do ${p.do}`);
    }
  }

  onStop() { this.log('probe stopped'); }
}
Probe.defaultName = 'probe';
runMain(Probe);
"""


def probe_command(lang: str, tmp_path: Path) -> list[str]:
    if lang == "python":
        script = tmp_path / "probe.py"
        script.write_text(textwrap.dedent(PY_PROBE))
        return [sys.executable, str(script)]
    script = tmp_path / "probe.js"
    script.write_text(JS_PROBE % {"bridge": json.dumps(str(JS_BRIDGE))})
    return [node_or_skip(), str(script)]


def echo_command(lang: str) -> list[str]:
    if lang == "python":
        return [sys.executable, str(PY_BRIDGE)]
    return [node_or_skip(), str(JS_BRIDGE)]


def example_command(lang: str) -> list[str]:
    if lang == "python":
        return [sys.executable, str(PY_EXAMPLE)]
    return [node_or_skip(), str(JS_EXAMPLE)]


# --- the harness: the kernel's side of the pipe, by hand --------------------------------


def message(
    payload: Any,
    *,
    kind: MessageKind = MessageKind.COMMAND,
    to: str = "agent",
    conversation_id: uuid.UUID | None = None,
    trace_id: uuid.UUID | None = None,
) -> Message:
    return Message(
        sender=KERNEL_ID,
        to=to,
        payload=payload,
        kind=kind,
        conversation_id=conversation_id,
        trace_id=trace_id,
    )


def message_frame(msg: Message) -> bytes:
    return f'{{"type":"message","payload":{msg.to_json()}}}\n'.encode()


SHUTDOWN = b'{"type":"shutdown","payload":{}}\n'


class Child:
    """A bridge child process with the kernel's view of it: frames out, frames in."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = bytearray()
        self.stderr = bytearray()
        self.raw_stdout = bytearray()

    async def write(self, *chunks: bytes | Message) -> None:
        assert self.process.stdin is not None
        for chunk in chunks:
            data = message_frame(chunk) if isinstance(chunk, Message) else chunk
            await self.process.stdin.send_all(data)

    async def close_stdin(self) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.aclose()

    async def _line(self) -> bytes | None:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                return None
            self._buffer += chunk
            self.raw_stdout += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line

    async def frame(self) -> dict[str, Any]:
        with trio.fail_after(TIMEOUT):
            line = await self._line()
        assert line is not None, f"stdout closed; stderr: {self.stderr.decode(errors='replace')}"
        frame = json.loads(line)
        assert isinstance(frame, dict)
        assert set(frame) == {"type", "payload"}, frame
        return frame

    async def text_lines(self) -> list[str]:
        """Every line until stdout closes, as text (not frames)."""
        with trio.fail_after(TIMEOUT):
            lines = []
            while (line := await self._line()) is not None:
                lines.append(line.decode())
        assert not self._buffer, f"unterminated bytes on stdout: {bytes(self._buffer)!r}"
        return lines

    async def rest(self) -> list[dict[str, Any]]:
        """Every frame until stdout closes; each line must be a frame."""
        frames = []
        with trio.fail_after(TIMEOUT):
            while (line := await self._line()) is not None:
                frame = json.loads(line)
                assert set(frame) == {"type", "payload"}, frame
                frames.append(frame)
        assert not self._buffer, f"unterminated bytes on stdout: {bytes(self._buffer)!r}"
        return frames

    async def register(self) -> dict[str, Any]:
        frame = await self.frame()
        assert frame["type"] == "register", frame
        return dict(frame["payload"])

    async def response_to(self, msg: Message) -> dict[str, Any]:
        await self.write(msg)
        frame = await self.frame()
        assert frame["type"] == "response", frame
        return dict(frame["payload"])

    async def wait(self) -> int:
        with trio.fail_after(TIMEOUT):
            return await self.process.wait()

    def stderr_lines(self) -> list[str]:
        return self.stderr.decode("utf-8", errors="replace").splitlines()


@asynccontextmanager
async def open_child(
    cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> AsyncIterator[Child]:
    full_env = {**os.environ, **(env or {})}
    process = await trio.lowlevel.open_process(
        list(cmd),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=full_env,
        cwd=cwd,
    )
    child = Child(process)

    async def collect_stderr() -> None:
        assert process.stderr is not None
        while chunk := await process.stderr.receive_some(65536):
            child.stderr += chunk

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect_stderr)
            try:
                yield child
                await child.wait()  # stderr is complete once the child is gone
            finally:
                if process.returncode is None:
                    process.kill()
                    with trio.move_on_after(TIMEOUT):
                        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def assert_response_to(response: dict[str, Any], msg: Message, register: dict[str, Any]) -> None:
    """A protocol-2 response: correlated, addressed back, and decodable by the kernel."""
    assert response["reply_to"] == str(msg.id)
    assert response["to"] == str(msg.sender)
    assert response["from"] == register["id"]
    assert response["kind"] == "Response"
    assert uuid.UUID(response["id"]) != msg.id
    assert response["conversation_id"] == str(msg.conversation_id or msg.id)
    assert response["trace_id"] == (str(msg.trace_id) if msg.trace_id else None)
    assert RFC3339_Z.match(response["timestamp"]), response["timestamp"]
    decoded = decode_message(response)
    assert decoded.reply_to == msg.id
    assert decoded.kind is MessageKind.RESPONSE


LANGS = ["python", pytest.param("node", marks=needs_node)]


# --- the harness from the issue: calculator example by hand ------------------------------


async def test_python_example_harness_add_40_2_gives_42_and_clean_exit() -> None:
    async with open_child(example_command("python")) as child:
        register = await child.register()
        assert register["name"] == "calculator"
        assert register["protocol"] == 2
        uuid.UUID(register["id"])
        msg = message({"operation": "add", "a": 40, "b": 2}, to="calculator")
        response = await child.response_to(msg)
        assert response["payload"] == {"result": 42}
        assert response["reply_to"] == str(msg.id)
        assert_response_to(response, msg, register)
        await child.write(SHUTDOWN)
        assert await child.rest() == []
        assert await child.wait() == 0
    assert "calculator calculator stopping after 1 calculations" in child.stderr_lines()


@pytest.mark.parametrize("flags", [["-S"], ["-I", "-S"]], ids=["no-site", "isolated"])
async def test_python_example_runs_without_the_package_installed(
    flags: list[str], tmp_path: Path
) -> None:
    # -S hides site-packages (where nexus_trio is installed): the example must load the
    # bridge file from the checkout by path. Run from an unrelated directory.
    async with open_child([sys.executable, *flags, str(PY_EXAMPLE)], cwd=tmp_path) as child:
        await child.register()
        msg = message({"operation": "multiply", "a": 6, "b": 7})
        assert (await child.response_to(msg))["payload"] == {"result": 42}
        await child.write(SHUTDOWN)
        assert await child.wait() == 0


CALCULATIONS = [
    ({"operation": "add", "a": 40, "b": 2}, {"result": 42}),
    ({"operation": "subtract", "a": 50, "b": 8}, {"result": 42}),
    ({"operation": "multiply", "a": 2.5, "b": 4}, {"result": 10.0}),
    ({"operation": "divide", "a": 84, "b": 2}, {"result": 42.0}),
    ({"operation": "divide", "a": 1, "b": 4}, {"result": 0.25}),
    ({"operation": "power", "a": 2, "b": 10}, {"result": 1024}),
    ({"operation": "power", "a": 2, "b": -2}, {"result": 0.25}),
    ({"operation": "power", "a": 4, "b": 0.5}, {"result": 2.0}),
    (
        {"operation": "divide", "a": 1, "b": 0},
        {"error": "division by zero", "code": "division_by_zero", "field": "b"},
    ),
    (
        {"operation": "add", "a": "40", "b": 2},
        {
            "error": "operand 'a' must be a number, got str '40'",
            "code": "operand_not_numeric",
            "field": "a",
        },
    ),
    (
        {"operation": "add", "a": 1, "b": True},
        {
            "error": "operand 'b' must be a number, got bool True",
            "code": "operand_not_numeric",
            "field": "b",
        },
    ),
    (
        {"operation": "add", "a": 1},
        {"error": "operand 'b' is missing", "code": "operand_missing", "field": "b"},
    ),
    (
        {"operation": "power", "a": 10, "b": 10000},
        {"error": "power(10, 10000) is too large", "code": "overflow"},
    ),
    (
        {"operation": "power", "a": 10.0, "b": 400},
        {"error": "power(10.0, 400) is too large", "code": "overflow"},
    ),
    (
        {"operation": "multiply", "a": 1e300, "b": 1e300},
        {"error": "the result of multiply is too large", "code": "overflow"},
    ),
    (
        {"operation": "power", "a": -8, "b": 0.5},
        {"error": "power(-8, 0.5) is not a real number", "code": "domain_error", "field": "b"},
    ),
    (
        {"operation": "power", "a": 0, "b": -1},
        {"error": "zero cannot be raised to a negative power", "code": "division_by_zero"},
    ),
    (
        {"operation": "modulo", "a": 1, "b": 2},
        {
            "error": "unknown operation 'modulo' (expected one of add, subtract, multiply, divide, "
            "power)",
            "code": "unknown_operation",
            "field": "operation",
        },
    ),
    (
        [1, 2],
        {"error": "payload must be an object, got list", "code": "invalid_payload"},
    ),
]


async def test_python_example_answers_every_operation_and_specific_errors() -> None:
    async with open_child(example_command("python")) as child:
        await child.register()
        for payload, expected in CALCULATIONS:
            response = await child.response_to(message(payload))
            assert response["payload"] == expected, payload
        # Events are not calculations: answered with null so the kernel knows it is done.
        event = message({"operation": "add", "a": 1, "b": 1}, kind=MessageKind.EVENT)
        assert (await child.response_to(event))["payload"] is None
        await child.close_stdin()
        assert await child.wait() == 0
    assert "calculator calculator stopping after 8 calculations" in child.stderr_lines()


DATA_REQUESTS = [
    (
        {"operation": "transform", "data": ["a", " b "], "map": ["trim", "uppercase"]},
        {"result": ["A", "B"]},
    ),
    ({"operation": "transform", "data": [1, 2.5], "map": "double"}, {"result": [2, 5]}),
    (
        {"operation": "transform", "data": [1, "x"], "map": "double"},
        {
            "error": "map double needs a number at index 1, got string",
            "code": "type_mismatch",
            "index": 1,
        },
    ),
    (
        {"operation": "transform", "data": [1], "map": "explode"},
        {
            "error": 'unknown map "explode" (expected one of uppercase, lowercase, trim, reverse, '
            "length, double, square, negate, increment, abs, round)",
            "code": "unknown_map",
            "field": "map",
        },
    ),
    (
        {
            "operation": "filter",
            "data": [{"age": 5}, {"age": 20}, {"age": 11}],
            "predicate": {"op": "gt", "value": 10, "key": "age"},
        },
        {"result": [{"age": 20}, {"age": 11}]},
    ),
    (
        {
            "operation": "filter",
            "data": ["apple", "banana", "avocado"],
            "predicate": {"op": "startsWith", "value": "a"},
        },
        {"result": ["apple", "avocado"]},
    ),
    (
        {"operation": "filter", "data": [1, 2], "predicate": {"op": "near", "value": 1}},
        {
            "error": 'unknown predicate op "near" (expected one of eq, ne, gt, gte, lt, lte, '
            "contains, startsWith, in)",
            "code": "unknown_predicate",
            "field": "predicate.op",
        },
    ),
    (
        {
            "operation": "filter",
            "data": [{"a": 1}],
            "predicate": {"op": "eq", "value": 1, "key": "b"},
        },
        {"error": 'item 0 has no field "b"', "code": "missing_field", "field": "b", "index": 0},
    ),
    (
        {
            "operation": "aggregate",
            "fn": "sum",
            "field": "v",
            "by": "c",
            "data": [{"c": "x", "v": 1}, {"c": "y", "v": 2}, {"c": "x", "v": 3}],
        },
        {"result": {"x": 4, "y": 2}},
    ),
    (
        {"operation": "aggregate", "fn": "avg", "field": "v", "data": [{"v": 1}, {"v": 4}]},
        {"result": 2.5},
    ),
    (
        {
            "operation": "aggregate",
            "fn": "count",
            "by": "c",
            "data": [{"c": "x"}, {"c": "y"}, {"c": "x"}],
        },
        {"result": {"x": 2, "y": 1}},
    ),
    (
        {"operation": "aggregate", "fn": "max", "field": "v", "data": [{"v": 1}, {"v": "2"}]},
        {
            "error": 'field "v" of item 1 must be a number, got string',
            "code": "not_numeric",
            "index": 1,
        },
    ),
    (
        {"operation": "aggregate", "fn": "median", "field": "v", "data": []},
        {
            "error": 'unknown aggregate fn "median" (expected one of sum, avg, min, max, count)',
            "code": "unknown_function",
            "field": "fn",
        },
    ),
    (
        {"operation": "stats", "data": [2, 4, 4, 4, 5, 5, 7, 9]},
        {"result": {"count": 8, "mean": 5, "median": 4.5, "stddev": 2, "min": 2, "max": 9}},
    ),
    (
        {"operation": "stats", "data": []},
        {"error": "stats of no values is undefined", "code": "empty_data", "field": "data"},
    ),
    (
        {"operation": "stats", "data": "1,2,3"},
        {"error": "'data' must be an array, got string", "code": "invalid_data", "field": "data"},
    ),
    (
        {"operation": "sort", "data": []},
        {
            "error": 'unknown operation "sort" (expected one of transform, filter, aggregate, '
            "stats)",
            "code": "unknown_operation",
            "field": "operation",
        },
    ),
]


@needs_node
async def test_javascript_example_harness_and_every_operation() -> None:
    async with open_child(example_command("node")) as child:
        register = await child.register()
        assert register["name"] == "data-processor"
        assert register["protocol"] == 2
        for payload, expected in DATA_REQUESTS:
            msg = message(payload)
            response = await child.response_to(msg)
            assert response["payload"] == expected, payload
            assert_response_to(response, msg, register)
        await child.write(SHUTDOWN)
        assert await child.rest() == []
        assert await child.wait() == 0
    assert "data processor data-processor stopping after 8 requests" in child.stderr_lines()


# --- both bridges: the protocol -----------------------------------------------------------


@pytest.mark.parametrize("lang", LANGS)
async def test_echo_bridge_registers_round_trips_and_exits_0_on_shutdown(lang: str) -> None:
    async with open_child(echo_command(lang)) as child:
        register = await child.register()
        assert set(register) == {"id", "name", "protocol", "features"}
        assert register["name"] == "echo"
        assert register["protocol"] == 2
        assert register["features"] == ["cancel"]
        assert str(uuid.UUID(register["id"])) == register["id"]
        conversation, trace = uuid.uuid4(), uuid.uuid4()
        payloads = [{"nested": [1, 2.5, None, True, "é€😀"]}, "text", 0, None, [], {}]
        for index, payload in enumerate(payloads):
            msg = message(
                payload,
                kind=MessageKind.QUERY,
                trace_id=trace,
                conversation_id=conversation if index % 2 else None,
            )
            response = await child.response_to(msg)
            assert response["payload"] == payload
            assert_response_to(response, msg, register)
        await child.write(SHUTDOWN)
        assert await child.rest() == []
        assert await child.wait() == 0


#: a Node agent run in-process: frames to a stream of the caller's, so runAgent resolves
#: instead of exiting the process, which ends when nothing is left to do
JS_EMBEDDED = """
const { EchoAgent } = require(%(bridge)s);
const agent = new EchoAgent({ output: process.stdout, protocol: %(protocol)d });
agent.runAgent().then((code) => {
  process.stderr.write(`runAgent resolved ${code}\\n`);
  process.exitCode = code;
});
"""


@needs_node
@pytest.mark.parametrize("protocol", [1, 2])
async def test_node_agent_run_in_process_releases_its_input_on_shutdown(
    protocol: int, tmp_path: Path
) -> None:
    """Regression: in protocol 2 the Node bridge's read-ahead went on reading the input
    after ``shutdown``: an agent run in-process (``output`` given, so no process.exit)
    kept its process alive until the input ended. As in protocol 1, the input is let go
    of at shutdown now, and the process ends at once (stdin still open here)."""
    script = tmp_path / "embedded.js"
    script.write_text(JS_EMBEDDED % {"bridge": json.dumps(str(JS_BRIDGE)), "protocol": protocol})
    async with open_child([node_or_skip(), str(script)]) as child:
        await child.register()
        assert (await child.response_to(message("hi", kind=MessageKind.QUERY)))["payload"] == "hi"
        await child.write(SHUTDOWN)
        with trio.fail_after(10):
            assert await child.process.wait() == 0
    assert child.stderr_lines() == ["runAgent resolved 0"]


#: an echo agent fed one long message line in 64 KiB chunks: what Buffer.concat copied
JS_LONG_LINE = """
const { Readable, Writable } = require('stream');
const { EchoAgent } = require(%(bridge)s);
let copied = 0;
const concat = Buffer.concat;
Buffer.concat = (list, length) => {
  const joined = concat(list, length);
  copied += joined.length;
  return joined;
};
const line = Buffer.from(`${JSON.stringify({
  type: 'message',
  payload: {
    from: '00000000-0000-0000-0000-000000000001', to: 'echo', kind: 'Query',
    payload: 'x'.repeat(%(size)d), timestamp: '2026-01-01T00:00:00Z',
    id: '7d9f4c2e-0000-4000-8000-000000000001',
  },
})}\\n`);
const chunks = [];
for (let at = 0; at < line.length; at += 65536) chunks.push(line.subarray(at, at + 65536));
chunks.push(Buffer.from('{"type":"shutdown","payload":{}}\\n'));
const answers = [];
const output = new Writable({
  write(data, encoding, done) {
    answers.push(String(data));
    done();
  },
});
const agent = new EchoAgent({ input: Readable.from(chunks), output, protocol: %(protocol)d });
agent.runAgent().then((code) => {
  const frames = answers.join('').split('\\n').filter((text) => text).map((text) => JSON.parse(text));
  const answer = frames[frames.length - 1].payload.payload;
  console.log(JSON.stringify({ code, line: line.length, copied, answered: answer.length }));
});
"""


@needs_node
@pytest.mark.parametrize("protocol", [1, 2])
def test_a_long_input_line_is_copied_once_by_the_node_bridge(protocol: int, tmp_path: Path) -> None:
    """Regression: the Node bridge joined a line that spans chunks a chunk at a time
    (``Buffer.concat([pending, chunk])`` for each 64 KiB read), so a line was copied as
    many times as it had chunks: quadratic, a 30 MB message took 22 s to be read (a
    10 MB one 2.4 s; the Python bridge reads either in under 2 s), enough to fail it on
    its handle timeout. Its chunks are joined once now, when its newline comes."""
    size = 4 << 20  # 64 chunks
    script = tmp_path / "long_line.js"
    script.write_text(
        JS_LONG_LINE % {"bridge": json.dumps(str(JS_BRIDGE)), "size": size, "protocol": protocol}
    )
    result = subprocess.run(
        [node_or_skip(), str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert (report["code"], report["answered"]) == (0, size)
    # one join of the line's chunks, its newline left out (before: 64 joins, 134 MiB)
    assert report["line"] - 1 <= report["copied"] <= report["line"] + 65536, report


#: a Python agent given the process's own stdin explicitly (the constructor's ``stdin=``)
PY_OWN_STDIN = """
import sys
from nexus_trio.bridges.python import EchoAgent

sys.exit(EchoAgent(stdin=sys.stdin.buffer).run_agent())
"""


@pytest.mark.parametrize("protocol", ["1", "2"])
async def test_python_agent_given_its_own_stdin_exits_0_on_shutdown(
    protocol: str, tmp_path: Path
) -> None:
    """Regression: given ``stdin=sys.stdin.buffer``, a protocol-2 agent read it in its input
    thread, which was blocked inside it (holding its lock) when the interpreter closed it
    at exit: Python aborted (``Fatal Python error: _enter_buffered_busy``, exit 134) after a
    clean shutdown. The process's stdin is read from its descriptor now, however given."""
    script = tmp_path / "own_stdin.py"
    script.write_text(PY_OWN_STDIN)
    env = {"NEXUS_PROTOCOL": protocol}
    async with open_child([sys.executable, str(script)], env=env) as child:
        await child.register()
        assert (await child.response_to(message("hi")))["payload"] == "hi"
        await child.write(SHUTDOWN)  # stdin stays open
        assert await child.rest() == []
        assert await child.wait() == 0
    assert child.stderr_lines() == []


#: a program that runs an echo agent, then goes on: it reports the threads left (as a
#: frame-shaped line), reads a line of its own stdin, runs a second agent, then reads the
#: rest of its stdin; what it read goes to stderr
PY_GOES_ON = """
import json, sys, threading
from nexus_trio.bridges.python import EchoAgent, run_agent

def report(what, value):
    sys.stdout.write(json.dumps({"type": what, "payload": value}) + "\\n")
    sys.stdout.flush()

run_agent(EchoAgent(name="first"))
report("threads", sorted(t.name for t in threading.enumerate()))
sys.stderr.write(f"read {sys.stdin.buffer.readline()!r}\\n")
run_agent(EchoAgent(name="second"))
report("threads", sorted(t.name for t in threading.enumerate()))
sys.stderr.write(f"rest {sys.stdin.buffer.read()!r}\\n")
"""


@pytest.mark.parametrize("protocol", ["1", "2"])
async def test_python_program_that_goes_on_after_run_agent_keeps_its_stdin(
    protocol: str, tmp_path: Path
) -> None:
    """Regression: in protocol 2 the bridge's input thread read on after ``run_agent()``
    returned (``shutdown``): a program that went on reading its stdin lost its input to
    it, and a second ``run_agent()`` had two threads splitting its frames. The thread
    stops at ``shutdown`` now (and is stopped when the run ends otherwise), and a run
    takes over what the program's ``sys.stdin.buffer`` holds read ahead."""
    script = tmp_path / "goes_on.py"
    script.write_text(PY_GOES_ON)
    async with open_child([sys.executable, str(script)], env={"NEXUS_PROTOCOL": protocol}) as child:
        assert (await child.register())["name"] == "first"
        assert (await child.response_to(message("one")))["payload"] == "one"
        await child.write(SHUTDOWN)
        assert await child.frame() == {"type": "threads", "payload": ["MainThread"]}
        # In one write: the program's readline() takes the frame too into sys.stdin's
        # buffer, where the second run finds it.
        two = message("two")
        await child.write(b"a line of the program's own\n" + message_frame(two))
        assert (await child.register())["name"] == "second"
        response = await child.frame()
        assert response["type"] == "response"
        assert response["payload"]["payload"] == "two"
        await child.write(SHUTDOWN)
        assert await child.frame() == {"type": "threads", "payload": ["MainThread"]}
        await child.write(b"the rest\n")
        await child.close_stdin()
        assert await child.rest() == []
        assert await child.wait() == 0
    assert child.stderr_lines() == [
        'read b"a line of the program\'s own\\n"',
        "rest b'the rest\\n'",
    ]


def test_python_program_that_goes_on_gets_back_the_file_input_read_ahead(
    tmp_path: Path,
) -> None:
    """With stdin a regular file, the input thread reads ahead past ``shutdown`` (a whole
    chunk): what it had not handed out is given back (the file is rewound), so the
    program reads its own line and the second run gets its frames, in order."""
    script = tmp_path / "goes_on.py"
    script.write_text(PY_GOES_ON)
    first, second = message("one"), message("two")
    inbox, outbox = tmp_path / "in.ndjson", tmp_path / "out.ndjson"
    inbox.write_bytes(
        message_frame(first)
        + SHUTDOWN
        + b"own line\n"
        + message_frame(second)
        + SHUTDOWN
        + b"the rest\n"
    )
    with inbox.open("rb") as stdin, outbox.open("wb") as stdout:
        done = subprocess.run(
            [sys.executable, str(script)],
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            timeout=TIMEOUT,
            check=False,
            env={**os.environ, "NEXUS_PROTOCOL": "2"},
        )
    assert done.returncode == 0, done.stderr
    frames = [json.loads(line) for line in outbox.read_text().splitlines()]
    assert [f["type"] for f in frames] == [
        "register",
        "response",
        "threads",
        "register",
        "response",
        "threads",
    ]
    assert [f["payload"]["reply_to"] for f in frames if f["type"] == "response"] == [
        str(first.id),
        str(second.id),
    ]
    assert done.stderr.decode().splitlines() == ["read b'own line\\n'", "rest b'the rest\\n'"]


@pytest.mark.parametrize("lang", LANGS)
async def test_end_of_input_runs_on_stop_and_exits_0(lang: str, tmp_path: Path) -> None:
    async with open_child(probe_command(lang, tmp_path)) as child:
        await child.register()
        msg = message({"do": "echo", "value": 1})
        assert (await child.response_to(msg))["payload"] == 1
        await child.close_stdin()
        assert await child.rest() == []
        assert await child.wait() == 0
    assert child.stderr_lines() == ["probe started", "probe stopped"]


@pytest.mark.parametrize("lang", LANGS)
async def test_shutdown_runs_on_stop_and_exits_even_with_stdin_open(
    lang: str, tmp_path: Path
) -> None:
    # The JS probe holds a setInterval: the bridge must still exit after `shutdown`.
    async with open_child(probe_command(lang, tmp_path)) as child:
        await child.register()
        await child.write(SHUTDOWN)
        assert await child.wait() == 0
        assert await child.rest() == []
    assert child.stderr_lines() == ["probe started", "probe stopped"]


@pytest.mark.parametrize("lang", LANGS)
async def test_none_result_is_answered_with_null(lang: str, tmp_path: Path) -> None:
    async with open_child(probe_command(lang, tmp_path)) as child:
        register = await child.register()
        msg = message({"do": "none"})
        response = await child.response_to(msg)
        assert response["payload"] is None
        assert_response_to(response, msg, register)
        await child.close_stdin()


@pytest.mark.parametrize("lang", LANGS)
async def test_handler_sees_the_wire_message(lang: str, tmp_path: Path) -> None:
    async with open_child(probe_command(lang, tmp_path)) as child:
        await child.register()
        msg = message({"do": "message"}, kind=MessageKind.QUERY, to="probe")
        response = await child.response_to(msg)
        assert response["payload"] == {
            "from": str(KERNEL_ID),
            "to": "probe",
            "kind": "Query",
            "id": str(msg.id),
        }
        await child.close_stdin()


@pytest.mark.parametrize("lang", LANGS)
async def test_handler_exception_becomes_error_frame_and_agent_goes_on(
    lang: str, tmp_path: Path
) -> None:
    async with open_child(probe_command(lang, tmp_path)) as child:
        register = await child.register()
        failing = message({"do": "raise", "text": "boom"})
        await child.write(failing)
        frame = await child.frame()
        expected_type = "ValueError" if lang == "python" else "RangeError"
        assert frame == {
            "type": "error",
            "payload": {"reply_to": str(failing.id), "error": "boom", "error_type": expected_type},
        }
        msg = message({"do": "echo", "value": "after"})
        response = await child.response_to(msg)
        assert response["payload"] == "after"
        assert_response_to(response, msg, register)
        await child.write(SHUTDOWN)
        assert await child.wait() == 0
    # The traceback goes to stderr for the kernel's log.
    assert any("boom" in line for line in child.stderr_lines())


@needs_node
async def test_node_rejected_promise_becomes_error_frame(tmp_path: Path) -> None:
    async with open_child(probe_command("node", tmp_path)) as child:
        await child.register()
        failing = message({"do": "reject", "text": "nope"})
        await child.write(failing)
        assert await child.frame() == {
            "type": "error",
            "payload": {"reply_to": str(failing.id), "error": "nope", "error_type": "TypeError"},
        }
        await child.close_stdin()
        assert await child.wait() == 0


@needs_node
async def test_node_async_handlers_are_answered_one_at_a_time_in_order(tmp_path: Path) -> None:
    # The first handler sleeps; the second must not start before the first answered.
    async with open_child(probe_command("node", tmp_path)) as child:
        await child.register()
        slow = message({"do": "sleep", "ms": 200, "value": "slow"})
        fast = message({"do": "echo", "value": "fast"})
        await child.write(slow, fast)
        first, second = await child.frame(), await child.frame()
        assert (first["payload"]["reply_to"], first["payload"]["payload"]) == (str(slow.id), "slow")
        assert (second["payload"]["reply_to"], second["payload"]["payload"]) == (
            str(fast.id),
            "fast",
        )
        await child.close_stdin()


UNSERIALISABLE = {
    "python": [
        ("unserialisable", "result of handle_message is not JSON serialisable: set", "TypeError"),
        (
            "nan",
            "result of handle_message is not JSON serialisable: float (NaN or Infinity)",
            "ValueError",
        ),
        # json.dumps writes it as the escape \udcff, a line the kernel refuses (not
        # Unicode text): the message failed as malformed
        (
            "lone_surrogate",
            "result of handle_message is not JSON serialisable: string with a lone surrogate"
            " at .cut[1] (half of a surrogate pair: not Unicode text)",
            "TypeError",
        ),
    ],
    "node": [
        ("unserialisable", "result of handleMessage is not JSON serialisable: bigint", "TypeError"),
        ("nan", "result of handleMessage is not JSON serialisable: number (NaN)", "TypeError"),
        (
            "circular",
            "result of handleMessage is not JSON serialisable: circular structure",
            "TypeError",
        ),
        # JSON.stringify writes it as the escape \ud83d, a line the kernel refuses (not
        # Unicode text): the message failed as malformed, a send failed the message
        (
            "lone_surrogate",
            "result of handleMessage is not JSON serialisable: string with a lone surrogate"
            " at .cut[1] (half of a surrogate pair: not Unicode text)",
            "TypeError",
        ),
        (
            "send_lone_surrogate",
            "send() payload is not JSON serialisable: string with a lone surrogate at .text"
            " (half of a surrogate pair: not Unicode text)",
            "TypeError",
        ),
        # (send() threw the Proxy its encoding threw, not the TypeError it promises:
        # encode's instanceof of the Proxy threw it again)
        (
            "send_hostile_proxy",
            "send() payload is not JSON serialisable: object: <a thrown object whose text"
            " could not be read>",
            "TypeError",
        ),
    ],
}


@pytest.mark.parametrize("lang", LANGS)
async def test_unserialisable_result_becomes_clear_error_frame(lang: str, tmp_path: Path) -> None:
    async with open_child(probe_command(lang, tmp_path)) as child:
        await child.register()
        for do, text, error_type in UNSERIALISABLE[lang]:
            msg = message({"do": do})
            await child.write(msg)
            assert await child.frame() == {
                "type": "error",
                "payload": {"reply_to": str(msg.id), "error": text, "error_type": error_type},
            }
        assert (await child.response_to(message({"do": "echo", "value": 7})))["payload"] == 7
        await child.write(SHUTDOWN)
        assert await child.wait() == 0


#: (do, error text, error_type) of handlers whose failure cannot be said as it is
UNSAYABLE = {
    "python": [
        ("raise_unreadable", "<str() of the Unreadable raised RuntimeError>", "Unreadable"),
        ("raise_lone_surrogate", "no file x\\udcff", "ValueError"),
        (
            "items_raise",
            "result of handle_message is not JSON serialisable: ValueError: no items",
            "ValueError",
        ),
        (
            "items_raise_unreadable",
            "result of handle_message is not JSON serialisable: UnreadableValue:"
            " <str() of the UnreadableValue raised RuntimeError>",
            "ValueError",
        ),
        (
            "deep",
            "result of handle_message is not JSON serialisable: nested 100,001 levels deep,"
            " past the JSON writer's recursion limit",
            "TypeError",
        ),
        (
            "deep_circular",
            "result of handle_message is not JSON serialisable: circular reference",
            "ValueError",
        ),
    ],
    "node": [
        ("throw_symbol", "Symbol(gone)", "symbol"),
        ("throw_unreadable", "<a thrown object whose text could not be read>", "Object"),
        ("throw_oddly_named", "[object Object]", "Object"),
        ("raise_lone_surrogate", "no file x\\ud83d", "RangeError"),
        (
            "deep",
            "result of handleMessage is not JSON serialisable: nested 100,001 levels deep,"
            " past the JSON writer's recursion limit",
            "TypeError",
        ),
        (
            "deep_circular",
            "result of handleMessage is not JSON serialisable: circular structure",
            "TypeError",
        ),
        (
            "deep_shared",
            "result of handleMessage is not JSON serialisable: nested 5,052 levels deep,"
            " past the JSON writer's recursion limit",
            "TypeError",
        ),
        (
            "getter_recursing",
            "result of handleMessage is not JSON serialisable: RangeError: Maximum call stack"
            " size exceeded",
            "TypeError",
        ),
        (
            "to_json_recursing",
            "result of handleMessage is not JSON serialisable: RangeError: Maximum call stack"
            " size exceeded",
            "TypeError",
        ),
    ],
}


@pytest.mark.parametrize("lang", LANGS)
async def test_a_failure_that_cannot_be_said_as_it_is_is_still_an_error_frame(
    lang: str, tmp_path: Path
) -> None:
    """Regression: a handler's failure whose text could not be read (an exception's
    ``__str__`` that raises; in JavaScript a thrown Symbol, or an object whose
    ``toString`` throws) or could not be written (a lone surrogate in its text: a file
    name that is not UTF-8, a string cut by length), or a Python result nested deeper
    than the recursion limit, raised in the bridge itself: the agent exited 1 and the
    kernel restarted it, instead of one error frame and the next message. Now each is an
    error frame, its text as much as could be read, a lone surrogate as its escape.
    Fifty-fourth pass: the too-deep result was said in the RecursionError's words
    (``maximum recursion depth exceeded while encoding a JSON object``); it is said as a
    line nested too deeply is, ``nested 100,001 levels deep``, and one that holds itself
    past the recursion limit as the circular reference it is."""
    async with open_child(probe_command(lang, tmp_path)) as child:
        await child.register()
        for do, text, error_type in UNSAYABLE[lang]:
            msg = message({"do": do})
            await child.write(msg)
            frame = await child.frame()
            assert frame["type"] == "error", frame
            payload = frame["payload"]
            assert (payload["reply_to"], payload["error_type"]) == (str(msg.id), error_type)
            assert payload["error"] == text
        assert (await child.response_to(message({"do": "echo", "value": 7})))["payload"] == 7
        await child.write(SHUTDOWN)
        assert await child.wait() == 0
    failed = [line for line in child.stderr_lines() if "failed:" in line or "not JSON" in line]
    assert len(failed) == len(UNSAYABLE[lang]), child.stderr_lines()


#: what both bridges say of a line after a UTF-8 byte order mark (Python's json's words)
BOM_PROBLEM = "not JSON (Unexpected UTF-8 BOM (decode using utf-8-sig): line 1 column 1 (char 0))"


INVALID_LINES: list[tuple[bytes, str]] = [
    (b"not json at all\n", "not JSON"),
    (b"[1, 2]\n", "a frame must be a JSON object, got"),
    (b'"just a string"\n', "a frame must be a JSON object, got"),
    (b'{"payload": {}}\n', "frame has no string 'type'"),
    (b'{"type": 7, "payload": {}}\n', "frame has no string 'type'"),
    (b'{"type": "teleport", "payload": {}}\n', "unknown frame type"),
    (b'{"type": "message", "payload": "hello"}\n', "message frame needs an object payload"),
    (b'{"type": "ping", "payload": {}}\n', "ping frame needs a payload with a string 'id'"),
    # (both bridges say where, in Python's decoder's words: the Node bridge said "not UTF-8")
    (b"\xff\xfe{}\n", "not UTF-8 (invalid start byte at byte 0)"),
    (b'{"a": "caf\xe9"}\r\n', "not UTF-8 (invalid continuation byte at byte 10)"),
    (b"{}\xe2\x82\r\n", "not UTF-8 (unexpected end of data at byte 2)"),
    # a message frame after a byte order mark: the JavaScript bridge's decoder dropped the
    # mark and answered it (the Python bridge refused it, as docs/protocol.md says)
    (b"\xef\xbb\xbf" + message_frame(message("after a BOM")), BOM_PROBLEM),
    (b'{"type": "message", "payload": {"from": "x"\n', "not JSON"),
    # NaN is not JSON: JSON.parse refused the line, the Python bridge handled the message
    (message_frame(message("x")).replace(b'"payload":"x"', b'"payload":[NaN]'), "not JSON"),
]


@pytest.mark.parametrize("lang", LANGS)
async def test_invalid_lines_are_reported_on_stderr_and_skipped(lang: str) -> None:
    async with open_child(echo_command(lang)) as child:
        register = await child.register()
        await child.write(*(line for line, _ in INVALID_LINES), b"\n", b"   \r\n")
        msg = message("still alive")
        response = await child.response_to(msg)
        assert response["payload"] == "still alive"
        assert_response_to(response, msg, register)
        await child.write(SHUTDOWN)
        assert await child.rest() == []
        assert await child.wait() == 0
    lines = child.stderr_lines()
    # Exactly one stderr line per invalid line, naming the line number and the problem;
    # blank lines are not frames and are ignored silently.
    assert len(lines) == len(INVALID_LINES), lines
    for number, (line, (_, problem)) in enumerate(zip(lines, INVALID_LINES, strict=True), 1):
        assert line.startswith(f"nexus-bridge[echo]: skipped input line {number}: "), line
        assert problem in line, (problem, line)


@pytest.mark.parametrize("lang", LANGS)
async def test_a_line_nested_too_deeply_is_skipped_and_the_agent_goes_on(lang: str) -> None:
    """Regression: a line nested deeper than Python's JSON parser goes (RecursionError)
    crashed the Python bridge (exit 1); with ``"cancel"`` in it, the input thread that
    looks for cancel frames died of it instead, and the bridge stopped as at end of input
    (exit 0, the next message never answered). Now it is an unusable line like any other."""
    depth = 100_000
    async with open_child(echo_command(lang)) as child:
        await child.register()
        for inner in ('"cancel"', "0"):
            await child.write(f"{'[' * depth}{inner}{']' * depth}\n".encode())
            assert (await child.response_to(message(inner)))["payload"] == inner
        await child.write(SHUTDOWN)
        assert await child.rest() == []
        assert await child.wait() == 0
    lines = child.stderr_lines()
    assert len(lines) == 2, lines
    for number, line in zip((1, 3), lines, strict=True):  # each followed by a message
        assert line.startswith(f"nexus-bridge[echo]: skipped input line {number}: "), line


@pytest.mark.parametrize("lang", LANGS)
async def test_message_frame_with_missing_fields_still_gets_an_error_answer(lang: str) -> None:
    async with open_child(echo_command(lang)) as child:
        await child.register()
        await child.write(
            b'{"type":"message","payload":{"id":"m-1","from":"x","kind":"Command"}}\n'
        )
        assert await child.frame() == {
            "type": "error",
            "payload": {
                "reply_to": "m-1",
                "error": "invalid message frame: missing field(s) to, payload",
                "error_type": "InvalidFrame",
            },
        }
        await child.write(
            b'{"type":"message","payload":{"id":"m-2","from":"x","to":"y",'
            b'"kind":"Shout","payload":1}}\n'
        )
        frame = await child.frame()
        assert frame["type"] == "error"
        assert frame["payload"]["reply_to"] == "m-2"
        assert "unknown kind" in frame["payload"]["error"]
        await child.close_stdin()
        assert await child.wait() == 0
    assert len(child.stderr_lines()) == 2


@pytest.mark.parametrize("lang", LANGS)
async def test_stdout_carries_only_frames_when_the_handler_prints(
    lang: str, tmp_path: Path
) -> None:
    async with open_child(probe_command(lang, tmp_path)) as child:
        register = await child.register()
        msg = message({"do": "print"})
        response = await child.response_to(msg)
        assert response["payload"] == "printed"
        assert_response_to(response, msg, register)
        await child.write(SHUTDOWN)
        assert await child.rest() == []
        assert await child.wait() == 0
    # Every byte on stdout belonged to a frame; the stray output went to stderr.
    stdout_lines = child.raw_stdout.decode().splitlines()
    assert [json.loads(line)["type"] for line in stdout_lines] == ["register", "response"]
    stray = [line for line in child.stderr_lines() if line.startswith("stray")]
    if lang == "python":
        assert sorted(stray) == sorted(
            ["stray print", "stray sys.stdout.write", "stray os.write", "stray child process"]
        )
    else:
        assert stray == ["stray console.log", "stray console.info", "stray process.stdout.write"]


@pytest.mark.parametrize("lang", LANGS)
async def test_ping_is_answered_with_pong(lang: str) -> None:
    async with open_child(echo_command(lang)) as child:
        await child.register()
        await child.write(b'{"type":"ping","payload":{"id":"p-1"}}\n')
        assert await child.frame() == {"type": "pong", "payload": {"id": "p-1"}}
        await child.write(b'{"type":"ping","payload":{"id":"p-2"}}\n')
        assert await child.frame() == {"type": "pong", "payload": {"id": "p-2"}}
        await child.close_stdin()
        assert await child.wait() == 0


async def poll_until(predicate: Any) -> None:
    """Poll (real time: a child process is involved) until ``predicate()``."""
    with trio.fail_after(TIMEOUT):
        while not predicate():  # noqa: ASYNC110 (the state is another process's)
            await trio.sleep(0.01)


def cancel_frame(msg: Message) -> bytes:
    payload = {"message_id": str(msg.id), "conversation_id": str(msg.conversation_id or msg.id)}
    return json.dumps({"type": "cancel", "payload": payload}).encode() + b"\n"


@pytest.mark.parametrize("lang", LANGS)
async def test_cancel_frame_stops_the_message_being_handled_and_it_is_answered_cancelled(
    lang: str, tmp_path: Path
) -> None:
    """A ``cancel`` for the message being handled reaches the handler while it runs (polled
    ``cancelled``, a cancelled ``async def``, an aborted ``signal``): it is answered at
    once with an ``error`` frame ``Cancelled``, and the agent goes on. A cancel for another
    message changes nothing; one that comes before its message means it is not handled."""
    async with open_child(probe_command(lang, tmp_path)) as child:
        register = await child.register()
        assert register["features"] == ["cancel"]
        for started, work in enumerate(("spin", "async_sleep"), start=1):
            msg = message({"do": work}, kind=MessageKind.QUERY)
            await child.write(msg, cancel_frame(message("other")))
            # the handler is running
            await poll_until(lambda n=started: child.stderr_lines().count("working") == n)
            start = trio.current_time()
            await child.write(cancel_frame(msg))
            frame = await child.frame()
            assert trio.current_time() - start < 20  # not the handler's 60 s
            assert frame["type"] == "error", frame
            assert frame["payload"]["reply_to"] == str(msg.id)
            assert frame["payload"]["error_type"] == "Cancelled"
            # The next message is handled as usual: the cancel was for that one only.
            assert (await child.response_to(message({"do": "echo", "value": work})))[
                "payload"
            ] == work
        early = message({"do": "echo", "value": "never"})
        await child.write(cancel_frame(early), early)
        frame = await child.frame()
        assert (frame["type"], frame["payload"]["reply_to"]) == ("error", str(early.id))
        assert frame["payload"]["error_type"] == "Cancelled"
        # A cancel line the bridge skips cancels nothing. (Regression: the input readers
        # looked for cancels more leniently than the main loops read lines: Python's
        # json.loads(bytes) skips a byte order mark, Node's Buffer.toString replaces
        # bytes that are not UTF-8; such a cancel was skipped, and still cancelled.)
        for old, new in ((b"{", b"\xef\xbb\xbf{"), (b'"type"', b'"\xff": 1, "type"')):
            kept = message({"do": "echo", "value": "kept"})
            await child.write(cancel_frame(kept).replace(old, new, 1))
            assert (await child.response_to(kept))["payload"] == "kept"
        await child.write(SHUTDOWN)
        assert await child.rest() == []
        assert await child.wait() == 0
    cancelled = [line for line in child.stderr_lines() if line.endswith(" cancelled")]
    assert len(cancelled) == 2
    skipped = [line for line in child.stderr_lines() if "skipped input line" in line]
    assert len(skipped) == 2, skipped
    assert f"{BOM_PROBLEM}: " in skipped[0] and "not UTF-8" in skipped[1], skipped


#: what the bridges read ahead of the line being handled, at most, plus the pipe's and
#: the stream's own buffers
READ_AHEAD_BOUND = 3 << 20


@pytest.mark.parametrize("lang", LANGS)
async def test_input_read_ahead_while_a_handler_runs_is_bounded(lang: str, tmp_path: Path) -> None:
    """Regression: in protocol 2 the bridges read their input on while a handler runs (to
    see ``cancel`` frames), into a buffer without bound: a flood of frames written then
    was all taken into memory (the writer never blocked). Now the reader stops once about
    1 MiB is waiting, so the writer waits (backpressure, as in protocol 1); nothing is
    lost: every frame is handled, in order, once the handler is done."""
    flag = tmp_path / "go"
    pings = [f"{n:08d}{'x' * 1000}" for n in range(8 * 1024)]  # 8 MiB of ping frames
    flood = b"".join(
        json.dumps({"type": "ping", "payload": {"id": ping}}).encode() + b"\n" for ping in pings
    )
    async with open_child(probe_command(lang, tmp_path)) as child:
        await child.register()
        work = message({"do": "wait_file", "path": str(flag)}, kind=MessageKind.QUERY)
        await child.write(work)
        await poll_until(lambda: "working" in child.stderr_lines())
        assert child.process.stdin is not None
        fd = child.process.stdin.fileno()
        sent = 0
        stalled = trio.current_time()
        # Write until the child stops taking more for a second (or has taken it all).
        while sent < len(flood) and trio.current_time() - stalled < 1.0:
            try:
                sent += os.write(fd, flood[sent : sent + 65536])
                stalled = trio.current_time()
            except BlockingIOError:
                await trio.sleep(0.01)
        assert sent <= READ_AHEAD_BOUND, f"{sent} bytes taken while a handler ran"
        flag.touch()

        async def write_the_rest() -> None:
            await child.write(flood[sent:], SHUTDOWN)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_the_rest)
            response = await child.frame()
            assert (response["type"], response["payload"]["reply_to"]) == ("response", str(work.id))
            assert [frame["payload"]["id"] for frame in await child.rest()] == pings
        assert await child.wait() == 0


async def test_python_send_of_a_lone_surrogate_is_refused_in_the_caller(tmp_path: Path) -> None:
    """Regression: json.dumps writes a lone surrogate (a file name that is not UTF-8, read
    with surrogateescape) as an escape the kernel refuses, so a ``send()`` of one wrote a
    line that failed the message being handled; it raises a TypeError saying where in the
    caller, as the Node bridge does. A character outside the BMP (a valid pair) goes.
    So does a payload nested deeper than the recursion limit: its RecursionError went
    through ``send()`` as it was, not as the TypeError of a payload refused."""
    async with open_child(probe_command("python", tmp_path)) as child:
        await child.register()
        response = await child.response_to(message({"do": "send_lone_surrogate"}))
        assert response["payload"] == (
            "send() payload is not JSON serialisable: string with a lone surrogate at .text"
            " (half of a surrogate pair: not Unicode text)"
        )
        response = await child.response_to(message({"do": "pair"}))
        assert response["payload"] == "x\U0001f600"
        response = await child.response_to(message({"do": "send_deep"}))
        assert response["payload"] == (
            "send() payload is not JSON serialisable: nested 100,001 levels deep, past the JSON"
            " writer's recursion limit"
        ), response
        await child.close_stdin()
        assert await child.wait() == 0


@pytest.mark.parametrize("lang", LANGS)
async def test_agent_initiated_send_frame(lang: str, tmp_path: Path) -> None:
    async with open_child(probe_command(lang, tmp_path)) as child:
        await child.register()
        trace = str(uuid.uuid4())
        msg = message(
            {
                "do": "send",
                "to": "calculator",
                "kind": "Event",
                "payload": {"operation": "add", "a": 1, "b": 2},
                "trace_id": trace,
            }
        )
        await child.write(msg)
        assert await child.frame() == {
            "type": "send",
            "payload": {
                "to": "calculator",
                "kind": "Event",
                "payload": {"operation": "add", "a": 1, "b": 2},
                "trace_id": trace,
            },
        }
        response = await child.frame()
        assert response["type"] == "response"
        assert response["payload"]["payload"] == "sent"
        # A bad send is the handler's error, reported for that message.
        bad = message({"do": "send", "to": "x", "kind": "Shout", "payload": 1})
        await child.write(bad)
        frame = await child.frame()
        assert frame["type"] == "error"
        assert frame["payload"]["reply_to"] == str(bad.id)
        assert "unknown kind 'Shout'" in frame["payload"]["error"].replace('"', "'")
        # A trace id is free text, as in the original (Option<String>): kept as given.
        free_trace = message({"do": "send", "to": "x", "payload": 1, "trace_id": "t-1/A b"})
        await child.write(free_trace)
        frame = await child.frame()
        assert frame == {
            "type": "send",
            "payload": {"to": "x", "kind": "Command", "payload": 1, "trace_id": "t-1/A b"},
        }
        assert (await child.frame())["payload"]["payload"] == "sent"
        await child.close_stdin()
        assert await child.wait() == 0


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("variable", ["NEXUS_PROTOCOL", "NEXUS_KERNEL_PROTOCOL"])
async def test_protocol_1_mode_speaks_the_original_shapes(
    lang: str, variable: str, tmp_path: Path
) -> None:
    """Chosen by the agent (``NEXUS_PROTOCOL``), or by a kernel that speaks only 1
    (``NEXUS_KERNEL_PROTOCOL``: the bridges announce the lower of theirs and the kernel's
    and behave by it; read since the forty-fourth pass)."""
    env = {variable: "1", "NEXUS_AGENT_NAME": "old-timer"}
    async with open_child(probe_command(lang, tmp_path), env=env) as child:
        register = await child.register()
        assert set(register) == {"id", "name"}
        assert register["name"] == "old-timer"
        msg = message({"do": "echo", "value": {"x": 1}})
        response = await child.response_to(msg)
        assert set(response) == {"from", "to", "kind", "payload", "timestamp"}
        assert response["payload"] == {"x": 1}
        assert response["to"] == str(KERNEL_ID)
        assert response["from"] == register["id"]
        decoded = decode_message(response)  # the kernel can read it; it correlates by order
        assert decoded.reply_to is None
        failing = message({"do": "raise", "text": "boom"})
        response = await child.response_to(failing)
        expected_type = "ValueError" if lang == "python" else "RangeError"
        assert response["payload"] == {"error": "boom", "error_type": expected_type}
        assert "reply_to" not in response
        # Protocol 1 has no ping: reported and skipped like any unknown frame.
        await child.write(b'{"type":"ping","payload":{"id":"p"}}\n')
        # ... and no agent-initiated send: the handler's call fails for that message.
        sending = message({"do": "send", "to": "x", "payload": 1})
        response = await child.response_to(sending)
        assert response["payload"]["error"] == (
            "send() needs protocol 2; this agent speaks protocol 1"
        )
        await child.write(SHUTDOWN)
        assert await child.wait() == 0
    assert any("unknown frame type" in line and "ping" in line for line in child.stderr_lines())


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize(("kernel", "own", "announced"), [("3", None, 2), ("2", "1", None)])
async def test_a_later_kernel_leaves_the_bridge_s_own_protocol(
    lang: str, kernel: str, own: str | None, announced: int | None
) -> None:
    env = {"NEXUS_KERNEL_PROTOCOL": kernel, **({"NEXUS_PROTOCOL": own} if own else {})}
    async with open_child(echo_command(lang), env=env) as child:
        assert (await child.register()).get("protocol") == announced
        await child.close_stdin()
        assert await child.wait() == 0


@pytest.mark.parametrize("lang", LANGS)
async def test_agent_id_and_name_come_from_the_environment(lang: str) -> None:
    agent_id = str(uuid.uuid4())
    env = {"NEXUS_AGENT_ID": agent_id, "NEXUS_AGENT_NAME": "named-by-kernel"}
    async with open_child(echo_command(lang), env=env) as child:
        assert await child.register() == {
            "id": agent_id,
            "name": "named-by-kernel",
            "protocol": 2,
            "features": ["cancel"],
        }
        await child.close_stdin()
        assert await child.wait() == 0


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("NEXUS_PROTOCOL", "3"),
        ("NEXUS_AGENT_ID", "not-a-uuid"),
        ("NEXUS_KERNEL_PROTOCOL", "two"),
        ("NEXUS_KERNEL_PROTOCOL", "0"),
    ],
)
async def test_bad_environment_exits_2_naming_the_variable(
    lang: str, variable: str, value: str
) -> None:
    async with open_child(echo_command(lang), env={variable: value}) as child:
        assert await child.wait() == 2
        assert await child.rest() == []
    assert len(child.stderr_lines()) == 1
    assert variable in child.stderr_lines()[0]
    assert value in child.stderr_lines()[0]


PY_OWN_AGENT = """
import sys
from nexus_trio.bridges.python import BadEnvironment, NexusAgent, run_agent

class Mine(NexusAgent):
    pass

try:
    Mine()
except BadEnvironment as exc:
    print(type(exc).__name__, isinstance(exc, ValueError), exc.variable, exc.value, sep="|")
run_agent(Mine)
"""

JS_OWN_AGENT = """
const { BadEnvironment, NexusAgent, runMain } = require(%(bridge)s);

class Mine extends NexusAgent {}

try {
  new Mine();
} catch (err) {
  if (err instanceof BadEnvironment) {
    console.log([err.name, err instanceof RangeError, err.variable, err.value].join('|'));
  }
}
runMain(Mine);
"""


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize(
    ("variable", "value"),
    [("NEXUS_KERNEL_PROTOCOL", "two"), ("NEXUS_PROTOCOL", "3"), ("NEXUS_AGENT_ID", "x")],
)
async def test_a_script_that_builds_its_agent_gets_a_bad_environment_it_can_name(
    lang: str, variable: str, value: str, tmp_path: Path
) -> None:
    """Forty-fifth pass: an agent the user's script builds itself raised a plain
    ``ValueError`` (``RangeError``) on a bad ``NEXUS_*`` variable, and a script had no way to
    run it as the echo agent runs (a traceback and exit 1). Now the constructor raises
    :class:`BadEnvironment` (a ``ValueError``/``RangeError`` still) naming the variable and
    its value, and ``run_agent(TheClass)`` / ``runMain(TheClass)`` build it, report it in
    one line and exit 2. (On the old bridges: no ``BadEnvironment`` to import, exit 1.)"""
    if lang == "python":
        script = tmp_path / "mine.py"
        script.write_text(PY_OWN_AGENT)
        cmd = [sys.executable, str(script)]
        expected = f"BadEnvironment|True|{variable}|{value}"
    else:
        script = tmp_path / "mine.js"
        script.write_text(JS_OWN_AGENT % {"bridge": json.dumps(str(JS_BRIDGE))})
        cmd = [node_or_skip(), str(script)]
        expected = f"BadEnvironment|true|{variable}|{value}"
    async with open_child(cmd, env={variable: value}) as child:
        assert await child.text_lines() == [expected]
        assert await child.wait() == 2
    lines = child.stderr_lines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("nexus-bridge: ") and variable in lines[0] and value in lines[0]


@pytest.mark.parametrize("lang", LANGS)
async def test_agent_stops_cleanly_when_the_kernel_stops_reading_stdout(lang: str) -> None:
    async with open_child(echo_command(lang)) as child:
        await child.register()
        assert child.process.stdout is not None
        await child.process.stdout.aclose()
        # The answer to this message hits a closed pipe (EPIPE): on_stop, exit 0.
        with contextlib.suppress(trio.BrokenResourceError):  # the child may be gone already
            for _ in range(3):
                await child.write(message("into the void"))
                await trio.sleep(0.05)
        assert await child.wait() == 0
    lines = child.stderr_lines()
    assert len(lines) == 1, lines
    assert "nexus-bridge[echo]: the kernel stopped reading stdout" in lines[0]


@pytest.mark.parametrize("lang", LANGS)
async def test_frames_split_across_writes_and_batched_in_one_write(lang: str) -> None:
    first, second, third = (message({"part": n}) for n in range(3))
    data = message_frame(first) + message_frame(second)
    async with open_child(echo_command(lang)) as child:
        await child.register()
        # A frame arriving in pieces, the second glued to the first; then one more piece.
        for piece in (data[:7], data[7:150], data[150:], message_frame(third)[:-1]):
            await child.write(piece)
            await trio.sleep(0.02)  # pacing only: gives the pieces a chance to arrive apart
        await child.write(b"\n")
        frames = [await child.frame() for _ in range(3)]
        assert [f["payload"]["reply_to"] for f in frames] == [
            str(first.id),
            str(second.id),
            str(third.id),
        ]
        await child.close_stdin()
        assert await child.wait() == 0


@pytest.mark.parametrize("lang", LANGS)
async def test_a_thousand_messages_are_answered_in_order(lang: str) -> None:
    count = 1000
    messages = [message({"seq": n}) for n in range(count)]
    async with open_child(echo_command(lang)) as child:
        await child.register()

        async def feed() -> None:
            for start in range(0, count, 100):
                await child.write(*messages[start : start + 100])
            await child.write(SHUTDOWN)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)  # pipelined: writing and reading overlap
            frames = await child.rest()
        assert await child.wait() == 0
    assert [f["type"] for f in frames] == ["response"] * count
    assert [f["payload"]["reply_to"] for f in frames] == [str(m.id) for m in messages]
    assert [f["payload"]["payload"] for f in frames] == [{"seq": n} for n in range(count)]


# --- stdin/stdout that are files or ttys ------------------------------------------------


def _frames(messages: Iterable[Message]) -> bytes:
    return b"".join(message_frame(m) for m in messages)


def run_on_files(
    lang: str, stdin: BinaryIO, stdout: BinaryIO, stderr: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    """The echo agent of ``lang`` run to its end on open files as stdin and stdout (and
    the file named ``stderr`` as stderr; else a pipe, read)."""
    with contextlib.ExitStack() as files:
        return subprocess.run(
            echo_command(lang),
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE if stderr is None else files.enter_context(open(stderr, "wb")),
            timeout=TIMEOUT,
            check=False,
        )


@pytest.mark.parametrize("lang", LANGS)
def test_stdin_and_stdout_may_be_regular_files(lang: str, tmp_path: Path) -> None:
    msgs = [message({"n": n}) for n in range(3)]
    inbox, outbox = tmp_path / "in.ndjson", tmp_path / "out.ndjson"
    inbox.write_bytes(_frames(msgs))  # no shutdown: end of file stops the agent
    with inbox.open("rb") as stdin, outbox.open("wb") as stdout:
        done = run_on_files(lang, stdin, stdout)
    assert done.returncode == 0, done.stderr
    frames = [json.loads(line) for line in outbox.read_text().splitlines()]
    assert [f["type"] for f in frames] == ["register", "response", "response", "response"]
    assert [f["payload"]["reply_to"] for f in frames[1:]] == [str(m.id) for m in msgs]


@pytest.mark.parametrize("lang", LANGS)
def test_a_stdout_on_a_full_disk_stops_the_agent_saying_why_with_status_1(
    lang: str, tmp_path: Path
) -> None:
    """An agent run with its stdout on a full disk (``> /dev/full``: every write fails
    with ENOSPC) lost every frame it wrote. The Python bridge ended with a traceback
    (``OSError: [Errno 28] No space left on device`` from its register); the JavaScript
    bridge said the kernel had stopped reading and exited 0, as if nothing was lost. Now
    both say in one line that stdout cannot be written and why, and exit 1 (a closed
    pipe, the kernel gone, stays a clean stop: status 0)."""
    if not os.path.exists("/dev/full"):
        pytest.fail("this test needs /dev/full (Linux)")
    inbox = tmp_path / "in.ndjson"
    inbox.write_bytes(_frames([message({"n": 1})]))
    with inbox.open("rb") as stdin, open("/dev/full", "wb") as stdout:
        done = run_on_files(lang, stdin, stdout)
    assert done.returncode == 1
    said = done.stderr.decode().splitlines()
    assert len(said) == 1, said
    assert said[0].startswith("nexus-bridge[echo]: cannot write to stdout (")
    assert said[0].endswith("); stopping")
    assert "ENOSPC" in said[0] or "No space left on device" in said[0]


@pytest.mark.parametrize("lang", LANGS)
def test_a_stderr_on_a_full_disk_loses_the_bridge_s_lines_not_the_agent(
    lang: str, tmp_path: Path
) -> None:
    """An agent run with its stderr on a full disk (``2> /dev/full``) died at the first
    line the bridge wrote there (an input line it skipped): the Python bridge before it
    answered the next message, both with status 1. A line stderr cannot take is lost now,
    counted (``lines_not_logged``, ``linesNotLogged``), and the agent goes on."""
    if not os.path.exists("/dev/full"):
        pytest.fail("this test needs /dev/full (Linux)")
    msgs = [message({"n": n}) for n in range(2)]
    inbox, outbox = tmp_path / "in.ndjson", tmp_path / "out.ndjson"
    inbox.write_bytes(b"not a frame\n" + _frames(msgs[:1]) + b"\xff\n" + _frames(msgs[1:]))
    with inbox.open("rb") as stdin, outbox.open("wb") as stdout:
        done = run_on_files(lang, stdin, stdout, stderr="/dev/full")
    assert done.returncode == 0
    frames = [json.loads(line) for line in outbox.read_text().splitlines()]
    assert [f["type"] for f in frames] == ["register", "response", "response"]
    assert [f["payload"]["reply_to"] for f in frames[1:]] == [str(m.id) for m in msgs]


def _read_until(fd: int, needle: bytes, deadline: float) -> bytes:
    data = b""
    while needle not in data:
        ready, _, _ = select.select([fd], [], [], deadline)
        assert ready, f"timed out waiting for {needle!r}; got {data!r}"
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side of the pty is closed
            break
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("lang", LANGS)
def test_stdin_and_stdout_may_be_ttys(lang: str) -> None:
    in_master, in_slave = pty.openpty()
    out_master, out_slave = pty.openpty()
    process = subprocess.Popen(
        echo_command(lang), stdin=in_slave, stdout=out_slave, stderr=subprocess.PIPE
    )
    os.close(in_slave)
    os.close(out_slave)
    try:
        register = _read_until(out_master, b"\n", TIMEOUT)
        assert json.loads(register)["type"] == "register"
        msg = message("over a tty")
        os.write(in_master, message_frame(msg))
        response = json.loads(_read_until(out_master, b"\n", TIMEOUT))
        assert response["payload"]["payload"] == "over a tty"
        assert response["payload"]["reply_to"] == str(msg.id)
        os.write(in_master, SHUTDOWN)
        assert process.wait(timeout=TIMEOUT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stderr is not None
        process.stderr.close()
        os.close(in_master)
        os.close(out_master)


# --- the Python bridge: Python 3.9+, stdlib only, clean under strict runtime modes ----------


@pytest.mark.parametrize("path", [PY_BRIDGE, PY_EXAMPLE], ids=lambda p: p.name)
def test_python_sources_parse_as_python_3_9(path: Path) -> None:
    source = path.read_text()
    ast.parse(source, filename=str(path), feature_version=(3, 9))
    # Annotations are strings (PEP 563), so `X | None` in them is fine on 3.9; make sure no
    # module in the bridge is from outside the standard library.
    tree = ast.parse(source)
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
    }
    assert "__future__" in imported
    third_party = imported - set(sys.stdlib_module_names) - {"nexus_trio"}
    assert third_party == set()


async def test_python_bridge_is_clean_under_dev_mode_and_warnings_as_errors() -> None:
    # -X dev enables ResourceWarning and asyncio/debug checks; -W error makes any warning
    # fatal; -I isolates from the environment (the bridge needs only the stdlib).
    cmd = [sys.executable, "-X", "dev", "-W", "error", "-I", str(PY_BRIDGE)]
    async with open_child(cmd) as child:
        await child.register()
        assert (await child.response_to(message(1)))["payload"] == 1
        await child.write(SHUTDOWN)
        assert await child.wait() == 0
        assert await child.rest() == []
    assert child.stderr_lines() == []


async def test_python_bridge_command_line_options() -> None:
    cmd = [sys.executable, str(PY_BRIDGE), "--name", "mirror", "--protocol", "1"]
    async with open_child(cmd) as child:
        assert set(await child.register()) == {"id", "name"}
        await child.close_stdin()
        assert await child.wait() == 0


def bridge_program(lang: str) -> list[str]:
    """The bridge file run as a program; Node is installed wherever the suite runs."""
    if lang == "python":
        return [sys.executable, str(PY_BRIDGE)]
    assert NODE is not None, NODE_PROBLEM
    return [NODE, str(JS_BRIDGE)]


def run_bridge_program(lang: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*bridge_program(lang), *args],
        input="",  # at the end of input the echo agent, if it ran, would stop
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.mark.parametrize("lang", ["python", "node"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_bridge_program_prints_its_usage_for_help_and_runs_no_agent(lang: str, flag: str) -> None:
    """Regression: ``node nexus-bridge.js --help`` ran the echo agent (a ``register`` frame on
    stdout, exit 0 at the end of input). Both bridges print the same usage: the options of
    the echo agent, how to run it under a kernel and how to use the file as a library."""
    done = run_bridge_program(lang, flag)
    assert (done.returncode, done.stderr) == (0, "")
    text = done.stdout
    assert '"register"' not in text
    name = "python.py" if lang == "python" else "nexus-bridge.js"
    assert text.startswith(f"usage: {name} [-h] [--name NAME] [--protocol {{1,2}}]\n"), text
    assert "echo agent" in text
    assert "--name NAME       agent name (default: NEXUS_AGENT_NAME or 'echo')" in text
    assert "--protocol {1,2}  wire protocol version (default: NEXUS_PROTOCOL or 2)" in text
    if lang == "python":
        assert "nexus send 'python3 -m nexus_trio.bridges.python' '{\"hello\": 1}'" in text
        assert "handle_message(message)" in text and "run_agent()" in text
    else:
        assert "nexus send 'node path/to/nexus-bridge.js' '{\"hello\": 1}'" in text
        assert "require('./nexus-bridge.js')" in text and "handleMessage(message)" in text


def test_python_bridge_run_by_dash_m_names_itself_so_in_its_usage() -> None:
    """Regression (fifty-second pass): ``python3 -m nexus_trio.bridges.python --help`` (as
    its own help says to run it) said ``usage: python.py [-h] ...``, argparse's program
    name from the file, as did its usage errors. It names the command it was run by now;
    run as a file it keeps the file's name (the test above)."""
    python = os.path.basename(sys.executable)
    for args, status, stream in [(["--help"], 0, "stdout"), (["--protocol", "9"], 2, "stderr")]:
        done = subprocess.run(
            [sys.executable, "-m", "nexus_trio.bridges.python", *args],
            input="",
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert done.returncode == status, done.stderr
        said = " ".join(getattr(done, stream).split())
        usage = (
            f"usage: {python} -m nexus_trio.bridges.python [-h] [--name NAME] [--protocol {{1,2}}]"
        )
        assert said.startswith(usage), said
        assert "python.py" not in said
    assert said.endswith(
        f"{python} -m nexus_trio.bridges.python: error: argument --protocol: invalid choice:"
        " '9' (choose from '1', '2')"
    )


#: what both bridge programs say of ``--name ""`` (it fell back to the default name)
EMPTY_NAME = (
    "argument --name: must not be empty (leave it out for the default: NEXUS_AGENT_NAME or 'echo')"
)


@pytest.mark.parametrize("lang", ["python", "node"])
@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--name", "x", "extra"], "unrecognized arguments: extra"),
        (["--name"], "argument --name: expected one argument"),
        (["--protocol", "3"], "argument --protocol: invalid choice: '3' (choose from '1', '2')"),
        (["--name", ""], EMPTY_NAME),
        (["--name="], EMPTY_NAME),
    ],
    ids=["unknown-option", "argument", "no-value", "bad-protocol", "empty-name", "empty-name="],
)
def test_bridge_program_refuses_what_it_does_not_know_with_status_2(
    lang: str, args: list[str], said: str
) -> None:
    """Regression: ``node nexus-bridge.js --bogus`` ignored the option and ran the echo
    agent; both bridges exit 2 with the usage and the error naming what was wrong."""
    done = run_bridge_program(lang, *args)
    assert (done.returncode, done.stdout) == (2, "")
    name = "python.py" if lang == "python" else "nexus-bridge.js"
    assert done.stderr.splitlines() == [
        f"usage: {name} [-h] [--name NAME] [--protocol {{1,2}}]",
        f"{name}: error: {said}",
    ]


@pytest.mark.parametrize("lang", ["python", "node"])
@pytest.mark.parametrize(
    "args", [["--name", "mirror", "--protocol", "1"], ["--name=mirror", "--protocol=1"]]
)
def test_bridge_program_options_name_the_echo_agent_and_choose_its_protocol(
    lang: str, args: list[str]
) -> None:
    done = run_bridge_program(lang, *args)
    assert (done.returncode, done.stderr) == (0, "")
    frames = [json.loads(line) for line in done.stdout.splitlines()]
    assert [frame["type"] for frame in frames] == ["register"]
    assert frames[0]["payload"]["name"] == "mirror"
    assert set(frames[0]["payload"]) == {"id", "name"}  # protocol 1: no protocol field


def test_python_bridge_in_process_with_explicit_streams() -> None:
    import io

    from nexus_trio.bridges.python import EchoAgent, NexusAgent

    msg = message({"k": "v"})
    stdin = io.BytesIO(message_frame(msg) + b'{"type":"ping","payload":{"id":"x"}}\n' + SHUTDOWN)
    stdout, stderr = io.BytesIO(), io.StringIO()
    agent = EchoAgent(stdin=stdin, stdout=stdout, stderr=stderr)
    assert agent.run_agent() == 0
    frames = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert [f["type"] for f in frames] == ["register", "response", "pong"]
    assert frames[1]["payload"]["reply_to"] == str(msg.id)
    assert (agent.handled, agent.failed, agent.invalid_lines) == (1, 0, 0)
    assert stderr.getvalue() == ""
    with pytest.raises(RuntimeError, match="not running"):
        agent.send("someone", 1)  # after run_agent returned

    with pytest.raises(ValueError, match="protocol must be 1 or 2, got 5"):
        NexusAgent(protocol=5)
    with pytest.raises(ValueError, match="agent_id must be a UUID, got 'x'"):
        NexusAgent(agent_id="x")
    with pytest.raises(RuntimeError, match="not running"):
        NexusAgent().send("someone", 1)


def test_python_bridge_reads_its_lines_with_one_decoder_made_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fifty-second pass, review: the Python bridge's reader of its input lines,
    ``json.loads`` given ``parse_constant`` (to refuse NaN), made a ``json.JSONDecoder``
    for every line (+1.8 us a line). One decoder, made once, reads them; a line holding
    NaN is still reported and skipped."""
    import io

    from nexus_trio.bridges.python import EchoAgent

    made: list[object] = []
    init = json.JSONDecoder.__init__

    def counted(self: json.JSONDecoder, *args: Any, **kwargs: Any) -> None:
        made.append(kwargs.get("parse_constant"))
        init(self, *args, **kwargs)

    frames = b"".join(message_frame(message({"i": i})) for i in range(20))
    nan = b'{"type":"ping","payload":NaN}\n'
    stdin = io.BytesIO(frames + nan + SHUTDOWN)
    stdout, stderr = io.BytesIO(), io.StringIO()
    agent = EchoAgent(stdin=stdin, stdout=stdout, stderr=stderr)
    monkeypatch.setattr(json.JSONDecoder, "__init__", counted)
    assert agent.run_agent() == 0
    monkeypatch.undo()
    assert made == []
    answers = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert [f["type"] for f in answers] == ["register"] + ["response"] * 20
    assert (agent.handled, agent.invalid_lines) == (20, 1)
    assert "JSON has no NaN or Infinity: it holds NaN" in stderr.getvalue()


def test_python_bridge_refuses_a_number_out_of_range_as_not_json() -> None:
    """Fifty-second pass, review: a message frame holding ``1e999`` (JSON, too large for
    a double) was handled by the Python bridge, its handler given ``inf``, which no answer
    can hold. The line is not JSON now, as for the kernel (and serde_json: "number out
    of range"): reported once and skipped; ``1e-999`` (read as 0) is handled."""
    import io

    from nexus_trio.bridges.python import EchoAgent

    big = message_frame(message("x")).replace(b'"payload":"x"', b'"payload":[-1e999]')
    small = message(["tiny"])
    tiny = message_frame(small).replace(b'["tiny"]', b"[1e-999]")
    stdin = io.BytesIO(big + tiny + SHUTDOWN)
    stdout, stderr = io.BytesIO(), io.StringIO()
    agent = EchoAgent(stdin=stdin, stdout=stdout, stderr=stderr)
    assert agent.run_agent() == 0
    answers = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert [f["type"] for f in answers] == ["register", "response"]
    assert answers[1]["payload"]["payload"] == [0.0]
    assert answers[1]["payload"]["reply_to"] == str(small.id)
    assert (agent.handled, agent.invalid_lines) == (1, 1)
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert "skipped input line 1: not JSON (number out of range: -1e999)" in lines[0]


@pytest.mark.parametrize("lang", LANGS)
async def test_a_number_out_of_range_is_not_json_to_either_bridge(lang: str) -> None:
    """Fifty-third pass: the JavaScript bridge read ``1e999`` as ``Infinity`` (JSON.parse
    does) and handed it to the handler, where the kernel and the Python bridge refuse the
    line ("number out of range"). Both bridges refuse it now, naming the literal, each line
    counted once; ``1e-999`` (read as 0) and the string ``"1e999"`` are handled. A number
    with 400 digits is an int to Python (kept whole) and too large for a double to
    JavaScript (refused there). The JavaScript bridge, which has read such a ``message``
    frame whole, also answers it with an ``error`` frame, as one with bad fields (the
    Python bridge's reader stops at the number: it has no frame to answer)."""
    refused = ["-1e999", "1E+400", "1" * 250 + "e99"]
    if lang == "node":
        refused.append("1" + "0" * 400)
    ids: list[str] = []
    async with open_child(echo_command(lang)) as child:
        await child.register()
        for literal in refused:
            msg = message("x")
            ids.append(str(msg.id))
            frame = message_frame(msg).replace(
                b'"payload":"x"', b'"payload":[7,%s]' % literal.encode()
            )
            await child.write(frame)
        if lang == "node":
            for msg_id, literal in zip(ids, refused, strict=True):
                error = await child.frame()
                assert error["type"] == "error", error
                assert error["payload"]["reply_to"] == msg_id, error
                assert error["payload"]["error_type"] == "InvalidFrame", error
                shown = literal if len(literal) <= 40 else f"{literal[:40]}..."
                said = f"not JSON (number out of range: {shown}): "
                assert error["payload"]["error"].startswith(said), error
        tiny = message(["tiny"])
        await child.write(message_frame(tiny).replace(b'["tiny"]', b'[1e-999,"1e999"]'))
        response = await child.frame()
        assert response["type"] == "response", response
        assert (response["payload"]["reply_to"], response["payload"]["payload"]) == (
            str(tiny.id),
            [0, "1e999"],
        )
        await child.write(SHUTDOWN)
        assert await child.rest() == []
        assert await child.wait() == 0
    lines = child.stderr_lines()
    assert len(lines) == len(refused), lines
    for number, (line, literal) in enumerate(zip(lines, refused, strict=True), 1):
        shown = literal if len(literal) <= 40 else f"{literal[:40]}..."
        said = f"skipped input line {number}: not JSON (number out of range: {shown})"
        assert said in line, (said, line)


async def test_a_js_agent_answers_a_message_holding_an_integer_no_double_holds() -> None:
    """Fifty-third pass review: the kernel writes a Python int of 400 digits as it is
    (valid JSON, which the Python bridge reads whole), and the JavaScript bridge, refusing
    it since this pass (no double holds it), skipped the line unanswered: the request
    waited out the handle timeout (``handler_timeout``), and the child, which never saw
    the message, did not answer its cancel and was replaced (killed). It now answers an
    ``error`` frame, as for a message frame with bad fields: the message fails at once
    (``handler_error``, naming the number) and the same child serves the next one."""
    node_or_skip()
    from nexus_trio import DeadLetterReason, RequestFailed, open_kernel
    from nexus_trio.bridges.process import bridge_stats, process_agent
    from nexus_trio.testing import dead_letters

    with trio.fail_after(TIMEOUT * 2):
        async with open_kernel() as kernel:
            ref = kernel.spawn(
                process_agent(echo_command("node"), name="echo", handle_timeout=TIMEOUT / 2)
            )
            assert await kernel.request("echo", [1]) == [1]
            with trio.fail_after(TIMEOUT / 4), pytest.raises(RequestFailed) as failed:
                await kernel.request("echo", [7, 10**400])
            assert failed.value.reason == "handler_error"
            said = "InvalidFrame: not JSON (number out of range: 1" + "0" * 39 + "...): "
            assert said in str(failed.value.error), failed.value.error
            assert await kernel.request("echo", [2]) == [2]
            stats = bridge_stats(kernel)[ref.id]
            assert (stats.starts, stats.replaced, stats.cancels_sent) == (1, 0, 0)
            assert [d.reason for d in dead_letters(kernel)] == [DeadLetterReason.HANDLER_ERROR]


def test_python_bridge_says_how_deep_a_line_too_deep_for_json_is() -> None:
    """Fifty-third pass: an input line nested deeper than Python's JSON reader goes was
    said as ``JSON nested too deeply: '[[[...'``, in words of its own (the other lines
    that are no JSON say ``not JSON (...)``) and naming no depth. Now it is ``not JSON
    (nested 100,000 levels deep, ...)``, the brackets in its strings not counted; each
    such line counted once, the next message handled."""
    import io

    from nexus_trio.bridges.python import EchoAgent

    deep = b"[" * 100_000 + b"]" * 100_000 + b"\n"
    nested = b'{"a": "[[[{{", "b": ' + b'{"c": ' * 3_000 + b"1" + b"}" * 3_001 + b"\n"
    after = message("after")
    stdin = io.BytesIO(deep + nested + message_frame(after) + SHUTDOWN)
    stdout, stderr = io.BytesIO(), io.StringIO()
    agent = EchoAgent(stdin=stdin, stdout=stdout, stderr=stderr)
    assert agent.run_agent() == 0
    answers = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert [f["type"] for f in answers] == ["register", "response"]
    assert answers[1]["payload"]["reply_to"] == str(after.id)
    assert (agent.handled, agent.invalid_lines) == (1, 2)
    past = "levels deep, past the JSON reader's recursion limit"
    assert stderr.getvalue().splitlines() == [
        f"nexus-bridge[echo]: skipped input line 1: not JSON (nested 100,000 {past}): {'[' * 60!r}",
        f"nexus-bridge[echo]: skipped input line 2: not JSON (nested 3,001 {past}): "
        f"{nested.decode()[:60]!r}",
    ]


def test_naming_the_depth_of_a_too_deep_line_takes_no_python_step_per_byte() -> None:
    """Fifty-fourth pass: saying how deep a line too deep for the JSON reader nests (on the
    kernel's event loop, for a child's line) took a step of Python per bracket: a 1 MiB
    ``[[[...`` held the loop 120-150 ms. It is C passes over the bytes now, Python stepping
    once per 4,096 brackets (5 ms for that line); the depth is the same, strings skipped."""
    from types import FrameType

    from nexus_trio.bridges.python import too_deep

    past = "levels deep, past the JSON reader's recursion limit"
    mib = 1 << 20
    lines = {
        b"[" * mib: mib,
        b"[" * (mib // 2) + b"]" * (mib // 2): mib // 2,
        b'{"a": ' * 100_000 + b"1" + b"}" * 100_000: 100_000,
        b"[" * 3_000 + b'"[\\\\\\"[",' * 50_000 + b"]": 3_000,
        b'[[{"x": "]]]"}, [' * 20_000: 60_000,
    }
    steps = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal steps
        if frame.f_code is too_deep.__code__:
            steps += event == "line"
            return tracer
        return None

    previous = sys.gettrace()
    for line, depth in lines.items():
        steps = 0
        sys.settrace(tracer)
        try:
            text = too_deep(line)
        finally:
            sys.settrace(previous)
        assert text == f"nested {depth:,} {past}", text
        assert text == too_deep(line.decode()), "said differently of the line as text"
        assert steps < len(line) // 100, (depth, steps, len(line))


def _depth_by_a_plain_walk(line: bytes) -> int:
    """How deep ``line`` nests, byte by byte as a JSON reader takes it: outside a string
    a quote opens one and brackets count; inside, a backslash escapes the next byte and a
    quote closes it (one left open runs to the end)."""
    depth = deepest = 0
    inside = escaped = False
    for byte in line:
        if inside:
            if escaped:
                escaped = False
            elif byte == ord("\\"):
                escaped = True
            elif byte == ord('"'):
                inside = False
        elif byte == ord('"'):
            inside = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


#: pieces of a JSON-shaped line: brackets, what is between them, and strings as a JSON
#: writer writes them (escaped quotes and backslashes, brackets, \u0022, any Unicode),
#: one with bytes that are not UTF-8 in it, one left open at the end of the line
_JSON_PIECES = st.one_of(
    st.sampled_from([b"[", b"]", b"{", b"}", b",", b":", b"1", b" ", b"[[", b"]]"]),
    st.text(alphabet=st.sampled_from('"\\[]{}a,é\u2028\U0001f600'), max_size=8).map(
        lambda text: json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")
    ),
    st.sampled_from([b'"\\u0022[\\\\"', b'"\xff[\xc3"', b'"\\\\\\"]"', b'",\\"kind\\":["']),
)
_JSON_SHAPED = st.tuples(
    st.lists(_JSON_PIECES, max_size=40).map(b"".join),
    st.sampled_from([b"", b'"', b'"[\\', b'"[{\\"']),
).map(b"".join)


@settings(max_examples=600, deadline=None)
@given(line=_JSON_SHAPED, deep=st.integers(0, 5_000))
def test_too_deep_says_the_depth_a_plain_walk_finds(line: bytes, deep: int) -> None:
    """Fifty-fourth pass review: :func:`too_deep` (C passes over the bytes, runs of 4,096
    brackets) says the depth that a plain byte-by-byte walk of a JSON reader's states
    finds, for JSON-shaped lines: strings with escaped quotes and backslashes (``\\\\``
    before a quote), brackets and ``\\u0022`` inside strings, any Unicode, bytes not
    UTF-8 inside a string, a string left open at the end; and the same of the line as
    text. (A line with a backslash outside a string, no JSON, may be said otherwise:
    docs/protocol.md.)"""
    from nexus_trio.bridges.python import too_deep

    line = b"[" * deep + line
    said = too_deep(line)
    expected = _depth_by_a_plain_walk(line)
    assert said == f"nested {expected:,} levels deep, past the JSON reader's recursion limit"
    with contextlib.suppress(UnicodeDecodeError):
        assert too_deep(line.decode("utf-8")) == said


def test_python_bridge_says_the_depth_of_a_shared_part_where_it_is_deepest() -> None:
    """Fifty-fourth pass review: the depth said of a result too deep for the JSON writer
    was found entering each list, dict and tuple once, and one met again (a part the
    result holds in two places) was skipped: a part 2,001 deep held at the top and 50
    levels down was said ``nested 2,002 levels deep``, as the JSON writer writes it
    there, it is 2,052. Each part's depth is kept and counted where it is met again."""
    import io

    from nexus_trio.bridges.python import NexusAgent

    class Shared(NexusAgent):
        def handle_message(self, message: Any) -> Any:
            shared: list[Any] = []
            inner = shared
            for _ in range(2_000):
                inner.append([])
                inner = inner[0]
            result: list[Any] = [shared]
            inner = result
            for _ in range(50):
                inner.append([])
                inner = inner[-1]
            inner.append(shared)
            return result

    stdin = io.BytesIO(message_frame(message("x")) + SHUTDOWN)
    stdout, stderr = io.BytesIO(), io.StringIO()
    agent = Shared(name="shared", stdin=stdin, stdout=stdout, stderr=stderr)
    assert agent.run_agent() == 0
    answers = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert [f["type"] for f in answers] == ["register", "error"]
    assert answers[1]["payload"]["error"] == (
        "result of handle_message is not JSON serialisable: nested 2,052 levels deep,"
        " past the JSON writer's recursion limit"
    )


_BRACKETS_ONLY = st.lists(
    st.one_of(
        st.sampled_from([b"[", b"]", b"[]", b"][", b"[[", b"]]"]),
        st.tuples(st.integers(1, 40), st.integers(1, 30)).map(
            lambda shape: (b"[" * shape[0] + b"]" * shape[0]) * shape[1]
        ),
        st.integers(1, 3_000).map(lambda n: b"[" * n),
        st.integers(1, 3_000).map(lambda n: b"]" * n),
    ),
    max_size=30,
).map(b"".join)


@settings(max_examples=800, deadline=None)
@given(line=_BRACKETS_ONLY)
def test_too_deep_says_the_depth_a_plain_walk_finds_of_any_brackets(line: bytes) -> None:
    """Fifty-fifth pass: the depth is read by passes that take every innermost ``[]``
    out, then at the ``[]`` left; it is the plain walk's for any run of brackets, blocks
    of every depth repeated, lines that open without closing and lines that close more
    than they open (no JSON: below where they started) alike."""
    from nexus_trio.bridges.python import too_deep

    said = too_deep(line)
    expected = _depth_by_a_plain_walk(line)
    assert said == f"nested {expected:,} levels deep, past the JSON reader's recursion limit"


def test_naming_the_depth_of_the_costliest_lines_takes_a_few_python_steps() -> None:
    """Fifty-fifth pass: the costliest lines to name the depth of (1 MiB of ``[],``, of
    ``"``, of ``[[],[[]]],``, of 17-deep blocks, after 2,000 ``[``) took the kernel's
    event loop 57-130 ms (a run of 4,096 brackets split at each ``]``, a piece each;
    Python stepping once a run: 1,000-2,000 steps). Passes that take the innermost
    ``[]`` out, then a split at the ``[]`` left, take 10-40 ms (under a load of 20 on
    2 cores) and a few dozen steps of Python a line, each a pass of C over it."""
    from types import FrameType

    from nexus_trio.bridges import python as bridge

    mib = 1 << 20
    start = b"[" * 2_000
    lines = [
        start + b"[]," * (mib // 3),
        start + b'"' * mib,
        start + b"[[],[[]]]," * (mib // 10),
        start + (b"[" * 17 + b"]" * 17) * (mib // 34),
        start + b"[a]" * (mib // 3),
        start + b"][" * (mib // 2),
    ]
    steps = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal steps
        if frame.f_code.co_filename == bridge.__file__:
            steps += event == "line"
            return tracer
        return None

    for line in lines:
        expected = _depth_by_a_plain_walk(line)
        steps = 0
        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            said = bridge.too_deep(line)
        finally:
            sys.settrace(previous)
        assert said == f"nested {expected:,} levels deep, past the JSON reader's recursion limit"
        assert steps < 300, (line[2_000:2_020], steps)


def test_a_too_deep_line_with_a_backslash_outside_strings_is_named_not_json() -> None:
    """Fifty-fifth pass (a check): of a too-deep line with a backslash outside any string
    (no JSON), ``\\"`` is taken as an escaped quote, as inside a string, so the depth said
    may differ from a JSON reader's walk (which opens a string there: 3,000 below, not
    3,002). The error is still the named one, ``not JSON (nested N levels deep, ...)``,
    counted once, and the next message is answered."""
    import io

    from nexus_trio.bridges.python import EchoAgent

    odd = b"[" * 3_000 + b'\\"[[' + b"\n"
    after = message("after")
    stdin = io.BytesIO(odd + message_frame(after) + SHUTDOWN)
    stdout, stderr = io.BytesIO(), io.StringIO()
    agent = EchoAgent(stdin=stdin, stdout=stdout, stderr=stderr)
    assert agent.run_agent() == 0
    answers = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert [f["type"] for f in answers] == ["register", "response"]
    assert (agent.handled, agent.invalid_lines) == (1, 1)
    assert _depth_by_a_plain_walk(odd) == 3_000
    assert stderr.getvalue().splitlines() == [
        "nexus-bridge[echo]: skipped input line 1: not JSON (nested 3,002 levels deep, past"
        f" the JSON reader's recursion limit): {'[' * 60!r}"
    ]


@pytest.mark.parametrize("protocol", [1, 2])
def test_a_message_frame_too_deep_for_json_is_answered_at_once(protocol: int) -> None:
    """Fifty-fourth pass: a ``message`` frame whose payload nests deeper than the Python
    bridge's JSON reader goes (a kernel whose recursion limit is higher wrote it) was
    skipped unanswered: no id could be read, and the kernel waited out the handle
    timeout, then replaced the child. Its fields beside the payload are read as the kernel
    writes them (``from`` first, then ``to``, ``payload``, ``kind``, ``id``, ...), and
    it is answered at once with an ``error`` (``InvalidFrame``, its depth said); in
    protocol 1 the error response carries the conversation id the kernel matches by."""
    import io

    from nexus_trio.bridges.python import EchoAgent

    deep = message("DEEP", conversation_id=uuid.uuid4(), trace_id=uuid.uuid4())
    # (a dict in the payload has a "kind" and an "id" too: not taken for the frame's)
    inner = b'{"kind":"Event","id":"not-it","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    frame = message_frame(deep).replace(b'"payload":"DEEP"', b'"payload":[' + inner + b"]")
    after = message("after")
    stdin = io.BytesIO(frame + message_frame(after) + SHUTDOWN)
    stdout, stderr = io.BytesIO(), io.StringIO()
    agent = EchoAgent(protocol=protocol, stdin=stdin, stdout=stdout, stderr=stderr)
    assert agent.run_agent() == 0
    answers = [json.loads(line) for line in stdout.getvalue().splitlines()]
    said = "not JSON (nested 100,004 levels deep, past the JSON reader's recursion limit)"
    assert (agent.handled, agent.invalid_lines) == (1, 1)
    if protocol == 2:
        assert [f["type"] for f in answers] == ["register", "error", "response"]
        error = answers[1]["payload"]
        assert (error["reply_to"], error["error_type"]) == (str(deep.id), "InvalidFrame")
        assert error["error"].startswith(said), error
        assert answers[2]["payload"]["reply_to"] == str(after.id)
    else:
        assert [f["type"] for f in answers] == ["register", "response", "response"]
        error = answers[1]["payload"]
        assert error["to"] == str(KERNEL_ID)
        assert error["conversation_id"] == str(deep.conversation_id)
        assert error["trace_id"] == str(deep.trace_id)
        assert error["payload"]["error_type"] == "InvalidFrame"
        assert error["payload"]["error"].startswith(said), error
        assert answers[2]["payload"]["payload"] == "after"
    assert stderr.getvalue().count(said) == 1, stderr.getvalue()


async def test_a_too_deep_line_ending_in_escaped_quotes_is_said_at_once() -> None:
    """Fifty-third pass review: what a line too deep for the JSON reader is (its depth,
    its strings skipped) was found with a regex that, failing on an unterminated string,
    tried again from each quote after it, the escaped ones too: ``[`` 2,000 times, then
    ``"\\`` 100,000 times (``"\\"\\"\\...``, 200 KB) took the Python bridge's reader (and the
    kernel's event loop, which says a child's such line with the same function) minutes
    to hours (quadratic: 15 s for 34 KB). It is said at once now, an unterminated string's
    brackets not counted, and the next message answered."""
    deep = b"[" * 2_000 + b'"\\' * 100_000 + b"\n"
    open_string = b"[" * 3_000 + b'"[[[[' + b"\n"
    after = message("after")
    async with open_child(echo_command("python")) as child:
        await child.register()
        await child.write(deep + open_string + message_frame(after))
        response = await child.frame()  # (the harness's step: TIMEOUT)
        assert (response["type"], response["payload"]["reply_to"]) == ("response", str(after.id))
        await child.write(SHUTDOWN)
        assert await child.rest() == []
        assert await child.wait() == 0
    past = "levels deep, past the JSON reader's recursion limit"
    lines = child.stderr_lines()
    assert len(lines) == 2, lines
    assert f"skipped input line 1: not JSON (nested 2,000 {past})" in lines[0], lines[0]
    assert f"skipped input line 2: not JSON (nested 3,000 {past})" in lines[1], lines[1]


def test_python_bridge_on_stop_failure_gives_exit_code_1() -> None:
    import io

    from nexus_trio.bridges.python import NexusAgent

    class Broken(NexusAgent):
        def on_stop(self) -> None:
            raise RuntimeError("cannot stop")

    stderr = io.StringIO()
    agent = Broken(stdin=io.BytesIO(SHUTDOWN), stdout=io.BytesIO(), stderr=stderr)
    assert agent.run_agent() == 1
    assert "on_stop failed" in stderr.getvalue()
    assert "RuntimeError: cannot stop" in stderr.getvalue()


# --- through the real kernel side (nexus_trio.bridges.process) ----------------------------


@pytest.mark.parametrize("lang", LANGS)
async def test_bridges_under_the_kernel_answer_fail_and_send(lang: str, tmp_path: Path) -> None:
    from nexus_trio import RequestFailed, agent, open_kernel
    from nexus_trio.bridges.process import process_agent

    received: list[Message] = []
    got_event = trio.Event()

    @agent(name="sink")
    async def sink(ctx: Any, msg: Message) -> None:
        received.append(msg)
        got_event.set()

    with trio.fail_after(TIMEOUT * 2):
        async with open_kernel() as kernel:
            kernel.spawn(sink)
            ref = kernel.spawn(
                process_agent(probe_command(lang, tmp_path), name="probe", shutdown_grace=5.0)
            )
            assert await kernel.request("probe", {"do": "echo", "value": [1, "two"]}) == [1, "two"]
            # A handler exception fails that request only; the same child answers the next one.
            with pytest.raises(RequestFailed) as failed:
                await kernel.request("probe", {"do": "raise", "text": "boom"})
            assert failed.value.reason == "handler_error"
            assert "boom" in str(failed.value)
            seen = await kernel.request("probe", {"do": "message"})
            assert (seen["to"], seen["kind"]) == ("probe", "Query")
            sent = await kernel.request(
                "probe", {"do": "send", "to": "sink", "kind": "Event", "payload": {"n": 1}}
            )
            assert sent == "sent"
            await got_event.wait()
            stats = kernel.stats()
            assert stats.restarts == 0
        assert [(m.sender, m.kind, m.payload) for m in received] == [
            (ref.id, MessageKind.EVENT, {"n": 1})
        ]


async def _answers_on_no_line_lost(kernel: Kernel, ref: AgentRef) -> None:
    """The probe answers the next message, having written no line the kernel discarded."""
    from nexus_trio.bridges.process import bridge_stats

    assert await kernel.request("probe", {"do": "echo", "value": 1}) == 1
    stats = bridge_stats(kernel)[ref.id]
    assert (stats.oversized_lines, stats.invalid_lines, stats.starts) == (0, 0, 1)


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("protocol", [1, 2])
async def test_a_handler_error_with_a_huge_text_is_its_error_cut_not_an_unusable_line(
    lang: str, protocol: int, tmp_path: Path
) -> None:
    """Fifty-fifth pass: a handler that raised (threw, in JavaScript: a string, no Error)
    with a 5 MB text made an error frame over the kernel's line limit (1 MiB): the line
    was discarded and the message failed ``malformed`` (``stdout line of 5,000,115 bytes
    exceeds the limit``), not with the handler's error. The bridges cut an error's text
    at 16,384 characters, saying how many were cut; the kernel keeps the start of it."""
    from nexus_trio import RequestFailed, open_kernel
    from nexus_trio.bridges.process import process_agent

    env = {**os.environ, "NEXUS_PROTOCOL": str(protocol)}
    with trio.fail_after(TIMEOUT * 2):
        async with open_kernel() as kernel:
            ref = kernel.spawn(process_agent(probe_command(lang, tmp_path), name="probe", env=env))
            huge = {"do": "raise_huge", "text": "éx", "times": 2_500_000}
            if protocol == 1:  # (an error is an answer's payload in protocol 1)
                answer = await kernel.request("probe", huge)
                error = answer["error"]
                assert error.endswith(f"... ({5_000_000 - 16_384:,} characters cut)"), error[-80:]
                assert error[:16_384] == "éx" * 8_192
            else:
                with pytest.raises(RequestFailed) as failed:
                    await kernel.request("probe", huge)
                assert failed.value.reason == "handler_error", failed.value
                assert "éxéx" in str(failed.value.error)
            await _answers_on_no_line_lost(kernel, ref)


@pytest.mark.parametrize("lang", LANGS)
async def test_a_handler_error_with_a_huge_type_name_is_its_error_not_an_unusable_line(
    lang: str, tmp_path: Path
) -> None:
    """Fifty-fifth pass review: the bridges cut an error's text at 16,384 characters, not
    its type's name (a class's ``__name__``, an Error's ``name``): a 2 MB one made an
    error frame over the kernel's line limit, discarded, the message failed ``malformed``.
    The name is cut as the text is."""
    from nexus_trio import RequestFailed, open_kernel
    from nexus_trio.bridges.process import process_agent

    with trio.fail_after(TIMEOUT * 2):
        async with open_kernel() as kernel:
            ref = kernel.spawn(process_agent(probe_command(lang, tmp_path), name="probe"))
            huge = {"do": "raise_huge_name", "text": "Na", "times": 1_000_000}
            with pytest.raises(RequestFailed) as failed:
                await kernel.request("probe", huge)
            assert failed.value.reason == "handler_error", failed.value
            assert "NaNaNa" in str(failed.value.error)
            await _answers_on_no_line_lost(kernel, ref)


#: stderr lines a handler writes at once: ~0.5 MB, eight times what a pipe holds
FLOOD_LINES = 30_000


@pytest.mark.parametrize("lang", LANGS)
async def test_stderr_written_before_shutdown_reaches_the_kernel_whole(
    lang: str, tmp_path: Path
) -> None:
    """Regression: the Node bridge exited at ``shutdown`` once its stdout was flushed, and
    Node writes to a stderr pipe asynchronously: the lines still queued in the process
    (all but the 64 KiB the pipe holds, when the kernel reads slower than the handler
    logs), ``onStop``'s line among them, were dropped and never counted. The kernel now
    counts every line: the flood, and the probe's start and stop lines."""
    from nexus_trio import open_kernel
    from nexus_trio.bridges.process import process_agent, stopped_bridge_stats

    with trio.fail_after(TIMEOUT * 4):
        async with open_kernel() as kernel:
            ref = kernel.spawn(
                process_agent(probe_command(lang, tmp_path), name="probe", shutdown_grace=TIMEOUT)
            )
            flood = {"do": "flood", "lines": FLOOD_LINES}
            # (the kernel reads the 30,000 lines before the answer behind them: on a loaded
            # machine that takes longer than the default request timeout, 5 s)
            assert await kernel.request("probe", flood, timeout=TIMEOUT) == FLOOD_LINES
            await kernel.stop(ref)
            final = stopped_bridge_stats(kernel).agents[ref.id]
    assert final.last_exit == 0
    assert final.stderr_lines == FLOOD_LINES + 2
    assert final.stderr_lines_not_logged > 0


@pytest.mark.parametrize("lang", LANGS)
async def test_bridges_under_the_kernel_abandon_a_timed_out_message_and_are_not_replaced(
    lang: str, tmp_path: Path
) -> None:
    """The kernel's cancel reaches the shipped bridges: the handler stops, the late
    ``Cancelled`` answer is discarded, and the same child serves the next message."""
    from nexus_trio import DeadLetterReason, RequestFailed, open_kernel
    from nexus_trio.bridges.process import bridge_stats, process_agent
    from nexus_trio.testing import dead_letters

    with trio.fail_after(TIMEOUT * 2):
        async with open_kernel() as kernel:
            ref = kernel.spawn(
                process_agent(probe_command(lang, tmp_path), name="probe", handle_timeout=1.0)
            )
            for late, work in enumerate(("spin", "async_sleep"), start=1):
                with pytest.raises(RequestFailed) as failed:
                    await kernel.request("probe", {"do": work})
                assert failed.value.reason == "handler_timeout"
                await poll_until(lambda n=late: bridge_stats(kernel)[ref.id].late_responses == n)
                assert await kernel.request("probe", {"do": "echo", "value": work}) == work
            stats = bridge_stats(kernel)[ref.id]
            assert (stats.cancels_sent, stats.late_responses) == (2, 2)
            assert (stats.starts, stats.replaced) == (1, 0)
            assert [d.reason for d in dead_letters(kernel)] == [
                DeadLetterReason.HANDLER_TIMEOUT
            ] * 2


@pytest.mark.parametrize("lang", LANGS)
async def test_bridges_under_the_kernel_keep_their_child_when_the_next_message_is_queued(
    lang: str, tmp_path: Path
) -> None:
    """Regression: when the next message was already queued as one timed out, the kernel
    replaced the child at once, before its ``Cancelled`` answer could be read (a new
    process, ``on_start`` again). Now it waits a short grace for that answer: the same
    child (same pid) serves the queued message."""
    from nexus_trio import DeadLetterReason, RequestFailed, open_kernel
    from nexus_trio.bridges.process import bridge_stats, process_agent
    from nexus_trio.testing import dead_letters

    results: dict[str, Any] = {}

    async def ask(kernel: Any, payload: dict[str, Any]) -> None:
        try:
            results[payload["do"]] = await kernel.request("probe", payload)
        except RequestFailed as exc:
            results[payload["do"]] = exc.reason

    with trio.fail_after(TIMEOUT * 2):
        async with open_kernel() as kernel:
            # The grace: 1 s by default, at most half the handle timeout.
            ref = kernel.spawn(
                process_agent(probe_command(lang, tmp_path), name="probe", handle_timeout=2.0)
            )
            assert await kernel.request("probe", {"do": "echo", "value": 0}) == 0
            pid = bridge_stats(kernel)[ref.id].pid
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, kernel, {"do": "spin"})
                await poll_until(lambda: bridge_stats(kernel)[ref.id].lines_out == 2)
                nursery.start_soon(ask, kernel, {"do": "echo", "value": "queued"})
                await trio.testing.wait_all_tasks_blocked()
                assert kernel.stats().in_flight == 2  # the echo waits behind the spin
            assert results == {"spin": "handler_timeout", "echo": "queued"}
            stats = bridge_stats(kernel)[ref.id]
            assert (stats.starts, stats.replaced, stats.pid) == (1, 0, pid)
            assert (stats.cancels_sent, stats.late_responses) == (1, 1)
            assert [d.reason for d in dead_letters(kernel)] == [DeadLetterReason.HANDLER_TIMEOUT]


# --- the original agent-side API --------------------------------------------------------------

#: the agent of the original Python bridge's README, with a handler that shows what it sees
ORIGINAL_PY_README = """
from nexus_bridge import NexusAgent, Message, MessageKind, run_agent

class MyAgent(NexusAgent):
    async def on_start(self):
        self.seen = 0

    async def handle_message(self, message):
        self.seen += 1
        if message.kind == MessageKind.EVENT.value:
            return None
        return {
            "result": "processed",
            "kind": message.kind,
            "is_command": message.kind == MessageKind.COMMAND,
            "payload": message.payload,
            "from": message.from_id,
            "to": message.to_id,
            "trace_id": message.trace_id,
            "same_dict": message["payload"] == message.payload,
            "reply_to_sender": message.reply(self.id, 1).to_dict()["to"] == message.from_id,
            "seen": self.seen,
        }

agent = MyAgent("PythonAgent-1")
run_agent(agent)
"""

#: the agent of the original JavaScript bridge's README, async handler and runAgent
ORIGINAL_JS_README = """
const { NexusAgent, Message, MessageKind, runAgent } = require(%(bridge)s);

class MyAgent extends NexusAgent {
  async handleMessage(message) {
    await new Promise((resolve) => setTimeout(resolve, 5));
    if (message.kind === MessageKind.EVENT) return null;
    return {
      result: 'processed',
      kind: message.kind,
      payload: message.payload,
      from: message.from,
      trace_id: message.trace_id,
      is_message: message instanceof Message,
      reply_to_sender: message.reply(this.id, 1).to === message.from,
    };
  }
}

const agent = new MyAgent('JSAgent-1');
runAgent(agent);
"""


def original_readme_command(lang: str, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    if lang == "python":
        script = tmp_path / "my_agent.py"
        script.write_text(textwrap.dedent(ORIGINAL_PY_README))
        # As the original README ran it: the bridge's directory on the module path.
        return [sys.executable, str(script)], {"PYTHONPATH": str(PY_BRIDGE.parent)}
    script = tmp_path / "my_agent.js"
    script.write_text(ORIGINAL_JS_README % {"bridge": json.dumps(str(JS_BRIDGE))})
    return [node_or_skip(), str(script)], {}


@pytest.mark.parametrize("lang", LANGS)
async def test_agent_written_for_the_original_readme_runs_unchanged(
    lang: str, tmp_path: Path
) -> None:
    cmd, env = original_readme_command(lang, tmp_path)
    async with open_child(cmd, env=env) as child:
        register = await child.register()
        assert register["name"] == ("PythonAgent-1" if lang == "python" else "JSAgent-1")
        msg = message({"a": 1})
        response = await child.response_to(msg)
        answer = response["payload"]
        assert answer["result"] == "processed"
        assert answer["kind"] == "Command"
        assert answer["payload"] == {"a": 1}
        assert answer["from"] == str(KERNEL_ID)
        assert answer["reply_to_sender"] is True
        assert response["reply_to"] == str(msg.id)
        if lang == "python":
            assert answer["is_command"] is True
            assert answer["same_dict"] is True
            assert answer["seen"] == 1  # async on_start ran before the first message
        else:
            assert answer["is_message"] is True
        # A handler that returns nothing is still answered on our bridge (with null).
        event = message({"b": 2}, kind=MessageKind.EVENT)
        assert (await child.response_to(event))["payload"] is None
        # A free-form trace id reaches the handler and comes back as it was.
        traced = json.loads(message_frame(message({"c": 3})))
        traced["payload"]["trace_id"] = "trace: abc/123"
        await child.write(json.dumps(traced).encode() + b"\n")
        response = await child.frame()
        assert response["payload"]["payload"]["trace_id"] == "trace: abc/123"
        assert response["payload"]["trace_id"] == "trace: abc/123"
        await child.write(SHUTDOWN)
        assert await child.wait() == 0


def test_js_reply_without_the_sender_id_says_what_it_takes(tmp_path: Path) -> None:
    """``message.reply(payload)`` (the sender id left out) made a Response "from" the
    payload with no payload at all, without a word; the original's
    ``message.reply(this.id, payload)`` is unchanged."""
    script = tmp_path / "reply.js"
    script.write_text(
        f"const {{ Message }} = require({json.dumps(str(JS_BRIDGE))});\n"
        "const m = new Message({from: 'a', to: 'b', kind: 'Query', payload: 1});\n"
        "for (const wrong of [{x: 1}, 7, undefined]) {\n"
        "  try { m.reply(wrong); console.log('no error'); }\n"
        "  catch (e) { console.log(`${e.name}: ${e.message}`); }\n"
        "}\n"
        "const r = m.reply('me', {x: 1});\n"
        "console.log(JSON.stringify([r.from, r.to, r.kind, r.payload]));\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [node_or_skip(), str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for line, shown in zip(lines, ["Object", "number", "undefined"], strict=False):
        assert line == (
            "TypeError: message.reply(senderId, payload) takes the answering agent's id first,"
            " as in the original bridge: message.reply(this.id, payload); got"
            f" {shown} (to answer a message, return the payload itself from handleMessage)"
        )
    assert len(lines) == 4
    assert json.loads(lines[3]) == ["me", "a", "Response", {"x": 1}]


@pytest.mark.parametrize(
    ("hook", "thrown", "said"),
    [
        ("onStart", "Symbol('no database')", "nexus-bridge[t]: Symbol(no database)"),
        (
            "onStop",
            "{ toString() { throw new Error('no text'); } }",
            "nexus-bridge[t]: onStop failed: <a thrown object whose text could not be read>",
        ),
    ],
    ids=["on-start-symbol", "on-stop-unreadable"],
)
def test_a_node_agent_s_hook_that_throws_what_has_no_text_is_said_with_status_1(
    tmp_path: Path, hook: str, thrown: str, said: str
) -> None:
    """Regression: ``runMain`` and ``onStop``'s report put what was thrown into a
    template, which throws for a Symbol and for an object whose ``toString`` throws: the
    last stderr line, the one the kernel quotes for a crash, was the reporter's own
    ``TypeError: Cannot convert a Symbol value to a string`` (or the ``toString``'s
    error), not what the hook threw."""
    script = tmp_path / "hook.js"
    script.write_text(
        f"const {{ NexusAgent, runMain }} = require({json.dumps(str(JS_BRIDGE))});\n"
        "class T extends NexusAgent {\n"
        f"  {hook}() {{ throw {thrown}; }}\n"
        "  handleMessage(message) { return message.payload; }\n"
        "}\n"
        "T.defaultName = 't';\n"
        "runMain(T);\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [node_or_skip(), str(script)],
        input=SHUTDOWN,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert [json.loads(line)["type"] for line in result.stdout.splitlines()] == ["register"]
    assert result.stderr.decode().splitlines() == [said]


def test_original_module_name_imports_the_same_bridge() -> None:
    from nexus_trio.bridges import nexus_bridge, python

    assert nexus_bridge.NexusAgent is python.NexusAgent
    assert nexus_bridge.run_agent is python.run_agent
    assert nexus_bridge.MessageKind.COMMAND.value == "Command"
    message = nexus_bridge.Message(
        from_id="a", to_id="b", kind=nexus_bridge.MessageKind.QUERY, payload={"x": 1}
    )
    assert (message.kind, message["kind"], message.payload) == ("Query", "Query", {"x": 1})
    assert message.to_dict()["from"] == "a"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = message.nope


@pytest.mark.parametrize("require", ["", "1"])
def test_without_node_the_javascript_tests_skip_saying_why(require: str, tmp_path: Path) -> None:
    """The README's test command works on a machine without Node; CI makes it a failure."""
    empty_bin = tmp_path / "bin"  # a PATH on which there is no node
    empty_bin.mkdir()
    env = {**os.environ, "PATH": str(empty_bin), "NEXUS_REQUIRE_NODE": require}
    test = "tests/test_bridge_agents.py::test_echo_bridge_registers_round_trips_and_exits_0_on_shutdown"
    # One test in this process (-n 0): pyproject's addopts would start four xdist workers
    # for it: 8.6 s of CPU against 1.6 s, past the 120 s bound at load 40 (both runs failed)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-n", "0", test],
        cwd=ROOT,  # where pyproject.toml turns on trio mode
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if require:
        assert result.returncode == 1, result.stdout
        assert "1 failed, 1 passed" in result.stdout
        assert "NEXUS_REQUIRE_NODE=1" in result.stdout
    else:
        assert result.returncode == 0, result.stdout
        assert "1 passed, 1 skipped" in result.stdout
        assert "Node 18+ not on PATH" in result.stdout


@pytest.mark.parametrize("lang", LANGS)
async def test_a_handler_s_exception_group_or_aggregate_error_names_its_errors(
    lang: str, tmp_path: Path
) -> None:
    """Fifty-sixth pass: a handler that raised an exception group (Python) or threw an
    ``AggregateError`` (JavaScript: ``Promise.any`` of promises that all rejected) was
    reported by its own text only, ``boom (22 sub-exceptions)`` or ``boom``: nothing of
    what failed. Both bridges name each error's type and text, groups inside groups too,
    at most 15 of a group (as CPython's traceback shows a group), then ``and N more``."""
    from nexus_trio import RequestFailed, open_kernel
    from nexus_trio.bridges.process import process_agent

    with trio.fail_after(TIMEOUT * 2):
        async with open_kernel() as kernel:
            ref = kernel.spawn(process_agent(probe_command(lang, tmp_path), name="probe"))
            texts = []
            for runs in (20, 0):
                with pytest.raises(RequestFailed) as failed:
                    await kernel.request("probe", {"do": "raise_group", "runs": runs})
                assert failed.value.reason == "handler_error", failed.value
                texts.append(str(failed.value.error))
            await _answers_on_no_line_lost(kernel, ref)
    if lang == "python":
        head = "boom (22 sub-exceptions): [ValueError: a; "
        head += "ExceptionGroup: inner (1 sub-exception): [KeyError: 'k']"
        runs = "".join(f"; RuntimeError: {i}" for i in range(13))
        small = "boom (2 sub-exceptions): [ValueError: a; "
        small += "ExceptionGroup: inner (1 sub-exception): [KeyError: 'k']]"
    else:
        head = "boom (22 errors): [TypeError: a; AggregateError: inner (1 error): [RangeError: k]"
        runs = "".join(f"; Error: {i}" for i in range(13))
        small = "boom (2 errors): [TypeError: a; AggregateError: inner (1 error): [RangeError: k]]"
    assert texts[0].endswith(f"{head}{runs}; and 7 more]"), texts[0]
    assert texts[1].endswith(small), texts[1]
