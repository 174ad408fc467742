"""A deliberately misbehaving bridge agent for the kernel-side process agent tests.

Stdlib only, independent of the shipped bridges. Each message payload is a command
``{"op": ..., ...}`` (see ``answer``); command-line flags select the protocol and the
hostile behaviours that happen outside messages:

  --protocol 1|2          1: responses without id/reply_to, errors as response payloads
  --ignore-term           ignore SIGTERM and the shutdown frame
  --no-register           never register (just read stdin)
  --register-delay S      sleep S seconds before registering
  --garbage-first         write a non-JSON line before the register line
  --exit-at-start CODE    exit with CODE right after registering
  --silent-after N        answer the first N messages, then never answer again
  --no-read               register, then never read stdin (the pipe fills up)
  --no-pong               do not answer ping frames
  --tag TEXT              ignored: lets a test find this process and its children in /proc
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

out = sys.stdout.buffer
history: list[Any] = []


#: where ``emit(..., number=...)`` writes its number literal, as given
NUMBER = "@NUMBER@"


def emit(obj: Any, *, surrogatepass: bool = False, number: str | None = None) -> None:
    if surrogatepass:
        # a lone surrogate as its UTF-8 bytes, not the \u escape (JSON readers take both)
        out.write(json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")
    elif number is not None:
        # a number literal as written, not as json.dumps would write it (1e999: Infinity)
        out.write(json.dumps(obj).replace(json.dumps(NUMBER), number).encode() + b"\n")
    else:
        out.write(json.dumps(obj).encode() + b"\n")
    out.flush()


def emit_raw(data: bytes) -> None:
    out.write(data)
    out.flush()


def respond(
    args: argparse.Namespace,
    msg: dict[str, Any],
    payload: Any,
    *,
    surrogatepass: bool = False,
    number: str | None = None,
) -> None:
    body: dict[str, Any] = {
        "from": msg["to"],
        "to": msg["from"],
        "kind": "Response",
        "payload": payload,
        "timestamp": "2024-01-01T00:00:00Z",
    }
    if args.protocol >= 2:
        body["id"] = str(uuid.uuid4())
        body["reply_to"] = msg["id"]
    emit({"type": "response", "payload": body}, surrogatepass=surrogatepass, number=number)


def fail(args: argparse.Namespace, msg: dict[str, Any], text: str) -> None:
    if args.protocol >= 2:
        emit(
            {
                "type": "error",
                "payload": {"reply_to": msg["id"], "error": text, "error_type": "ValueError"},
            }
        )
    else:
        respond(args, msg, {"error": text, "error_type": "ValueError"})


def start_unmarked() -> int:
    """Start ``sleep 300`` with an empty environment (no mark); its pid once its exec has
    begun (its close-on-exec pipe end closed)."""
    exec_read, exec_write = os.pipe()
    unmarked = os.fork()
    if unmarked == 0:
        os.execve("/bin/sleep", ["sleep", "300"], {})
    os.close(exec_write)
    os.read(exec_read, 1)
    return unmarked


def start_daemon() -> int:
    """Start ``sleep 300`` as a daemon would: an empty environment (no mark), every
    inherited descriptor closed (``subprocess``'s ``close_fds``, on by default: no hold),
    its standard streams on ``/dev/null``; its pid once its exec has begun."""
    return subprocess.Popen(
        ["/bin/sleep", "300"],
        env={},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ).pid


def orphan_unmarked(leave: Callable[[], object], start: Callable[[], int] | None = None) -> int:
    """A grandchild that calls ``leave``, starts ``start`` (:func:`start_unmarked`) and
    exits: the pid of that orphan (reparented to our subreaper), once the grandchild is
    reaped."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        leave()
        os.close(0)
        os.close(read_end)
        os.write(write_end, str((start or start_unmarked)()).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        unmarked = int(f.read())
    os.waitpid(pid, 0)
    return unmarked


def answer(args: argparse.Namespace, msg: dict[str, Any]) -> None:
    command = msg.get("payload")
    op = command.get("op") if isinstance(command, dict) else None
    if op is None:
        respond(args, msg, command)  # plain echo
    elif op == "echo":
        respond(args, msg, command.get("value"))
    elif op == "record":
        history.append(command.get("value"))
        respond(args, msg, None)
    elif op == "history":
        respond(args, msg, history)
    elif op == "pid":
        respond(args, msg, os.getpid())
    elif op == "trace":
        respond(args, msg, msg.get("trace_id"))
    elif op == "env":
        respond(args, msg, {k: os.environ.get(k) for k in command.get("keys", [])})
    elif op == "crash":
        os._exit(command.get("code", 3))
    elif op == "hang":
        while True:
            time.sleep(3600)
    elif op == "sleep":
        time.sleep(command["seconds"])
        respond(args, msg, "slept")
    elif op == "error":
        fail(args, msg, command.get("text", "bad input"))
    elif op == "garbage":
        emit_raw(b"this is not json {\n")
    elif op == "unknown_type":
        emit({"type": "bogus", "payload": {}})
    elif op == "missing_payload":
        emit({"type": "response"})
    elif op == "unknown_kind":
        # an answer whose kind is none of the protocol's (as written in the command)
        body = {"from": msg["to"], "to": msg["from"], "kind": command["kind"], "payload": 1}
        if args.protocol >= 2:
            body["reply_to"] = msg["id"]
        emit({"type": "response", "payload": body})
    elif op == "kind_as":
        # an answer of the given kind, or none: the protocol's kinds are answers
        body = {"from": msg["to"], "to": msg["from"], "payload": "kind ok"}
        if "kind" in command:
            body["kind"] = command["kind"]
        if args.protocol >= 2:
            body["reply_to"] = msg["id"]
        emit({"type": "response", "payload": body})
    elif op == "deep":
        emit_raw(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    elif op == "not_finite":
        # json.dumps writes these as the bare words NaN, Infinity, -Infinity: not JSON
        respond(args, msg, {"x": [1, float(command["value"])]})
    elif op == "send_not_finite":
        emit({"type": "send", "payload": {"to": command["to"], "payload": [float("nan")]}})
        respond(args, msg, "sent")
    elif op == "number":
        # the number literal "text" as written: 1e999 is JSON, too large for a double
        respond(args, msg, {"x": [1, NUMBER]}, number=command["text"])
    elif op == "send_number":
        emit(
            {"type": "send", "payload": {"to": command["to"], "payload": [NUMBER]}}, number="1e999"
        )
        respond(args, msg, "sent")
    elif op == "lone_surrogate":
        respond(args, msg, "\ud800")  # written as the escape \ud800
    elif op == "raw_surrogate":
        respond(args, msg, "\udfff", surrogatepass=True)
    elif op == "send_lone_surrogate":
        emit({"type": "send", "payload": {"to": command["to"], "payload": ["\ud800"]}})
        respond(args, msg, "sent")
    elif op == "huge":
        respond(args, msg, "x" * command["size"])
    elif op == "stderr":
        sys.stderr.write(command["text"] + "\n")
        sys.stderr.flush()
        respond(args, msg, "logged")
    elif op == "send":
        frame = {"to": command["to"], "payload": command.get("payload")}
        for field in ("kind", "trace_id", "conversation_id"):
            if field in command:
                frame[field] = command[field]
        emit({"type": "send", "payload": frame})
        respond(args, msg, "sent")
    elif op == "grandchild":
        # A grandchild in our process group that inherits (and holds) stdin/stdout/stderr.
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(3600)
        respond(args, msg, pid)
    elif op == "escape":
        # A grandchild that leaves our process group and session and ignores SIGTERM and
        # end of input: only its mark can find it.
        pid = os.fork()
        if pid == 0:
            os.setsid()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.close(0)
            while True:
                time.sleep(3600)
        respond(args, msg, pid)
    elif op == "escape_unmarked":
        # A grandchild that leaves our group and session (ignoring SIGTERM and end of
        # input) and starts a child with an empty environment: no mark, a parent that has
        # one. Answers [grandchild, its child].
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.setsid()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.close(0)
            os.close(read_end)
            os.write(write_end, str(start_unmarked()).encode())
            os.close(write_end)
            while True:
                time.sleep(3600)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            unmarked = int(f.read())
        respond(args, msg, [pid, unmarked])
    elif op == "escape_by_group":
        # A grandchild that leaves our process group with setpgid() (as a job-control
        # shell's pipeline does; it stays in our session), starts a child with an empty
        # environment (no mark) and exits: that child has lost its parent, its group and
        # its mark; only our session holds it. Answers its pid.
        respond(args, msg, orphan_unmarked(lambda: os.setpgid(0, 0)))
    elif op == "escape_by_session":
        # The same, leaving our session (and so our group) with setsid(), as a daemon's
        # double fork does: that child has lost its parent, its session and its mark.
        respond(args, msg, orphan_unmarked(os.setsid))
    elif op == "escape_closing_fds":
        # The same, its orphan started as a daemon (close_fds): that child has lost its
        # parent, its session, its mark and the child's hold.
        respond(args, msg, orphan_unmarked(os.setsid, start_daemon))
    elif op == "spawn_loop":
        # A grandchild that leaves our group and forks and execs children without end
        # (at most ``keep`` alive: the oldest is killed and reaped): a stop finds some of
        # them in the middle of their exec.
        argv = command.get("argv", ["/bin/sleep", "300"])
        pid = os.fork()
        if pid == 0:
            os.setsid()
            os.close(0)
            for _ in range(int(command.get("loopers", 1)) - 1):
                if os.fork() == 0:
                    break  # one more looper (in the same group)
            keep, live = int(command.get("keep", 20)), []
            while True:
                child = os.fork()
                if child == 0:
                    os.execv(argv[0], argv)
                live.append(child)
                if len(live) > keep:
                    oldest = live.pop(0)
                    os.kill(oldest, signal.SIGKILL)
                    os.waitpid(oldest, 0)
        respond(args, msg, pid)
    else:
        fail(args, msg, f"unknown op {op!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", type=int, default=2)
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--no-register", action="store_true")
    parser.add_argument("--register-delay", type=float, default=0.0)
    parser.add_argument("--garbage-first", action="store_true")
    parser.add_argument("--exit-at-start", type=int, default=None)
    parser.add_argument("--silent-after", type=int, default=None)
    parser.add_argument("--no-read", action="store_true")
    parser.add_argument("--no-pong", action="store_true")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.register_delay:
        time.sleep(args.register_delay)
    if args.garbage_first:
        emit_raw(b"hello from a noisy child\n")
    if not args.no_register:
        register: dict[str, Any] = {"id": str(uuid.uuid4()), "name": "toy"}
        if args.protocol >= 2:
            register["protocol"] = args.protocol
        emit({"type": "register", "payload": register})
    if args.exit_at_start is not None:
        sys.exit(args.exit_at_start)
    if args.no_read:
        while True:
            time.sleep(3600)
    answered = 0
    while True:
        line = sys.stdin.buffer.readline()
        if not line:
            if args.ignore_term:
                while True:
                    time.sleep(3600)
            return
        frame = json.loads(line)
        if frame["type"] == "shutdown":
            if args.ignore_term:
                continue
            return
        if frame["type"] == "ping":
            if args.no_pong:
                continue
            emit({"type": "pong", "payload": frame["payload"]})
            continue
        if frame["type"] != "message" or args.no_register:
            continue
        if args.silent_after is not None and answered >= args.silent_after:
            continue
        answer(args, frame["payload"])
        answered += 1


if __name__ == "__main__":
    main()
