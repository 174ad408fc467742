"""``nexus run`` under stop signals that come close together, late, or in the middle of
an app's spawning of 10,000 agents: real processes.

A second SIGINT or SIGTERM forces the exit (status 130) however soon after the first it
comes, and one that comes once the run is over (its summary being written, the process
exiting) is noted and ignored: the run's summary and status stand (docs/cli.md,
Signals). Each process is bounded by a timeout; the apps send the signals to their own
process at the moment the case is about, so nothing here depends on timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .test_cli import conserved

#: an app whose main sends its own process two stop signals back to back, the run going
#: on: the second must force the exit, not be merged into the first
TWICE_APP = """
    import os
    import signal

    import trio

    async def main(kernel):
        await trio.sleep(0.2)
        os.kill(os.getpid(), signal.{sig})
        os.kill(os.getpid(), signal.{sig})
        await trio.sleep_forever()
"""

#: the start of an app whose process gets one more stop signal once the run is over:
#: ``signal_late()``, called by its main, sends it while its summary is written (the
#: first write to standard output), or as the process exits (an exit function of the
#: app's, which runs before nexus_trio's)
SIGNAL_LATE = """
    import atexit
    import os
    import signal
    import sys

    import trio

    class Signalling:
        def __init__(self, stream):
            self.stream = stream
            self.sent = False

        def write(self, text):
            if not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.{sig})
            return self.stream.write(text)

        def __getattr__(self, name):
            return getattr(self.stream, name)

    def signal_late():
        if "{when}" == "summary":
            sys.stdout = Signalling(sys.stdout)
        else:
            atexit.register(os.kill, os.getpid(), signal.{sig})
"""

#: an app whose run is stopped by a first stop signal and gets one more once it is over
LATE_APP = (
    SIGNAL_LATE
    + """
    async def main(kernel):
        signal_late()
        await trio.sleep(0.2)
        os.kill(os.getpid(), signal.{sig})
        await trio.sleep_forever()
"""
)

#: an app whose run ends by itself (its main returns), and whose process gets one stop
#: signal after
ENDED_APP = (
    SIGNAL_LATE
    + """
    async def main(kernel):
        signal_late()
"""
)


def run_app(
    tmp_path: Path, source: str, *, json_out: bool = True
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "signal_app.py").write_text(textwrap.dedent(source))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")} | {
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.run(
        [
            *(sys.executable, "-m", "nexus_trio.cli", "run", "--app", "signal_app:main"),
            *(["--json"] if json_out else []),
        ],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_second_stop_signal_right_after_the_first_forces_the_exit(
    tmp_path: Path, sig: str
) -> None:
    """Regression: two stop signals that came before the run's signal task woke for the
    first (here back to back; a busy kernel of 10,000 agents took 10 ms apart ones so)
    were one for Trio's signal receiver, which merges a signal that comes again before
    it is taken: the run shut down gracefully, exit 0, as if the second never came."""
    done = run_app(tmp_path, TWICE_APP.format(sig=sig))
    assert done.returncode == 130, done.stderr
    assert f"{sig}: shutting down gracefully" in done.stderr
    assert f"{sig} again: forced exit, without waiting for the shutdown" in done.stderr
    assert done.stdout == ""  # no summary after a forced exit
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("when", ["summary", "exit"])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_once_the_run_is_over_is_ignored(tmp_path: Path, sig: str, when: str) -> None:
    """Regression: a second SIGINT or SIGTERM that came once the shutdown was over (the
    summary being written, the process exiting) met Python's own handling again, the
    run's receiver closed: a KeyboardInterrupt in the middle of the summary, or in an
    exit function (a traceback on standard error), or the process ended by SIGTERM's
    default action (exit status -15 after a whole summary). There was nothing left to
    force: it is ignored, and the summary and the run's status (0) stand."""
    done = run_app(tmp_path, LATE_APP.format(sig=sig, when=when))
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    assert "KeyboardInterrupt" not in done.stderr
    summary = json.loads(done.stdout)
    assert summary["stopped_by"] == sig
    assert summary["error"] is None
    assert conserved(summary)


@pytest.mark.parametrize("when", ["summary", "exit"])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_first_stop_signal_after_a_run_that_ended_by_itself_leaves_its_summary_and_status(
    tmp_path: Path, sig: str, when: str, sighup_default: None
) -> None:
    """Fifty-first pass, measured: a run that ended by itself (its app's ``main``
    returned) and then got its first stop signal, while its summary was written or as
    the process exited: the signal is noted and ignored, the summary is whole and the
    status the run's, 0, ``stopped_by`` the run's own end (docs/cli.md, Signals): there
    is nothing left to stop, and the run's status is what its caller reads. (A mutant
    that re-raises a stop noted after the run at the exit, as one before any run is:
    status -15 / -1 / -2.)"""
    done = run_app(tmp_path, ENDED_APP.format(sig=sig, when=when))
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    summary = json.loads(done.stdout)
    assert summary["stopped_by"] == "app finished"
    assert summary["error"] is None
    assert conserved(summary)


#: an app that spawns 10,000 agents, a few at a time, and gets a SIGTERM halfway
SPAWNING_APP = """
    import os
    import signal

    import trio

    from nexus_trio import agent

    @agent
    async def idle(ctx, msg):
        return None

    async def main(kernel):
        for i in range(10_000):
            if i == 5_000:
                os.kill(os.getpid(), signal.SIGTERM)
            ref = kernel.spawn(idle, name=f"a{i}")
            await kernel.send(ref, i)
            if i % 100 == 99:
                # (a send that finds room is no schedule point: one send in sixteen
                # checks for cancellation, and nothing else runs meanwhile)
                await trio.sleep(0)
        raise AssertionError("the stop did not end the spawning")
"""


def test_a_sigterm_while_the_app_spawns_ten_thousand_agents_stops_it_with_its_books_balanced(
    tmp_path: Path,
) -> None:
    """A SIGTERM halfway through an app's spawning of 10,000 agents (each sent a
    message, a pause every 100): the spawning ends at its next pause, the kernel drains
    what was sent and stops every agent spawned, and the summary's books balance, exit 0."""
    done = run_app(tmp_path, SPAWNING_APP)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    summary = json.loads(done.stdout)
    assert (summary["stopped_by"], summary["error"]) == ("SIGTERM", None)
    assert 5_000 <= summary["sent"] < 10_000  # (the stop is taken within a few pauses)
    assert summary["handled"] == summary["sent"]  # each agent its one message
    assert summary["dead_letters"] == 0
    assert conserved(summary)


#: an app that takes SIGUSR2 as its own stop and raises KeyboardInterrupt for it (as code
#: written for a sync loop does), then sends itself the signal: the interrupt reaches the run
INTERRUPT_APP = """
    import os
    import signal

    import trio

    async def main(kernel):
        with trio.open_signal_receiver(signal.SIGUSR2) as signals:
            await trio.sleep(0.2)
            os.kill(os.getpid(), signal.SIGUSR2)
            async for _ in signals:
                raise KeyboardInterrupt
"""


@pytest.mark.parametrize("json_out", [True, False], ids=["json", "table"])
def test_a_keyboard_interrupt_that_reaches_the_run_still_prints_its_summary(
    tmp_path: Path, json_out: bool
) -> None:
    """Forty-ninth pass: a KeyboardInterrupt (or a trio.Cancelled) that reached the run's
    kernel block went on as it came: a traceback, exit 1, no summary (with --json nothing
    on stdout for jq). The run ends as interrupted now: its summary (``stopped_by``
    ``interrupted``, the error named), the books of what it did, status 130 as a Ctrl-C's.
    (Fails on main, its _run.py swapped in: status 1, stdout empty.)"""
    done = run_app(tmp_path, INTERRUPT_APP, json_out=json_out)
    assert done.returncode == 130, done.stderr
    assert "the run was interrupted: KeyboardInterrupt reached the run" in done.stderr
    if json_out:
        summary = json.loads(done.stdout)
        assert (summary["stopped_by"], summary["error"]) == ("interrupted", "KeyboardInterrupt")
        assert summary["conserved"] is True
    else:
        lines = [" ".join(line.split()) for line in done.stdout.splitlines()]
        assert "stopped by interrupted" in lines, done.stdout
        assert "error KeyboardInterrupt" in lines, done.stdout
