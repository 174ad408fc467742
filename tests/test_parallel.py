"""The suite under pytest-xdist: what a worker reports reaches the controller whole."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_lone_surrogate_in_captured_output_or_a_failure_does_not_end_the_run(
    tmp_path: Path,
) -> None:
    """Regression: a test that logged or printed a lone surrogate (what a hostile peer's
    JSON can hold, tests/test_logs.py), or failed with one in its error, made the worker's report unsendable: an
    INTERNALERROR ended the whole run at that test (pytest-dev/pytest-xdist#843). The
    suite's conftest escapes it; the run goes on and reports both tests."""
    module = tmp_path / "test_surrogates.py"
    module.write_text(
        textwrap.dedent(
            """
            import logging

            def test_logs_one():
                logging.getLogger("peer").warning("agent %s", "a\\ud800b")

            def test_fails_with_one():
                raise ValueError("peer sent \\udfff")
            """
        ),
        encoding="utf-8",
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            str(ROOT / "pyproject.toml"),
            "-n",
            "1",  # one worker sends its reports as any does
            "-p",
            "tests.conftest",
            "-rA",
            str(module),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        errors="backslashreplace",
        timeout=120,
        check=False,
    )
    out = result.stdout + result.stderr
    assert "INTERNALERROR" not in out, out
    assert result.returncode == 1, out
    assert "1 failed, 1 passed" in out, out
    assert "WARNING  peer:test_surrogates.py:5 agent a\\ud800b" in out  # its log, escaped
    assert "E       ValueError: peer sent \\udfff" in out  # the failure, escaped
