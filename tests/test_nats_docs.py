"""The three-process example of docs/distributed.md, run as written.

tests/test_docs.py skips these two samples (they need a nats-server and a second
terminal); here the test plays terminal 1 (a real nats-server), runs the page's
``worker.py`` and ``client.py`` as separate processes, and checks the page's output.
"""

from __future__ import annotations

import ast
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from nexus_trio._nats import NatsServer

PAGE = Path(__file__).resolve().parent.parent / "docs" / "distributed.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
DOCS_URL = "nats://127.0.0.1:4222"


def page_samples() -> tuple[str, str]:
    text = PAGE.read_text(encoding="utf-8")
    worker_at = text.index("Terminal 2")
    client_at = text.index("Terminal 3")
    worker = BLOCK.search(text, worker_at)
    client = BLOCK.search(text, client_at)
    assert worker is not None and client is not None, "the page lost its samples"
    assert worker.start() < client_at
    return worker.group(1), client.group(1)


def test_the_three_process_example_of_the_page_works_as_printed(
    nats: NatsServer, tmp_path: Path
) -> None:
    worker_src, client_src = page_samples()
    for src in (worker_src, client_src):
        ast.parse(src)
        assert DOCS_URL in src
    url = nats.url
    (tmp_path / "worker.py").write_text(worker_src.replace(DOCS_URL, url), encoding="utf-8")
    (tmp_path / "client.py").write_text(client_src.replace(DOCS_URL, url), encoding="utf-8")

    worker = subprocess.Popen(
        [sys.executable, "worker.py"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline:
            line = worker.stdout.readline()
            if line.startswith("worker ready") or not line:
                break
        assert line.startswith("worker ready"), worker.stderr.read() if worker.stderr else ""

        client = subprocess.run(
            [sys.executable, "client.py"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert client.returncode == 0, client.stderr
        lines = client.stdout.splitlines()
        assert lines[0] == "hello Ada, from node worker"
        answers = [ast.literal_eval(line) for line in lines[1:5]]
        assert [a["resized"] for a in answers] == [0, 1, 2, 3]
        assert {a["by"] for a in answers} <= {"resize-0", "resize-1"}
        assert lines[5] == "members: ['client', 'worker']"
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGINT)
        try:
            status = worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
            raise
    assert status == 0
