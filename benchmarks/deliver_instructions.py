"""Machine instructions per remote tell taken in through a transport handle
(``TransportHandle.deliver_nowait`` one at a time, or ``deliver_run_nowait`` in runs of
250, as a node batch's tells are), sent in and handled by a no-op agent: a count that does
not move with the machine's load (``valgrind --tool=callgrind``).

    python benchmarks/deliver_instructions.py [--against DIR] [--pairs 3]
                                              [--short 20000] [--long 60000]

Runs this file's ``--run`` under callgrind with ``--short`` and with ``--long`` tells and
prints the difference divided by the difference in tells (the start, the spawn and the
stop cancel out), ``PYTHONHASHSEED=0``. ``--against DIR``: measure the copy of
nexus_trio in ``DIR`` (a worktree) too, alternated with this one, ``--pairs`` times.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_RUN = 250  # tells a run (deliver_run_nowait)


def _workload(mode: str, tells: int) -> None:
    import trio
    import trio.testing

    from nexus_trio import Config, KernelConfig, Message, open_kernel

    class Nowhere:
        """Carries nothing: the tells come in through the handle, none go out."""

        async def deliver(self, msg: Message) -> None:
            raise AssertionError(msg)

        def deliver_nowait(self, msg: Message) -> None:
            raise AssertionError(msg)

        cancel_query = print  # (never called)

    async def noop(ctx: object, msg: Message) -> None:
        pass

    async def main() -> None:
        config = Config(kernel=KernelConfig(mailbox_capacity=_RUN * 2))
        async with open_kernel(config) as kernel:
            handle = kernel.attach_transport(Nowhere())  # type: ignore[arg-type]
            ref = kernel.spawn(noop)
            handle.deliver_nowait(Message(ref.id, ref.id, -1))  # (opens the mailbox)
            await trio.testing.wait_all_tasks_blocked()
            for first in range(0, tells, _RUN):
                batch = [Message(ref.id, ref.id, i) for i in range(first, first + _RUN)]
                if mode == "run":
                    assert handle.deliver_run_nowait(batch, 0) == _RUN
                else:
                    for msg in batch:
                        assert handle.deliver_nowait(msg)
                await trio.testing.wait_all_tasks_blocked()
            kernel.detach_transport()
            await kernel.shutdown()

    trio.run(main)


def _instructions(path: Path, mode: str, tells: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=str(path))
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                str(Path(__file__).resolve()),
                "--run",
                mode,
                str(tells),
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        text = Path(out).read_text()
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    assert found is not None, "no total in the callgrind output"
    return int(found.group(1))


def _per_tell(path: Path, mode: str, short: int, long: int) -> float:
    return (_instructions(path, mode, long) - _instructions(path, mode, short)) / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", nargs=2, metavar=("MODE", "TELLS"), help=argparse.SUPPRESS)
    parser.add_argument("--against", type=Path, help="another worktree, measured alternately")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--short", type=int, default=20_000)
    parser.add_argument("--long", type=int, default=60_000)
    parser.add_argument("--modes", default="nowait,run", help="nowait, run or both")
    args = parser.parse_args()
    if args.run:
        _workload(args.run[0], int(args.run[1]))
        return
    copies = [("this", _ROOT)] + ([("against", args.against)] if args.against else [])
    for pair in range(args.pairs):
        for mode in args.modes.split(","):
            for label, path in copies if pair % 2 == 0 else copies[::-1]:
                cost = _per_tell(path, mode, args.short, args.long)
                print(f"pair {pair + 1} {mode:6} {label:7} {cost:9.1f} instructions a tell")


if __name__ == "__main__":
    main()
