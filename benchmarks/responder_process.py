"""The responder process of ``bench_nats.py`` and ``request_trace.py``: the calling
script run again with ``--serve SIDE --url URL``, which prints ``READY`` once it serves
and leaves at the end of its stdin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class ResponderProcess:
    """``script --serve side --url url`` in a process of its own, started and ready."""

    def __init__(self, script: str, side: str, url: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, script, "--serve", side, "--url", url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode().strip()
        if line != "READY":
            self.close()
            raise RuntimeError(f"{side} responder did not start (said {line!r})")

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()  # EOF: the responder leaves
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
