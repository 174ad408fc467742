"""The three-process example of docs/distributed.md, run as written.

tests/test_docs.py skips these two samples (they need a nats-server and a second
terminal); here the test plays terminal 1 (a real nats-server), runs the page's
``worker.py`` and ``client.py`` as separate processes, and checks the page's output.
"""

from __future__ import annotations

import ast
import json
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


def run_client(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``python client.py`` in ``tmp_path`` to its end (120 s at most), its output kept."""
    return subprocess.run(
        [sys.executable, "client.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


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

    # (its pipes closed at the end of the with, each a ResourceWarning otherwise)
    with subprocess.Popen(
        [sys.executable, "worker.py"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as worker:
        try:
            assert worker.stdout is not None
            deadline = time.monotonic() + 60
            line = ""
            while time.monotonic() < deadline:
                line = worker.stdout.readline()
                if line.startswith("worker ready") or not line:
                    break
            assert line.startswith("worker ready"), worker.stderr.read() if worker.stderr else ""

            client = run_client(tmp_path)
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


CLI_LINE = re.compile(r"`nexus run --nats (\S+) --node (\S+) --app\s+(\S+)`")
GREETER_CLIENT = """
import trio

from nexus_trio import open_kernel
from nexus_trio.nats import join_cluster


async def main():
    async with open_kernel() as kernel:
        async with join_cluster(kernel, {url!r}, "client") as cluster:
            node, _ = await cluster.wait_for_name("greeter", timeout=60)
            print(node)
            print(await kernel.request("greeter", "Ada", timeout=30))


trio.run(main)
"""


def test_the_page_s_command_line_serves_the_worker_s_greeter(
    nats: NatsServer, tmp_path: Path
) -> None:
    """`nexus run --nats URL --node worker --app worker:greeter`, with the page's worker.py
    in the current directory: the import must not run the page's own main (which blocked
    the import until a Ctrl-C, then left the CLI running on), and the CLI's kernel serves
    the greeter."""
    text = PAGE.read_text(encoding="utf-8")
    found = CLI_LINE.search(text)
    assert found is not None, "the page lost its command line"
    url_on_page, node, app = found.groups()
    assert (url_on_page, node, app) == (DOCS_URL, "worker", "worker:greeter")
    worker_src, _ = page_samples()
    url = nats.url
    (tmp_path / "worker.py").write_text(worker_src.replace(DOCS_URL, url), encoding="utf-8")
    (tmp_path / "client.py").write_text(GREETER_CLIENT.format(url=url), encoding="utf-8")
    argv = [sys.executable, "-m", "nexus_trio.cli", "run", "--nats", url, "--node", node]
    run = subprocess.Popen(
        [*argv, "--app", app, "-d", "120", "--json", "--no-live"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = run_client(tmp_path)
        assert client.returncode == 0, client.stderr
        assert client.stdout.splitlines() == ["worker", "hello Ada, from node worker"]
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGINT)
        try:
            out, err = run.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            run.kill()
            run.communicate()
            raise
    assert run.returncode == 0, err
    summary = json.loads(out)  # nothing but the summary: the page's main did not run
    assert summary["app"] == "worker:greeter"
    assert summary["stopped_by"] == "SIGINT"
