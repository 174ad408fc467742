"""``nexus`` in unusual terminals and environments: a standard output that is not UTF-8
(``PYTHONIOENCODING=ascii``, ``LC_ALL=C`` with UTF-8 mode off), a terminal far narrower
than the summary. Real processes, generous bounds."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

RUN = ["run", "-n", "10", "-d", "0.2", "--no-live"]


def nexus(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[bytes]:
    """``python -m nexus_trio.cli ARGS`` in ``cwd``, its standard output a pipe, with no
    ``NEXUS_*`` variables, no config file and ``env`` on top."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("NEXUS_", "PYTHONIOENCODING", "LC_", "COLUMNS", "LINES"))
    }
    return subprocess.run(
        [sys.executable, "-m", "nexus_trio.cli", *args],
        cwd=cwd,
        env=base | {"XDG_CONFIG_HOME": str(cwd / "xdg"), "NO_COLOR": "1"} | env,
        capture_output=True,
        timeout=120,
    )


NOT_UTF8 = {
    "ascii": {"PYTHONIOENCODING": "ascii"},
    "C-locale": {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"},
}


@pytest.mark.parametrize("env", NOT_UTF8.values(), ids=NOT_UTF8.keys())
def test_the_summary_on_an_output_that_is_not_utf8_is_written_in_ascii(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """The table holds µ, · and ✓: an ASCII standard output raised UnicodeEncodeError
    out of the run (a traceback, status 1, no summary). It is written with ASCII
    stand-ins now, the run's own status."""
    result = nexus(RUN, tmp_path, **env)
    err = result.stderr.decode("ascii", "replace")
    assert result.returncode == 0, err
    assert "Traceback" not in err
    text = result.stdout.decode("ascii")  # (every byte ASCII)
    assert re.search(r"handle latency[\s|]+p50 [\d.]+ (u|m)?s - p90", text), text
    assert re.search(r"accounting[\s|]+sent = handled .* ok", text, re.DOTALL), text
    assert "\\x" not in text and "?" not in text


@pytest.mark.parametrize("fmt", ["compact", "json", "pretty"])
@pytest.mark.parametrize("env", NOT_UTF8.values(), ids=NOT_UTF8.keys())
def test_the_log_lines_on_a_standard_error_that_is_not_utf8_use_ascii_marks(
    tmp_path: Path, env: dict[str, str], fmt: str
) -> None:
    """Regression: the run's log line named the workload with a middle dot, which the
    log wrote beneath standard error's stand-ins: ``ring workload \\xb7 10 agents`` (and
    in JSON a ``\\xb7`` escape, which is not JSON: the line did not load). The mark is
    its ASCII stand-in there, as on standard output."""
    result = nexus([*RUN, "-f", fmt], tmp_path, **env)
    err = result.stderr.decode("ascii")  # (every byte ASCII)
    assert result.returncode == 0, err
    lines = [line for line in err.splitlines() if "running ring workload" in line]
    assert len(lines) == 1, err
    assert "running ring workload - 10 agents for 0.2 s (Ctrl-C to stop)" in lines[0]
    if fmt == "json":
        assert [json.loads(line)["level"] for line in err.splitlines()] == ["info"] * len(
            err.splitlines()
        )
    assert "\\x" not in err and "\\u" not in err


def test_help_on_an_output_that_is_not_utf8_is_written(tmp_path: Path) -> None:
    result = nexus(["run", "--help"], tmp_path, PYTHONIOENCODING="ascii", COLUMNS="80")
    assert result.returncode == 0, result.stderr.decode("ascii", "replace")
    assert b"Traceback" not in result.stderr
    assert b"--duration" in result.stdout
    result.stdout.decode("ascii")


def test_the_summary_keeps_a_latin1_output_s_own_characters(tmp_path: Path) -> None:
    """Only what the encoding has not is replaced: latin-1 has µ and ·, not ✓."""
    result = nexus(RUN, tmp_path, PYTHONIOENCODING="latin-1")
    assert result.returncode == 0, result.stderr.decode("latin-1")
    text = result.stdout.decode("latin-1")
    assert re.search(r"handle latency[\s|]+p50 [\d.]+ (µ|m)?s · p90", text), text
    assert re.search(r"accounting[\s|]+sent = handled .* ok", text, re.DOTALL), text


def test_the_json_summary_is_unchanged_on_an_ascii_output(tmp_path: Path) -> None:
    result = nexus([*RUN, "--json"], tmp_path, PYTHONIOENCODING="ascii")
    assert result.returncode == 0
    assert json.loads(result.stdout)["conserved"] is True


@pytest.mark.parametrize("columns", ["20", "1"])
def test_the_summary_on_a_narrow_terminal_keeps_every_value(tmp_path: Path, columns: str) -> None:
    """At 20 columns the labels took the whole width and the values' column had none:
    every row was a label alone, every figure gone. The summary is at least 40 columns
    wide now (a narrower terminal wraps its lines), the figures all there."""
    result = nexus(RUN, tmp_path, COLUMNS=columns)
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode()
    lines = text.splitlines()
    assert max(len(line) for line in lines) >= 40
    assert re.search(r"stopped by\s+duration", text), text
    assert re.search(r"in flight\s+0\b", text), text
    assert re.search(r"run\s+ring workload, 10", text), text
    assert re.search(r"handled\s+[\d,]+", text), text
    assert "✓" in text


def test_nexus_send_writes_strict_json_on_an_ascii_output(tmp_path: Path) -> None:
    """An answer with "café ☕" raised UnicodeEncodeError on an ASCII standard output (a
    traceback, status 1, nothing printed). It is written with JSON's own escapes now."""
    echo = f"{sys.executable} -m nexus_trio.bridges.python"
    result = nexus(["send", echo, '{"name": "café ☕"}'], tmp_path, PYTHONIOENCODING="ascii")
    assert result.returncode == 0, result.stderr.decode("ascii", "replace")
    assert b"\\u00e9" in result.stdout
    assert json.loads(result.stdout.decode("ascii")) == {"name": "café ☕"}


@pytest.mark.parametrize("workload", ["ring", "fanout", "request", "pool"])
def test_a_tiny_rate_paces_the_demo_instead_of_unpacing_it(tmp_path: Path, workload: str) -> None:
    """``--rate 5e-324`` (a finite rate > 0, so accepted) made the pacer's interval
    infinite (its phase 0 x inf = NaN: never waiting), and the ring's rate per lap and the
    request pairs' rate per agent underflowed to 0, "unpaced": every workload ran as fast
    as the kernel goes (tens of thousands of messages in 0.5 s). At such a rate nothing
    comes after the first event: the ring's first token (one lap, 100 hops), the fanout
    driver's first message, the pool's (router and worker), the request pairs' "start"."""
    result = nexus(
        ["run", "-n", "2", "-d", "0.5", "-w", workload, "--rate", "5e-324", "--json"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout)
    assert summary["conserved"] is True
    assert summary["handled"] <= 100, summary["handled"]


def _config_init_on_a_full_disk(cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``nexus config init ARGS`` with every write to a regular file failing (``ulimit
    -f 0``: ``EFBIG``, as a full disk fails with ``ENOSPC``)."""
    command = shlex.join([sys.executable, "-m", "nexus_trio.cli", "config", "init", *args])
    return subprocess.run(
        ["bash", "-c", f"ulimit -f 0; trap '' XFSZ; exec {command}"],
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")},
        capture_output=True,
        timeout=120,
    )


def test_config_init_on_a_full_disk_leaves_no_empty_file_behind(tmp_path: Path) -> None:
    """The file was created, its write failed: the error was reported (status 1) but an
    empty config.toml stayed, and the retry once there was room refused it: "file exists;
    refusing to overwrite it". Nothing is left behind now; the retry writes it."""
    result = _config_init_on_a_full_disk(tmp_path, "config.toml")
    assert result.returncode == 1
    assert b"cannot write config file: File too large" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    again = nexus(["config", "init", "config.toml"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "config.toml").read_text().startswith("#")


def test_config_init_force_on_a_full_disk_keeps_the_file_it_would_replace(
    tmp_path: Path,
) -> None:
    """``--force`` truncated the file first: on a full disk the user's config was lost (an
    empty file). The template is written beside it and then put in its place."""
    (tmp_path / "config.toml").write_text("[kernel]\nmailbox_capacity = 7\n")
    result = _config_init_on_a_full_disk(tmp_path, "config.toml", "--force")
    assert result.returncode == 1
    assert b"cannot write config file: File too large" in result.stderr
    assert (tmp_path / "config.toml").read_text() == "[kernel]\nmailbox_capacity = 7\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pty (Linux)")
def test_a_dumb_terminal_gets_the_progress_lines_not_a_live_view_it_cannot_redraw(
    tmp_path: Path,
) -> None:
    """With ``TERM=dumb`` (an editor's shell, some CI consoles) on a terminal, the live
    view was chosen, and rich draws no frame on a terminal that cannot move its cursor:
    nothing was shown while the run ran (6 s: not a line; with ``-d 0``, never), only
    the last frame at the end. A dumb terminal gets the log line every 5 seconds now."""
    import pty
    import threading

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_trio.cli", "run", "-n", "10", "-d", "5.5"],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
        | {"TERM": "dumb", "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed it
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    reader.join(timeout=30)
    os.close(master)
    err = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, err
    # (the line of the 5-second tick; its ``t=`` is the run's own clock, which a loaded
    # machine can show as 4.9 s at that tick)
    assert re.search(r"nexus_trio\.cli t=[45]\.\ds phase=running agents=10 msg/s=", err), err
    assert "╭" not in err  # (no live view's frame)
    assert re.search(rb"stopped by\s+duration", out)
