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


def test_the_tests_that_wait_on_the_package_index_start_first() -> None:
    """The install tests are marked ``starts_first``: the collection (the order xdist
    shares out) begins with them, whatever files come before, and keeps the others'
    order."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-n",
            "0",
            "tests/test_message.py",
            "tests/test_install.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    assert ids[:2] == [
        "tests/test_install.py::test_user_install_then_uninstall",
        "tests/test_install.py::test_the_image_install_joins_clusters_and_runs_workers",
    ]
    rest = ids[2:]
    assert rest[0].startswith("tests/test_message.py::")
    assert [i for i in rest if i.startswith("tests/test_install.py::")][:2] == [
        "tests/test_install.py::test_a_command_it_did_not_install_is_not_replaced_without_force",
        "tests/test_install.py::test_its_own_links_are_replaced_without_force",
    ]
