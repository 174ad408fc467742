"""The goal's fan-out with two copies of nexus_trio, alternated: a mypyc-compiled probe
against the interpreted code (the thirty-ninth pass; see ``mypyc_probe.sh``, which builds
the compiled copy, and docs/benchmarks-history.md).

    python benchmarks/mypyc_probe.py --tree A=DIR --tree B=DIR [--pairs 5]
                                     [--messages 1000000] [--agents 1000]

Each ``DIR`` holds a ``nexus_trio`` package (put first on ``PYTHONPATH``). A pair runs
each tree once, in a fresh process, the trees' order swapped at every pair (A B, B A,
...); a run is one repetition of the goals scenario's fan-out rows: raw trio, the asyncio
script and ``await kernel.send(ref, i)`` (the goal's own functions, in the goal's order for
that repetition), each side's wall time and CPU time (``getrusage``: user + system of the
process over that side's run, which moves little with the machine's load). Prints every
run and, per pair, the kernel's ratio to asyncio and its share of raw trio, by wall and by
CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

_ONE_RUN = """
import asyncio, json, resource, sys, time
import trio
import nexus_trio
from nexus_trio.bench import _fanout, _goals

agents, messages, repetition = (int(a) for a in sys.argv[1:4])

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

out = {"file": nexus_trio._router.__file__.rsplit("/", 2)[0]}
for side in _goals.fanout_order(repetition):
    c0 = cpu()
    if side == "raw trio":
        wall, n = trio.run(_fanout.trio_fanout, agents, messages)
        assert n >= messages, n
    elif side == "asyncio":
        wall, n = asyncio.run(_fanout.asyncio_fanout(agents, messages))
        assert n == messages, n
    else:
        wall, counts = trio.run(_fanout.kernel_fanout, agents, messages)
        assert counts["handled"] == counts["sent"] == counts["accepted"], counts
        assert counts["dead_lettered"] == 0 and counts["in_flight"] == 0, counts
    out[side] = {"wall": wall, "cpu": cpu() - c0}
print(json.dumps(out))
"""


def one_run(tree: Path, agents: int, messages: int, repetition: int) -> dict[str, object]:
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=str(tree))
    command = [sys.executable, "-c", _ONE_RUN, str(agents), str(messages), str(repetition)]
    # run from the tree: ``python -c`` puts the working folder first on the path
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"run with {tree} failed:\n{done.stderr}")
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, help="LABEL=DIR, twice")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--agents", type=int, default=1000)
    args = parser.parse_args(argv)
    trees = [tuple(t.split("=", 1)) for t in args.tree]
    if len(trees) != 2 or any(len(t) != 2 or not Path(t[1]).is_dir() for t in trees):
        parser.error("give --tree LABEL=DIR twice, each DIR a folder")
    ratios: dict[str, list[tuple[float, float, float, float]]] = {label: [] for label, _ in trees}
    for pair in range(args.pairs):
        order = trees if pair % 2 == 0 else trees[::-1]
        for label, folder in order:
            run = one_run(Path(folder), args.agents, args.messages, pair)
            sides = {k: v for k, v in run.items() if isinstance(v, dict)}
            k, a, t = sides["kernel"], sides["asyncio"], sides["raw trio"]
            row = (a["wall"] / k["wall"], t["wall"] / k["wall"], a["cpu"] / k["cpu"])
            row += (t["cpu"] / k["cpu"],)
            ratios[label].append(row)
            load = os.getloadavg()[0]
            print(
                f"pair {pair + 1} {label:>12}: kernel {k['wall']:.2f} s wall {k['cpu']:.2f} s cpu"
                f" | asyncio {a['wall']:.2f} / {a['cpu']:.2f} | raw trio {t['wall']:.2f} /"
                f" {t['cpu']:.2f} | vs asyncio {row[0]:.2f}x wall {row[2]:.2f}x cpu | share"
                f" {row[1]:.0%} wall {row[3]:.0%} cpu | load {load:.1f} ({run['file']})",
                flush=True,
            )
    for label, rows in ratios.items():
        medians = [statistics.median(r[i] for r in rows) for i in range(4)]
        print(
            f"{label}: median vs asyncio {medians[0]:.2f}x wall {medians[2]:.2f}x cpu;"
            f" share of raw trio {medians[1]:.0%} wall {medians[3]:.0%} cpu"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
