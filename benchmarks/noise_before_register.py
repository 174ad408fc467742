"""What noise on stdout before the register costs the kernel: CPU time of the kernel process.

A process agent's child writes ``--lines`` lines of noise (``--kind``: a banner line of text,
or a JSON log record) as fast as it can, then its register frame, then answers messages.
The kernel process's CPU time (``time.process_time``, so the machine's load does not
count) from the spawn until the first answer is printed, less the same run with no noise
(``--lines 0``), per line. Runs alternate noise and no noise.

    python benchmarks/noise_before_register.py --lines 200000 --runs 3

``--flood`` instead has the child write noise for ever and never register: the kernel's CPU
time until the start fails is printed (at ``register_timeout``, 10 s, or at the bound on
noise before the register), with the lines skipped.

    python benchmarks/noise_before_register.py --flood --runs 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import trio

from nexus_trio import Config, EventKind, KernelConfig, open_kernel
from nexus_trio.bridges import bridge_stats, process_agent, stopped_bridge_stats

CHILD = textwrap.dedent(
    """
    import json, sys
    out = sys.stdout.buffer
    line = {line!r}
    block = line * 1000
    for _ in range({lines} // 1000):
        out.write(block)
    out.write(line * ({lines} % 1000))
    out.write(json.dumps({{"type": "register", "payload": {{"id": "x", "name": "n"}}}}).encode()
              + b"\\n")
    out.flush()
    for raw in sys.stdin.buffer:
        frame = json.loads(raw)
        if frame["type"] != "message":
            break
        m = frame["payload"]
        out.write(json.dumps({{"type": "response", "payload": {{
            "from": m["to"], "to": m["from"], "kind": "Response", "payload": "ok",
            "conversation_id": m.get("conversation_id")}}}}).encode() + b"\\n")
        out.flush()
    """
)

LINES = {
    "banner": b"Loading model weights... step 12345 of 99999\n",
    "jsonlog": json.dumps({"level": "info", "msg": "loading", "step": 12345}).encode() + b"\n",
    "long": b"progress " + b"#" * 65_536 + b"\n",
}


FLOOD = textwrap.dedent(
    """
    import sys
    block = {line!r} * 1000
    while True:
        sys.stdout.buffer.write(block)
    """
)


async def flood(path: Path) -> tuple[float, int, str]:
    async with open_kernel(Config()) as kernel:
        start = time.process_time()
        async with kernel.events() as events:
            ref = kernel.spawn(
                process_agent([sys.executable, str(path)], name="n", restart="temporary")
            )
            async for event in events:
                if event.agent_id == ref.id and event.kind is EventKind.FAILED:
                    break
        spent = time.process_time() - start
    skipped = stopped_bridge_stats(kernel).agents[ref.id].invalid_lines
    return spent, skipped, str(getattr(event.error, "problem", ""))[:60]


async def one(path: Path, timeout: float) -> tuple[float, int]:
    async with open_kernel(Config(kernel=KernelConfig(handle_timeout_ms=60_000))) as kernel:
        start = time.process_time()
        ref = kernel.spawn(
            process_agent([sys.executable, str(path)], name="n", register_timeout=timeout)
        )
        assert await kernel.request(ref, "hi", timeout=300) == "ok"
        spent = time.process_time() - start
        skipped = bridge_stats(kernel)[ref.id].invalid_lines
    return spent, skipped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--kind", choices=sorted(LINES), default="banner")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--flood", action="store_true")
    args = parser.parse_args()
    if args.flood:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "flood.py")
            path.write_text(FLOOD.format(line=LINES[args.kind]))
            for run in range(args.runs):
                spent, skipped, error = trio.run(flood, path)
                print(f"run {run}: flood: {spent:.3f} s CPU, {skipped:,} lines skipped: {error}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        noisy, quiet = Path(tmp, "noisy.py"), Path(tmp, "quiet.py")
        noisy.write_text(CHILD.format(line=LINES[args.kind], lines=args.lines))
        quiet.write_text(CHILD.format(line=LINES[args.kind], lines=0))
        for run in range(args.runs):
            with_noise, skipped = trio.run(one, noisy, 600.0)
            without, _ = trio.run(one, quiet, 600.0)
            per_line = (with_noise - without) / max(args.lines, 1) * 1e6
            print(
                f"run {run}: {args.lines:,} {args.kind} lines ({skipped:,} skipped):"
                f" {with_noise:.3f} s CPU, without {without:.3f} s: {per_line:.2f} us a line"
            )


if __name__ == "__main__":
    main()
