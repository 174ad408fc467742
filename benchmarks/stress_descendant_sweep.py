"""Stress: does a process agent's stop leave any marked descendant behind?

The agent's child (tests/children/toy_agent.py) starts a grandchild that leaves its process
group and forks and execs ``sleep 300`` without end (20 alive at a time), so that the
kill sweeps find some of its children in the middle of their exec, when
``/proc/<pid>/environ`` reads empty. Then the agent is stopped in one of three ways and
the processes still carrying this kernel's mark 0.3 s later, with no SIGKILL pending, are
counted (read twice, 0.05 s apart, so that one read in its own exec window is counted),
reported, and killed.

    python benchmarks/stress_descendant_sweep.py --mode stop --runs 50
    python benchmarks/stress_descendant_sweep.py --mode close --runs 50
    python benchmarks/stress_descendant_sweep.py --mode sigkill --runs 30

``stop`` is ``kernel.stop(ref)``, ``close`` the end of ``open_kernel``, ``sigkill`` a
kernel in a subprocess killed by SIGKILL (the guardian sweeps). Linux only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import trio

from nexus_trio import Config, KernelConfig, open_kernel
from nexus_trio.bridges import _guardian, _lineage, process_agent

ROOT = Path(__file__).resolve().parent.parent
TOY = str(ROOT / "tests" / "children" / "toy_agent.py")
#: the agent's op (set from the command line)
LOOP: dict[str, object] = {"op": "spawn_loop"}

KILLED_KERNEL = textwrap.dedent(
    """
    import json, sys, trio
    from nexus_trio import Config, KernelConfig, open_kernel
    from nexus_trio.bridges import process_agent

    async def main():
        async with open_kernel(Config(kernel=KernelConfig(handle_timeout_ms=10_000))) as k:
            ref = k.spawn(process_agent([sys.executable, sys.argv[1]]))
            await k.request(ref, json.loads(sys.argv[3]))
            await trio.sleep(float(sys.argv[2]))
            print("ready", flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


def marked(owner_prefix: bytes) -> set[int]:
    """Pids whose marker holds a token of ``owner_prefix`` (zombies read empty: left out)."""
    environs = {pid: _guardian.Proc.environ(pid) for pid in _guardian.Proc.pids()}
    return {pid for pid, env in environs.items() if env and _guardian._has_token(env, owner_prefix)}


def kill_pending(pid: int) -> bool:
    """Whether ``pid`` has a SIGKILL pending (killed, not yet scheduled to die), or is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return True
    sigkill = 1 << (signal.SIGKILL - 1)
    return any(int(fields[key], 16) & sigkill for key in ("SigPnd", "ShdPnd") if key in fields)


def left_behind(owner_prefix: bytes) -> int:
    """Marked processes alive 0.3 s after the stop with no SIGKILL pending (killed after)."""
    time.sleep(0.3)
    pids = marked(owner_prefix)
    time.sleep(0.05)
    pids |= marked(owner_prefix)  # (one read in its own exec window is found here)
    left = sorted(pid for pid in pids if not kill_pending(pid))
    if left and os.environ.get("STRESS_VERBOSE"):
        for pid in left:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
                print("left:", f.read()[:80], file=sys.stderr)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return len(left)


async def one_in_process(mode: str, run_for: float) -> int:
    config = Config(kernel=KernelConfig(handle_timeout_ms=10_000))
    async with open_kernel(config) as kernel:
        ref = kernel.spawn(process_agent([sys.executable, TOY], shutdown_grace=0.3))
        await kernel.request(ref, LOOP)
        await trio.sleep(run_for)
        if mode == "stop":
            await kernel.stop(ref)
            left = left_behind(f"{_lineage.owner()}.".encode())
    if mode == "close":
        left = left_behind(f"{_lineage.owner()}.".encode())
    return left


def one_sigkilled(run_for: float, script: Path) -> int:
    kernel = subprocess.Popen(
        [sys.executable, str(script), TOY, str(run_for), json.dumps(LOOP)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert kernel.stdout is not None
    try:
        assert kernel.stdout.readline() == b"ready\n"
        kernel.kill()
        kernel.wait(timeout=10)
        # the guardian sweeps once its pipe closes: wait for it to end
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _guardian_of(kernel.pid):
            time.sleep(0.05)
        if time.monotonic() >= deadline:
            print("the guardian did not end in 10 s", file=sys.stderr)
        return left_behind(f"{kernel.pid}-".encode())
    finally:
        kernel.kill()
        kernel.wait(timeout=10)
        kernel.stdout.close()


def _guardian_of(kernel_pid: int) -> bool:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"_guardian.py") for arg in cmdline) and any(
            arg.startswith(f"{kernel_pid}-".encode()) for arg in cmdline
        ):
            return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["stop", "close", "sigkill"], default="stop")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--run-for", type=float, default=0.3, help="seconds of forking")
    parser.add_argument("--loopers", type=int, default=1, help="forking processes")
    parser.add_argument("--sh", action="store_true", help="children run sh -c 'exec sleep'")
    args = parser.parse_args()
    LOOP["loopers"] = args.loopers
    if args.sh:
        LOOP["argv"] = ["/bin/sh", "-c", "exec sleep 300"]
    script = Path(f"/tmp/stress_descendant_sweep_{os.getpid()}.py")
    script.write_text(KILLED_KERNEL)
    counts = []
    try:
        for _ in range(args.runs):
            if args.mode == "sigkill":
                counts.append(one_sigkilled(args.run_for, script))
            else:
                counts.append(trio.run(one_in_process, args.mode, args.run_for))
    finally:
        script.unlink()
    leaky = sum(1 for c in counts if c)
    print(
        f"mode={args.mode} loopers={args.loopers} sh={args.sh} runs={len(counts)} runs_with_leaks={leaky} "
        f"processes_left={sum(counts)} per_run={counts} load={os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
