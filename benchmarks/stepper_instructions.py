"""Machine instructions of one handler call as the serve loop makes it, against the same
coroutine awaited inside a loop that runs in one generator: what the :class:`Stepper`'s
per-message round trip costs (``valgrind --tool=cachegrind``, a count that does not move
with the machine's load).

    python benchmarks/stepper_instructions.py [--short 100000] [--long 200000]

Three loops over the same no-op ``async def`` handler, each run under cachegrind with
``--short`` and ``--long`` iterations (the difference divided by the difference in
iterations: one more call, without the interpreter's start):

* ``stepped``: ``trap = stepper.send(handler(ctx, msg))`` then ``trap is DONE`` and
  ``stepper.box[0]``, as the serve loop did for every message until the thirty-sixth
  pass (the stepper's generator resumed from C for each one, then its ``yield from``
  into the handler);
* ``looped``: ``result = yield from handler(ctx, msg)`` in a loop that runs inside one
  generator (what the kernel's stepper, which now runs a whole batch a step, pays per
  message);
* ``empty``: the loop alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import types
from collections.abc import Generator
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
_KINDS = ("stepped", "looped", "empty")


async def _noop(ctx: Any, msg: Any) -> None:
    return None


def _stepped(n: int) -> None:
    from nexus_trio._step import DONE, Stepper

    stepper = Stepper()
    done = [0]
    for i in range(n):
        step = stepper.send
        trap = step(_noop(None, i))
        if trap is DONE and stepper.box[0] is None:
            done[0] += 1
    if done[0] != n:
        raise SystemExit(f"stepped {done[0]} of {n} handlers to their end")


@types.coroutine
def _batch(n: int, done: list[int]) -> Generator[Any, Any, None]:
    for i in range(n):
        result = yield from _noop(None, i)
        if result is None:
            done[0] += 1


def _looped(n: int) -> None:
    done = [0]
    for _ in _batch(n, done):  # the handler never yields: one step runs the whole loop
        pass
    if done[0] != n:
        raise SystemExit(f"ran {done[0]} of {n} handlers to their end")


def _empty(n: int) -> None:
    for _ in range(n):
        pass


def _child(kind: str, n: int) -> None:
    {"stepped": _stepped, "looped": _looped, "empty": _empty}[kind](n)


def total(cachegrind_out: str) -> int:
    """The instructions (``Ir``) of a whole run: a cachegrind output file's summary."""
    for line in cachegrind_out.splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise ValueError("no summary line in the cachegrind output")


def _instructions(kind: str, n: int, folder: str) -> int:
    out = Path(folder) / f"cachegrind.{kind}.{n}"
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=str(_ROOT))
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=no"]
    command += [f"--cachegrind-out-file={out}", sys.executable, __file__, "--child", kind, str(n)]
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.stderr.write(run.stderr)
        raise SystemExit(f"cachegrind run of {kind} failed (exit status {run.returncode})")
    return total(out.read_text())


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        sys.path.insert(0, str(_ROOT))  # this copy of nexus_trio, not an installed one
        _child(argv[1], int(argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=int, default=100_000)
    parser.add_argument("--long", type=int, default=200_000)
    args = parser.parse_args(argv)
    if not 1 <= args.short < args.long:
        parser.error("--short must be at least 1 and less than --long")
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    per_call = {}
    with tempfile.TemporaryDirectory(prefix="stepper-instructions-") as folder:
        for kind in _KINDS:
            short = _instructions(kind, args.short, folder)
            long = _instructions(kind, args.long, folder)
            per_call[kind] = (long - short) / (args.long - args.short)
    empty = per_call["empty"]
    for kind in _KINDS:
        print(
            f"{kind:8} {per_call[kind]:8.1f} instructions a call ({per_call[kind] - empty:.1f} over the loop)"
        )
    print(
        f"the stepper's round trip: {per_call['stepped'] - per_call['looped']:.1f} instructions a call"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
