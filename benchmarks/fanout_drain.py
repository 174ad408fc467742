"""The fan-out's receiving side: what the agents' drain costs, against floors of the shape.

    python benchmarks/fanout_drain.py [--rounds 5] [--messages 1000000] [--agents 1000]
    python benchmarks/fanout_drain.py --side kernel|ints|messages|stepped [--lines]

The goal's fan-out (one producer, tells round-robin to no-op agents, mailboxes of 1,024)
queues every message before any agent runs; this script times only what comes after:
the drain, in CPU time (``getrusage``, which moves less with the machine's load than the
wall clock), and counts the task steps it took (a Trio ``Instrument``: one per wake-up).
Sides, each in a fresh process, alternated ``--rounds`` times, medians printed:

* ``kernel``: ``await kernel.send(ref, i)``, the goal's agents (``_noop``);
* ``ints``: a Trio memory channel per consumer task, ``send_nowait(i)``, a consumer that
  takes up to 64 per wake-up with ``receive_nowait`` then checkpoints (the raw trio row);
* ``messages``: the same carrying a ``Message`` per tell (the consumer frees it);
* ``stepped``: the same, each message handed to a no-op ``async def`` handler stepped by
  a ``Stepper``, as the serve loop did until the thirty-sixth pass (it now steps a whole
  batch at once): the floor of the promised shape with a real message and a handler
  call, without the kernel's bookkeeping.

``--lines`` (kernel side): the drain under an instruction counter instead (``opcode_count``:
``sys.monitoring`` on Python 3.12+, ``sys.settrace`` on 3.11), Python opcodes per
message by function and, for the serve loop (``run_once`` and the kernel's stepper's
``_serve_batches``, which runs its batches), by line.
"""

from __future__ import annotations

import argparse
import collections
import linecache
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nexus_trio import SYSTEM_ID, Message, new_id
from nexus_trio._step import Stepper

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fanout_memory
from opcode_count import InstructionCounter, by_code, line_of

SIDES = ("kernel", "ints", "messages", "stepped")


async def _handler(ctx: object, msg: object) -> None:
    return None


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.on = False
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.on:
            self.steps += 1


#: the serve loop's functions: the run's own loop and the kernel's stepper's, which runs
#: its batches (the handlers' calls and the per-message bookkeeping)
_SERVE_LOOP = ("run_once", "_serve_batches")


class _Opcodes(InstructionCounter):
    """Opcodes executed, by function, and by line of the serve loop."""

    @property
    def functions(self) -> collections.Counter[str]:
        functions: collections.Counter[str] = collections.Counter()
        for code, n in by_code(self.hits).items():
            functions[code.co_name] += n
        return functions

    @property
    def lines(self) -> collections.Counter[tuple[str, str, int]]:
        lines: collections.Counter[tuple[str, str, int]] = collections.Counter()
        for (code, offset), n in self.hits.items():
            if code.co_name in _SERVE_LOOP:
                lines[code.co_name, code.co_filename, line_of(code, offset)] += n
        return lines


class _Drain:
    """The phases of a run (``fanout_memory``'s ``phase`` calls): from ``sent`` to
    ``handled``, the CPU time, the task steps and, with a tracer, the opcodes."""

    def __init__(self, tracer: _Opcodes | None) -> None:
        self.steps = _Steps()
        self.tracer = tracer
        self.cpu = 0.0

    def __call__(self, phase: str, handled: int) -> None:
        if phase == "sent":
            if handled:
                raise SystemExit(f"{handled} handled before every message was queued")
            self.cpu = _cpu()
            self.steps.on = True
            if self.tracer is not None:
                self.tracer.start()
        elif phase == "handled":
            if self.tracer is not None:
                self.tracer.stop()
            self.steps.on = False
            self.cpu = _cpu() - self.cpu


async def _floor(side: str, agents: int, messages: int, drain: _Drain) -> None:
    taken = 0
    step = Stepper().send

    async def consumer(receive: trio.MemoryReceiveChannel[Any]) -> None:
        # as the serve loop: parked on an empty channel, up to 64 a wake-up, then a
        # checkpoint and on with ``receive_nowait`` (Trio's ``receive`` would yield again)
        nonlocal taken
        while True:
            item = await receive.receive()
            n = 0
            try:
                while True:
                    if side == "stepped":
                        step(_handler(None, item))
                    n += 1
                    if n % 64 == 0:
                        await trio.lowlevel.checkpoint()
                    item = receive.receive_nowait()
            except trio.WouldBlock:
                taken += n

    async with trio.open_nursery() as nursery:
        channels = [trio.open_memory_channel[Any](1024) for _ in range(agents)]
        for _, receiver in channels:
            nursery.start_soon(consumer, receiver)
        senders = [sender for sender, _ in channels]
        await trio.testing.wait_all_tasks_blocked()
        ids = [new_id() for _ in range(agents)]
        for i in range(messages):
            item = i if side == "ints" else Message(sender=SYSTEM_ID, to=ids[i % agents], payload=i)
            senders[i % agents].send_nowait(item)
        drain("sent", 0)
        await trio.testing.wait_all_tasks_blocked()
        drain("handled", taken)
        nursery.cancel_scope.cancel()
    if taken != messages:
        raise SystemExit(f"{side} took {taken} of {messages}")


def run_side(side: str, agents: int, messages: int, lines: bool) -> str:
    tracer = _Opcodes() if lines else None
    drain = _Drain(tracer)
    if side == "kernel":
        trio.run(fanout_memory.kernel_phases, agents, messages, drain, instruments=[drain.steps])
    else:
        trio.run(_floor, side, agents, messages, drain, instruments=[drain.steps])
    cpu, steps = drain.cpu, drain.steps
    out = f"{side} drain {cpu:.3f} s cpu, {steps.steps} task steps"
    if tracer is None:
        return out
    total = sum(tracer.functions.values())
    out += f"\n{total / messages:.1f} opcodes per message"
    for name, count in tracer.functions.most_common(10):
        out += f"\n  {count / messages:7.2f}  {name}"
    for (name, filename, line), count in sorted(tracer.lines.items()):
        if count / messages >= 0.1:
            text = linecache.getline(filename, line).strip()
            out += f"\n  {count / messages:7.2f}  {name}:{line}  {text}"
    return out


def _alternate(args: argparse.Namespace) -> None:
    cpu: dict[str, list[float]] = {side: [] for side in SIDES}
    for _ in range(args.rounds):
        for side in SIDES:
            command = [sys.executable, __file__, "--side", side]
            command += ["--agents", str(args.agents), "--messages", str(args.messages)]
            line = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            print(line.strip(), flush=True)
            cpu[side].append(float(line.split("drain ", 1)[1].split()[0]))
    for side in SIDES:
        median = statistics.median(cpu[side])
        print(
            f"median {side}: drain {median:.3f} s cpu, {median / args.messages * 1e9:.0f} ns a message"
        )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=SIDES)
    parser.add_argument("--lines", action="store_true")
    args = fanout_memory.parse_sizes(parser, argv, rounds=5)
    if args.lines and args.side != "kernel":
        parser.error("--lines counts the kernel's drain: give --side kernel")
    if args.side is None:
        _alternate(args)
    else:
        print(run_side(args.side, args.agents, args.messages, args.lines))


if __name__ == "__main__":
    main(sys.argv[1:])
