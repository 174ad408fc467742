"""Machine instructions per fan-out tell, by C function: a count that does not move with
the machine's load (``valgrind --tool=cachegrind``).

    python benchmarks/fanout_instructions.py [--side kernel|asyncio] [--short 100000]
                                             [--long 200000] [--top 25]
                                             [--path DIR] [--against DIR]

Runs ``fanout_memory.py --side SIDE`` (the goal's fan-out: one producer, tells round-robin
to 1,000 no-op agents) under cachegrind once with ``--short`` and once with ``--long``
messages (the two at once: the counts do not depend on the load), ``PYTHONHASHSEED=0``,
and prints the difference divided by the difference in messages: what one more tell
costs, sent and handled, without the start, the spawns and the stop. Two runs of the same
code give the same count within a few instructions a tell.

``--path DIR``: put ``DIR`` first on ``PYTHONPATH`` (another copy of a dependency, e.g. an
unpacked Trio wheel). ``--against DIR``: measure a second time with ``DIR`` first on the
path and print both, and the functions whose count changed most: what a dependency's
version (or a patched copy) costs a tell. Not for another copy of nexus_trio: the
measured script puts its own repository first on the path, so run this script from that
copy's ``benchmarks/`` instead.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent

Counts = collections.Counter[str]


def by_function(cachegrind_out: str) -> Counts:
    """Instructions (``Ir``) by function name in a cachegrind output file's text."""
    counts: Counts = collections.Counter()
    function = "???"
    for line in cachegrind_out.splitlines():
        if line.startswith("fn="):
            function = line[3:].strip()
        elif line[:1].isdigit():
            fields = line.split()
            if len(fields) >= 2:
                counts[function] += int(fields[1])
    return counts


def per_message(short: Counts, long: Counts, messages: int) -> dict[str, float]:
    """What one more message costs, by function: ``(long - short) / messages``."""
    return {name: (long[name] - short[name]) / messages for name in short.keys() | long.keys()}


def _measure(side: str, sizes: tuple[int, int], path: str | None) -> dict[str, float]:
    env = dict(os.environ, PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (path, str(_ROOT), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="fanout-instructions-") as folder:
        runs = []
        for messages in sizes:
            out = Path(folder) / f"cachegrind.{messages}"
            command = ["valgrind", "--tool=cachegrind", "--cache-sim=no"]
            command += [f"--cachegrind-out-file={out}", sys.executable]
            command += [str(_HERE / "fanout_memory.py"), "--side", side]
            command += ["--messages", str(messages)]
            with (Path(folder) / f"stderr.{messages}").open("w") as stderr:
                run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
            runs.append((out, run, Path(folder) / f"stderr.{messages}"))
        counts = []
        try:
            for out, run, stderr_file in runs:
                if run.wait() != 0:
                    sys.stderr.write(stderr_file.read_text())
                    raise SystemExit(f"cachegrind run failed (exit status {run.returncode})")
                counts.append(by_function(out.read_text()))
        finally:
            for _, run, _ in runs:  # a failed (or interrupted) run leaves none running
                if run.poll() is None:
                    run.kill()
                    run.wait()
    return per_message(counts[0], counts[1], sizes[1] - sizes[0])


def _print(label: str, costs: dict[str, float], top: int) -> None:
    print(f"{label}: {sum(costs.values()):,.0f} instructions per message")
    for name, cost in sorted(costs.items(), key=lambda item: -item[1])[:top]:
        print(f"  {cost:9.1f}  {name}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=("kernel", "asyncio"), default="kernel")
    parser.add_argument("--short", type=int, default=100_000)
    parser.add_argument("--long", type=int, default=200_000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--path", help="a folder put first on PYTHONPATH")
    parser.add_argument("--against", help="measure again with this folder first on the path")
    args = parser.parse_args(argv)
    if not 1 <= args.short < args.long:
        parser.error("--short must be at least 1 and less than --long")
    for folder in (args.path, args.against):
        if folder is not None and not Path(folder).is_dir():
            parser.error(f"{folder!r} is not a folder")
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    sizes = (args.short, args.long)
    first = _measure(args.side, sizes, args.path)
    _print(f"{args.side}{f' with {args.path}' if args.path else ''}", first, args.top)
    if args.against is not None:
        second = _measure(args.side, sizes, args.against)
        _print(f"{args.side} with {args.against}", second, args.top)
        change = {name: second.get(name, 0.0) - first.get(name, 0.0) for name in first | second}
        print("largest changes:")
        for name, cost in sorted(change.items(), key=lambda item: -abs(item[1]))[: args.top]:
            print(f"  {cost:+9.1f}  {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
