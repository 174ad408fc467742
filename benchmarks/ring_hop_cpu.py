"""CPU of a ``--workers 2`` ring hop, by process, against a hop of the one-process ring.

    python benchmarks/ring_hop_cpu.py [--agents 1000] [--window 4] [--rounds 1] [--json]

``bench_workers.py``'s ring row as counts that follow the machine's load less than a rate
does: each round runs the one-process ring (``nexus run -w ring``) and then the ring over
``run_workers(2, ...)`` (every hop crosses), and reads, over a window of ``--window``
seconds in the middle of each run, the CPU time (user + system, ``/proc/<pid>/stat``) of
every process of the run (the two workers and their private nats-server) and the
messages the agents handled (each worker's ``/metrics``). Printed per round: the us of
CPU a hop of each process and in all, the hops a second, and the rows a node batch
carried (``nexus_cluster_batches_published`` over the messages a worker handled). A
crossing hop is one message handled, sent by one worker and received by the other: each
process's CPU is divided by all the hops both workers handled in the window.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: seconds a run goes on past its window (its start and its end are not measured)
_MARGIN = 4.0
#: the counters read from a worker's /metrics (the handled messages first)
_COUNTERS = ("nexus_messages_handled", "nexus_cluster_batches_published")
_TICK = os.sysconf("SC_CLK_TCK")


def _counters(port: int) -> dict[str, float]:
    """_COUNTERS as the endpoint on ``port`` says them (a name it does not show: 0)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = dict.fromkeys(_COUNTERS, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        name = name.removesuffix("_total")
        if name in found:
            found[name] = float(value)
    return found


def _cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _children(pid: int) -> list[tuple[int, str]]:
    """Every descendant of ``pid``, with the first word of its command line."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # ended meanwhile
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: list[tuple[int, str]] = []
    wanted = {pid}
    while True:
        more = [p for p, parent in parents.items() if parent in wanted and p not in wanted]
        if not more:
            break
        wanted.update(more)
        for p in more:
            try:
                argv = (Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0") or [b""])[0]
            except OSError:
                continue
            found.append((p, Path(argv.decode(errors="replace")).name))
    return found


def _window(
    ports: list[int], pids: dict[str, int], window: float
) -> tuple[dict[str, float], list[dict[str, float]], float]:
    """Once every port's agents handle messages, 1 s later: the CPU seconds of each of
    ``pids`` and each port's counters over ``window`` seconds, and the window's length."""
    deadline = time.monotonic() + 120
    while True:
        try:
            if all(_counters(port)["nexus_messages_handled"] > 0 for port in ports):
                break
        except OSError:
            pass  # not serving yet
        if time.monotonic() > deadline:
            raise RuntimeError("the run's agents handled no message in 120 s")
        time.sleep(0.1)
    time.sleep(1.0)
    cpu0 = {name: _cpu(pid) for name, pid in pids.items()}
    counts0 = [_counters(port) for port in ports]
    start = time.monotonic()
    time.sleep(window)
    cpu1 = {name: _cpu(pid) for name, pid in pids.items()}
    counts1 = [_counters(port) for port in ports]
    elapsed = time.monotonic() - start
    cpu = {name: cpu1[name] - cpu0[name] for name in pids}
    counts = [
        {k: after[k] - before[k] for k in after}
        for before, after in zip(counts0, counts1, strict=True)
    ]
    return cpu, counts, elapsed


def one_process(agents: int, window: float, port: int) -> dict[str, Any]:
    """The one-process ring: us of CPU a hop and hops a second over the window."""
    argv = [sys.executable, "-m", "nexus_trio.cli", "run", "--agents", str(agents)]
    argv += ["--duration", f"{window + _MARGIN:g}", "--workload", "ring"]
    argv += ["--json", "--no-live", "--metrics-port", str(port)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        cpu, counts, elapsed = _window([port], {"process": proc.pid}, window)
    finally:
        proc.wait(timeout=window * 10 + 120)
    hops = counts[0]["nexus_messages_handled"]
    return {"cpu_us_per_hop": cpu["process"] / hops * 1e6, "hops_per_s": hops / elapsed}


def split(cpu: dict[str, float], counts: list[dict[str, float]], elapsed: float) -> dict[str, Any]:
    """A window of the two-worker ring (``_window``'s) as figures a hop: the us of CPU of
    each process (``{name}_us_per_hop``) and in all (``cpu_us_per_hop``), each divided by
    the hops *both* workers handled; the hops a second; the rows a batch of each worker
    (its messages handled over its batches published: every hop of the ring crosses, so
    each message a worker handles it sends on in a batch)."""
    hops = sum(c["nexus_messages_handled"] for c in counts)
    if hops <= 0:
        raise RuntimeError("the window's agents handled no message")
    result: dict[str, Any] = {f"{name}_us_per_hop": s / hops * 1e6 for name, s in cpu.items()}
    result["cpu_us_per_hop"] = sum(cpu.values()) / hops * 1e6
    result["hops_per_s"] = hops / elapsed
    result["rows_per_batch"] = [
        c["nexus_messages_handled"] / c["nexus_cluster_batches_published"]
        if c["nexus_cluster_batches_published"]
        else 0.0
        for c in counts
    ]
    return result


def two_workers(agents: int, window: float, port: int) -> dict[str, Any]:
    """The ring over ``--workers 2``: us of CPU a hop of each process and in all, hops a
    second, rows a batch of each worker."""
    from nexus_trio.cli._cluster_cmd import run_workers

    found: dict[str, Any] = {}

    def measure() -> None:
        try:
            deadline = time.monotonic() + 60
            while True:
                kids = _children(os.getpid())
                workers = sorted(p for p, name in kids if name.startswith("python"))
                servers = [p for p, name in kids if name == "nats-server"]
                if len(workers) == 2 and servers:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no two workers and a nats-server among {kids}")
                time.sleep(0.1)
            pids = {"worker_a": workers[0], "worker_b": workers[1], "nats_server": servers[0]}
            found["window"] = _window([port, port + 1], pids, window)
        except Exception as exc:  # (said by the caller)
            found["error"] = exc

    sampler = threading.Thread(target=measure)
    sampler.start()
    demo = ["--agents", str(agents), "--duration", f"{window + _MARGIN + 2:g}"]
    summary, status = run_workers(2, [*demo, "--workload", "ring"], metrics_port=port)
    sampler.join()
    if status != 0 or "error" in found:
        raise RuntimeError(f"the --workers 2 ring failed: {found.get('error') or summary}")
    result = split(*found["window"])
    result["conserved"] = summary.get("conserved")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--window", type=float, default=4.0, help="seconds measured a run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--port", type=int, default=19660, help="first /metrics port (3 used)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rounds = []
    for _ in range(args.rounds):
        load = os.getloadavg()[0]
        one = one_process(args.agents, args.window, args.port + 2)
        two = two_workers(args.agents, args.window, args.port)
        rounds.append({"load": load, "one_process": one, "two_workers": two})
        if not args.json:
            print(
                f"load {load:.1f}: one process {one['cpu_us_per_hop']:.2f} us a hop"
                f" ({one['hops_per_s']:,.0f}/s); --workers 2 {two['cpu_us_per_hop']:.2f} us"
                f" (workers {two['worker_a_us_per_hop']:.2f} / {two['worker_b_us_per_hop']:.2f},"
                f" nats-server {two['nats_server_us_per_hop']:.2f}; {two['hops_per_s']:,.0f}/s;"
                " rows a batch "
                + " / ".join(f"{rows:.0f}" for rows in two["rows_per_batch"])
                + ")",
                flush=True,
            )
    if args.json:
        print(json.dumps(rounds, indent=2))


if __name__ == "__main__":
    main()
