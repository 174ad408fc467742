"""Every Python sample in README.md and docs/*.md runs, and the docs site's nav is complete.

Convention (also in docs/index.md): a fenced ``python`` block runs unless the last
non-blank line before its fence is the HTML comment ``<!-- no-run -->`` (optionally
``<!-- no-run: why -->``), which the rendered page does not show. ``<!-- file: NAME.py -->``
instead names the file the reader is told to save the block as: other blocks may import it
(``from myagents import app``). A block that defines ``test_*`` functions is a pytest module:
all such blocks run in one pytest process with ``trio_mode = true``, the setup
docs/testing.md tells users to have, and each of their tests must pass. Any other block is a
script: it runs with ``python`` in a process of its own (so ``trio.run(main)`` at the bottom
runs) and must exit 0 within two minutes. Apart from named files, blocks run independently.
"""

from __future__ import annotations

import ast
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest

from .conftest import run_pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)\s*(?P<info>[^\n`]*)$")
NO_RUN = re.compile(r"^\s*<!--\s*no-run\b.*-->\s*$")
FILE_NAME = re.compile(r"^\s*<!--\s*file:\s*(?P<name>[A-Za-z_]\w*\.py)\s*-->\s*$")


@attrs.frozen
class Block:
    page: Path
    line: int  # 1-based line of the first line of code
    source: str
    runs: bool
    filename: str | None = None

    @property
    def label(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def is_test_module(self) -> bool:
        tree = ast.parse(self.source)
        return any(
            isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")
            for node in tree.body
        )


def extract_blocks(page: Path) -> list[Block]:
    """The fenced ``python`` blocks of one Markdown page, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        language = match["info"].strip().split(" ")[0].lstrip(".{").lower()
        previous = next((line for line in reversed(lines[:i]) if line.strip()), "")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        if j == len(lines):
            raise AssertionError(f"{page}:{i + 1}: code fence is never closed")
        if language in {"python", "py"}:
            named = FILE_NAME.match(previous)
            blocks.append(
                Block(
                    page,
                    i + 2,
                    "\n".join(body) + "\n",
                    runs=not NO_RUN.match(previous),
                    filename=named["name"] if named else None,
                )
            )
        i = j + 1
    return blocks


SCRIPT_TIMEOUT = 120  # seconds; the samples take well under one

ALL_BLOCKS = [block for page in PAGES for block in extract_blocks(page)]
NAMED = {b.filename: b for b in ALL_BLOCKS if b.filename}


def write_named_files(directory: Path) -> None:
    """The blocks the docs tell the reader to save as files, saved there."""
    for name, block in NAMED.items():
        (directory / name).write_text(f"# {block.label}\n{block.source}", encoding="utf-8")


def test_named_files_are_unique() -> None:
    names = [b.filename for b in ALL_BLOCKS if b.filename]
    assert len(names) == len(set(names)), f"two samples save to the same file: {names}"


SCRIPTS = [b for b in ALL_BLOCKS if b.runs and not b.is_test_module]
TEST_MODULES = [b for b in ALL_BLOCKS if b.runs and b.is_test_module]


def test_extraction_follows_the_convention(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n```python\nx = 1\n```\n\n<!-- no-run: a fragment -->\n```python\nkernel\n```\n"
        "\n```toml\n[kernel]\n```\n\n- item:\n\n    ```python\n    y = 2\n    ```\n"
        "<!-- file: mod.py -->\n```py\nz = 3\n```\n",
        encoding="utf-8",
    )
    blocks = extract_blocks(page)
    assert [(b.line, b.source, b.runs, b.filename) for b in blocks] == [
        (4, "x = 1\n", True, None),
        (9, "kernel\n", False, None),
        (19, "y = 2\n", True, None),
        (23, "z = 3\n", True, "mod.py"),
    ]


def test_the_docs_have_samples_that_run() -> None:
    assert len(SCRIPTS) >= 3
    assert len(TEST_MODULES) >= 2


@pytest.mark.parametrize("block", SCRIPTS, ids=lambda b: b.label)
def test_script_sample_runs(block: Block, tmp_path: Path) -> None:
    # In a process of its own, with a timeout: a sample that hangs fails instead of hanging
    # the suite. Blank lines in front keep the page's line numbers in a traceback.
    write_named_files(tmp_path)
    script = tmp_path / f"sample_{block.page.stem}_line_{block.line}.py"
    script.write_text("\n" * (block.line - 1) + block.source, encoding="utf-8")
    try:
        result = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT,
            cwd=tmp_path,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.label}: still running after {SCRIPT_TIMEOUT} s")
    assert result.returncode == 0, f"{block.label} failed:\n{result.stdout}{result.stderr}"


def test_pytest_samples_pass(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n", encoding="utf-8")
    write_named_files(tmp_path)
    expected = 0
    for index, block in enumerate(TEST_MODULES):
        if block.filename is None:
            module = tmp_path / f"test_sample_{index}.py"
            module.write_text(f"# {block.label}\n{block.source}", encoding="utf-8")
        expected += sum(
            1
            for node in ast.parse(block.source).body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")
        )
    result = run_pytest(tmp_path, timeout=300)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert re.search(rf"\b{expected} passed\b", report), report


# --- the site ----------------------------------------------------------------------------------


def nav_pages() -> list[str]:
    """The Markdown files named in mkdocs.yml's nav (lines like ``- Title: page.md``)."""
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text.split("\nnav:\n", 1)[1]
    nav = re.split(r"\n(?=\S)", nav, maxsplit=1)[0]
    return re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?([\w./-]+\.md)\s*$", nav, flags=re.M)


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    listed = nav_pages()
    assert len(listed) == len(set(listed)), f"pages listed twice: {listed}"
    present = {p.name for p in DOCS.glob("*.md")}
    assert set(listed) - present == set(), f"nav entries without a page: {set(listed) - present}"
    assert present - set(listed) == set(), f"pages missing from the nav: {present - set(listed)}"


def test_the_quickstart_app_runs_under_nexus_run(tmp_path: Path) -> None:
    """Step 5 of docs/quickstart.md: `nexus run --app myagents:app` next to myagents.py."""
    page = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    assert "nexus run --app myagents:app --duration 5" in page
    write_named_files(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nexus_trio.cli",
            "run",
            "--app",
            "myagents:app",
            "--duration",
            "2.5",
            "--log-format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"sent 1, total is 1"' in result.stderr, result.stderr
    assert '"sent 2, total is 3"' in result.stderr, result.stderr


# --- what the pages name -----------------------------------------------------------------------


def prose(page: Path) -> str:
    """A page without its fenced blocks (code the page shows, not names it claims)."""
    lines, inside, kept = page.read_text(encoding="utf-8").splitlines(), None, []
    for line in lines:
        match = FENCE.match(line)
        if inside is None and match:
            inside = match["fence"]
        elif inside is not None and line.strip().startswith(inside):
            inside = None
        elif inside is None:
            kept.append(line)
    return "\n".join(kept)


def defined_tests() -> set[str]:
    return {
        node.name
        for path in (ROOT / "tests").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_test_and_test_file_the_docs_name_exists() -> None:
    """A semantics table names the tests that prove each row: a renamed or removed test
    must take its row with it."""
    tests = defined_tests()
    missing = [
        f"{page.relative_to(ROOT)}: {name}"
        for page in PAGES
        for name in re.findall(r"`(test_\w+)`", prose(page))
        if name not in tests
    ]
    missing += [
        f"{page.relative_to(ROOT)}: {path}"
        for page in PAGES
        for path in re.findall(r"`(tests/[\w/.]+)`", prose(page))
        if not (ROOT / path).exists()
    ]
    assert missing == [], "the docs name tests that do not exist:\n" + "\n".join(missing)


# (labels named, `{reason}`, or matched, `{worker="worker-1"}`: a name given with the
# values of a sample is a name too, s54g)
METRIC = re.compile(r"`(nexus_(?!trio\b|kernel\b|bridge)[a-z_]+)(?:\{[^`}]*\})?`")


def test_the_metric_names_in_the_docs_are_those_a_scrape_has() -> None:
    """Every ``nexus_*`` series a scrape can have is in docs/cli.md, and every metric name a
    page gives is one a scrape has."""
    from nexus_trio import Config, MetricsConfig, agent
    from nexus_trio._nats._metrics import ClusterCollector
    from nexus_trio.metrics import EndpointStats, MetricsRenderer, add_collector
    from nexus_trio.nats import ClusterStats
    from nexus_trio.testing import open_test_kernel

    @agent(name="echo")
    async def echo(ctx: object, msg: object) -> int:
        return 1

    async def scrape() -> str:
        config = Config(metrics=MetricsConfig(per_agent=True))
        async with open_test_kernel(config) as kernel:
            kernel.spawn(echo)
            await kernel.request("echo", None)
            renderer = MetricsRenderer.for_kernel(kernel)
            renderer.endpoint = EndpointStats()  # (as serve_metrics sets: its own series)
            # a joined node's series (join_cluster adds them), of stats all at 0
            zero = {f.name: 0 for f in attrs.fields(ClusterStats) if f.default is attrs.NOTHING}
            stats = ClusterStats(**{**zero, "node": "a", "inbound_dropped": {}, "members": ()})
            stats = attrs.evolve(stats, errors_replied={}, errors_unsent={})
            add_collector(kernel, ClusterCollector(lambda: stats))
            return (await renderer.render()).decode()

    import trio

    text = trio.run(scrape)
    scraped = set(re.findall(r"^# TYPE (nexus_\w+) ", text, flags=re.M))
    assert len(scraped) > 20, scraped
    # and the series of a --workers run's group endpoint (--group-port), beside its workers'
    from nexus_trio.cli._group_endpoint import (
        RUNNING,
        GroupEndpoint,
        GroupState,
        render_group_metrics,
    )

    endpoint = GroupEndpoint(
        "127.0.0.1", 0, [0], lambda: GroupState(stopping=False, workers=((RUNNING, ""),))
    )
    # (the endpoint's own series, as a scrape of it has them)
    group = render_group_metrics([text], own=lambda: endpoint._own_series(0.0, {0: 0.0})).decode()
    scraped |= set(re.findall(r"^# TYPE (nexus_\w+) ", group, flags=re.M))
    documented = {
        page.relative_to(ROOT).as_posix(): set(METRIC.findall(prose(page))) for page in PAGES
    }
    named_anywhere = set().union(*documented.values())
    assert named_anywhere - scraped == set(), "metrics the docs name that no scrape has"
    in_cli = documented["docs/cli.md"]
    # (a cluster's series are listed with the counts they export, docs/cli.md points there)
    in_cluster = documented["docs/distributed.md"]
    undocumented = {
        name
        for name in scraped - in_cli
        if not (name.endswith("_max") and name.removesuffix("_max") in in_cli)
        and not (name.startswith("nexus_cluster_") and name in in_cluster)
    }
    assert undocumented == set(), "metrics a scrape has that the docs do not list"
    assert any(name.startswith("nexus_cluster_") for name in scraped)


#: ``kernel.stats().x``, ``stats().x``, ``stats(agents=True)`` and ``cluster.stats().x`` in prose
STATS_FIELD = re.compile(r"`(?:(\w+)\.)?stats\((?:agents=True)?\)\.(\w+)")


def test_every_stats_counter_the_docs_name_is_one_stats_has() -> None:
    """A counter a page tells the reader to look at in ``stats()`` is a field of what
    ``kernel.stats()`` (``KernelStats``) or ``cluster.stats()`` (``ClusterStats``)
    returns; a page about the cluster may name either."""
    from nexus_trio import KernelStats
    from nexus_trio.nats import ClusterStats

    kernel_fields = {field.name for field in attrs.fields(KernelStats)}
    cluster_fields = {field.name for field in attrs.fields(ClusterStats)}
    named: list[tuple[str, str | None, str]] = [
        (page.name, owner or None, field)
        for page in PAGES
        for owner, field in STATS_FIELD.findall(prose(page))
    ]
    assert len(named) > 20, named
    unknown = [
        f"{page}: {owner or ''}{'.' if owner else ''}stats().{field}"
        for page, owner, field in named
        if not (
            field in kernel_fields
            if owner == "kernel" or (owner is None and page != "distributed.md")
            else field in (cluster_fields if owner == "cluster" else kernel_fields | cluster_fields)
        )
    ]
    assert unknown == [], "counters the docs name that stats() does not have"


def test_the_lifecycle_event_kinds_supervision_md_lists_are_those_there_are() -> None:
    from nexus_trio import EventKind, LifecycleEvent

    page = prose(DOCS / "supervision.md")
    section = page.split("`kernel.events()` is a bounded stream of", 1)[1].split("\n\n", 1)[0]
    shape, kinds = section.split("kinds", 1)
    fields = re.search(r"LifecycleEvent\(([^)]*)\)", shape)
    assert fields is not None
    assert [f.strip() for f in fields[1].split(",")] == [
        field.name for field in attrs.fields(LifecycleEvent)
    ]
    listed = re.findall(r"`([a-z_]+)`", kinds.split("A nested supervisor", 1)[0])
    assert listed == [kind.value for kind in EventKind]


def test_every_logger_the_package_logs_on_is_named_on_the_config_page() -> None:
    """docs/config.md lists the loggers under ``nexus_trio``, the names a filter or a level
    is set on: every one the package logs on is there (before: the pool's, the CLI's, the
    metrics endpoint's, the bridges', the cluster's and ``nexus_trio.logs`` were not), and
    the page names no other."""
    source = "\n".join(
        path.read_text(encoding="utf-8") for path in (ROOT / "nexus_trio").rglob("*.py")
    )
    used = set(re.findall(r'getLogger\(\s*"(nexus_trio\.[\w.]+)"', source))
    used |= set(re.findall(r'LogRecord\(\s*"(nexus_trio\.[\w.]+)"', source))
    assert {"nexus_trio.kernel", "nexus_trio.logs", "nexus_trio.nats.durable"} <= used
    page = prose(DOCS / "config.md").split("\n## Logging\n", 1)[1].split("\n\n", 1)[0]
    assert set(re.findall(r"`(nexus_trio\.[\w.]+)`", page)) == used


def test_every_flag_of_nexus_run_is_in_the_flag_table_of_the_cli_page() -> None:
    import typer

    from nexus_trio.cli import app

    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    table = page.split("## `nexus run`", 1)[1].split("\n\n", 2)[1]
    run = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    flags = [flag for param in run.params for flag in (*param.opts, *param.secondary_opts)]
    assert "--workers" in flags
    missing = [flag for flag in flags if not re.search(rf"`{re.escape(flag)}[ `]", table)]
    assert missing == [], f"flags of nexus run missing from docs/cli.md's table: {missing}"


def test_the_flag_table_of_the_cli_page_names_every_value_a_choice_flag_takes() -> None:
    """Regression: the row of ``-f`` named ``compact``, ``json`` and ``pretty``, not
    ``full``, which ``nexus run -f full`` takes (the original Nexus's name) and its
    ``--help`` lists."""
    from nexus_trio.cli._app import LogFormat, LogLevel, Workload

    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    rows = {line.split("`")[1]: line for line in page.splitlines() if line.startswith("| `-")}
    missing = [
        f"{flag} {value.value}"
        for flag, values in (("-l", LogLevel), ("-f", LogFormat), ("-w", Workload))
        for value in values
        if f"`{value.value}`" not in rows[flag]
    ]
    assert missing == [], f"values docs/cli.md's flag table does not name: {missing}"


def test_the_testing_page_names_every_section_test_config_takes() -> None:
    """Regression: docs/testing.md listed seven sections for ``test_config(section={...})``;
    it takes ``cluster=`` and ``durable=`` too (every field of ``Config``)."""
    from nexus_trio import Config

    page = (DOCS / "testing.md").read_text(encoding="utf-8")
    listed = re.search(r"for every section \(([^)]*)\)", page)
    assert listed is not None
    sections = re.findall(r"`(\w+)`", listed[1])
    assert sections == [field.name for field in attrs.fields(Config)]


@pytest.mark.parametrize("name", ["kernel.md", "concepts.md"])
def test_the_pages_that_list_the_dead_letter_reasons_list_every_one(name: str) -> None:
    from nexus_trio import DeadLetterReason

    page = (DOCS / name).read_text(encoding="utf-8")
    section = page.split("\n## Dead letters\n", 1)[1].split("```", 1)[0]
    listed = set(re.findall(r"`([a-z_]+)`", section))
    missing = {reason.value for reason in DeadLetterReason} - listed
    assert missing == set(), f"dead-letter reasons missing from docs/{name}: {missing}"


def test_the_send_durable_row_names_every_stream_limit_a_refusal_names() -> None:
    """Fifty-seventh pass: the delivery table's row for ``send_durable`` said the stream
    refused a message only when full past its ``max_messages``; a refusal names each
    limit of the stream JetStream refuses past (an operator's ``max_bytes`` or
    ``max_msgs_per_subject`` with discard new), which the row now names too. (On main:
    ``{'max_bytes', 'max_msgs_per_subject'}`` missing.)"""
    from nexus_trio._nats import _durable

    page = (DOCS / "distributed.md").read_text(encoding="utf-8")
    row = next(line for line in page.splitlines() if line.startswith("| **durable** ("))
    named = {
        "max_messages" if limit == "max_msgs" else limit
        for limit in _durable.STORE_LIMITS_SAID.values()
    }
    missing = {limit for limit in named if f"`{limit}`" not in row}
    assert missing == set(), f"stream limits the send_durable row does not name: {missing}"


#: what docs/bridges.md tells a user without nexus_trio to do with the Python bridge file
COPY_THE_BRIDGE = re.compile(
    r"copy\s+(?:the\s+file|`(?P<source>[\w/.-]+)`)\s+next\s+to\s+your\s+agent\s+as\s+"
    r"`(?P<name>\w+\.py)`.*?`(?P<line>from \w+ import NexusAgent)`",
    re.DOTALL,
)


def test_the_python_bridge_copied_as_the_docs_say_runs_the_greeter_without_nexus_trio(
    tmp_path: Path,
) -> None:
    """Regression: docs/bridges.md said an agent needs neither nexus_trio nor Trio, "you may
    copy the file next to your agent", but not under which name nor how to import it, and
    its greeter imports ``nexus_trio.bridges.python`` (which imports the kernel: Trio,
    attrs, cattrs). The page now says what to name the copy and which import to write;
    done so, the greeter runs under a Python that sees neither (``-E -s -S``: no
    site-packages, no PYTHONPATH)."""
    text = " ".join((DOCS / "bridges.md").read_text(encoding="utf-8").split())
    told = COPY_THE_BRIDGE.search(text)
    assert told is not None, "bridges.md does not say how to use a copy of the bridge file"
    source = ROOT / (told["source"] or "nexus_trio/bridges/python.py")
    (tmp_path / told["name"]).write_bytes(source.read_bytes())
    greeter = NAMED["greeter.py"].source
    assert "from nexus_trio.bridges.python import NexusAgent" in greeter
    greeter = greeter.replace("from nexus_trio.bridges.python import NexusAgent", told["line"])
    (tmp_path / "greeter.py").write_text(greeter)
    frames = (
        '{"type":"message","payload":{"from":"00000000-0000-0000-0000-000000000000",'
        '"to":"greeter","kind":"Query","payload":{"name":"Ada"},'
        '"id":"7d9f4c2e-0000-4000-8000-000000000001","timestamp":"2026-01-01T00:00:00Z"}}\n'
        '{"type":"shutdown","payload":{}}\n'
    )
    done = subprocess.run(
        [sys.executable, "-E", "-s", "-S", "greeter.py"],
        cwd=tmp_path,
        input=frames,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    register, response = (json.loads(line) for line in done.stdout.splitlines())
    assert register["type"] == "register"
    assert register["payload"]["name"] == "greeter"
    assert response["type"] == "response"
    assert response["payload"]["payload"] == {"greeting": "hello, Ada"}
    assert "greeting Ada" in done.stderr


def test_every_bench_scenario_is_named_by_nexus_bench_help_and_the_benchmarks_page() -> None:
    """Regression: ``goals`` runs in every ``nexus bench`` (and is what ``-s goals`` of
    docs/benchmarks.md measures), but ``nexus bench --help`` listed the scenarios without
    it, twice, and so did the page's table of what each scenario does."""
    import typer

    from nexus_trio.bench._runner import SCENARIOS
    from nexus_trio.cli import app

    bench = typer.main.get_command(app).commands["bench"]  # type: ignore[attr-defined]
    scenario = next(p for p in bench.params if "--scenario" in p.opts)
    listings = {
        "--scenario's help": scenario.help,
        "the epilog": bench.epilog.split("Scenarios:", 1)[1],
    }
    for where, text in listings.items():
        named = re.findall(r"\b[a-z]+\b", text.split(":", 1)[-1])
        assert named == list(SCENARIOS), f"nexus bench --help, {where}: {named}"
    page = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    table = page.split("| scenario | what | baselines |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert rows == list(SCENARIOS), f"docs/benchmarks.md's scenario table: {rows}"


#: the page that documents each command's flags (`nexus run`'s are in a table of its own)
COMMAND_PAGES = {
    "version": "cli.md",
    "health": "cli.md",
    "send": "bridges.md",
    "bench": "benchmarks.md",
    "config init": "cli.md",
    "config show": "cli.md",
}


def test_every_flag_of_every_other_command_is_named_on_its_page() -> None:
    """Regression: docs/benchmarks.md, the page of ``nexus bench``, never named ``--smoke``,
    ``--no-progress`` or ``--scenario`` (only ``-s``)."""
    import typer

    from nexus_trio.cli import app

    root = typer.main.get_command(app)
    commands: dict[str, Any] = {}
    for name, command in root.commands.items():  # type: ignore[attr-defined]
        for sub_name, sub in getattr(command, "commands", {}).items():
            commands[f"{name} {sub_name}"] = sub
        if not hasattr(command, "commands"):
            commands[name] = command
    assert set(commands) - {"run"} == set(COMMAND_PAGES), "a command without its page here"
    pages = {page: (DOCS / page).read_text(encoding="utf-8") for page in COMMAND_PAGES.values()}
    missing = [
        f"nexus {name}: {flag} (docs/{page})"
        for name, page in COMMAND_PAGES.items()
        for param in commands[name].params
        for flag in (*param.opts, *param.secondary_opts)
        if flag.startswith("--")
        and flag != "--help"
        and not re.search(rf"(?<![\w-]){re.escape(flag)}\b(?!-)", pages[page])
    ]
    assert missing == [], "flags their page does not name:\n" + "\n".join(missing)


def test_the_summary_the_cli_page_shows_has_the_rows_a_ring_run_prints(tmp_path: Path) -> None:
    """Regression: the captured summary of ``nexus run --agents 1000 --duration 10`` in
    docs/cli.md had no ``run failures`` row, which every summary has had since
    ``run_failures`` was added: the page showed output nexus no longer prints."""
    from rich.console import Console

    from nexus_trio.cli._view import summary_table

    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    shown = page.split("### A real run: `nexus run --agents 1000 --duration 10`", 1)[1]
    shown = re.split(r"nexus run summary *\n", shown, maxsplit=1)[1].split("```", 1)[0]
    shown_rows = [line.strip().split("  ")[0] for line in shown.splitlines() if line.strip()]
    done = subprocess.run(
        [sys.executable, "-m", "nexus_trio.cli", "run", "-n", "1000", "-d", "0.5", "--json"],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(summary_table(json.loads(done.stdout)))
    printed = re.split(r"nexus run summary *\n", console.export_text(), maxsplit=1)[1]
    printed_rows = [line.strip().split("  ")[0] for line in printed.splitlines() if line.strip()]
    assert shown_rows == printed_rows


def test_the_frames_the_cli_page_shows_agree_with_its_summary() -> None:
    """Regression: the last frame of the captured run showed ``max mailbox 0`` where the
    frame halfway showed 65: the figure is the kernel's high water
    (``stats().max_mailbox_depth``), which never goes down, so the capture predated it.
    The last frame shows the summary's figures; its high water is at least the halfway one."""
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    shown = page.split("### A real run: `nexus run --agents 1000 --duration 10`", 1)[1]
    half_frame, last = re.findall(r"^```\n(.*?)^```", shown, flags=re.M | re.S)[:2]
    last_frame, summary = re.split(r"^ *nexus run summary *\n", last, maxsplit=1, flags=re.M)

    def cells(frame: str) -> dict[str, str]:
        pairs = re.findall(r"([A-Za-z][A-Za-z0-9/ ]*?) {2,}([-0-9.,]+(?: [µm]?s| MiB)?)", frame)
        return {label.strip(): value for label, value in pairs}

    half, final = cells(half_frame), cells(last_frame)
    rows = {
        label: value.strip()
        for label, value in (
            line.strip().split("  ", 1) for line in summary.splitlines() if "  " in line.strip()
        )
    }
    deepest = [int(frame["max mailbox"].replace(",", "")) for frame in (half, final)]
    assert deepest[1] >= deepest[0], (half, final)
    assert final["handled"] == rows["handled"]
    assert final["sent"] == rows["sent (accepted)"]
    assert rows["throughput"] == f"{final['msg/s during run']} msg/s during run"
    assert f"p50 {final['handle p50']} " in rows["handle latency"]
    assert f"p99 {final['handle p99']} " in rows["handle latency"]
    assert f"p50 {final['queue wait p50']} " in rows["queue wait"]
    assert f"p99 {final['queue wait p99']} " in rows["queue wait"]
    assert final["RSS"] == rows["peak RSS"]
    assert final["restarts"] == rows["restarts"]
    assert final["dead letters"] == rows["dead letters"]


def test_the_kubernetes_args_on_the_deploy_page_are_a_nexus_run_that_parses() -> None:
    """Regression: docs/deploy.md's pod gave the image ``args: ["run", "app:main", ...]``;
    ``nexus run`` takes no positional argument (``Got unexpected extra argument(s)
    (app:main)``, exit 2), so the container exited at once. The app is ``--app``."""
    import typer

    from nexus_trio.cli import app

    page = (DOCS / "deploy.md").read_text(encoding="utf-8")
    [line] = [line for line in page.splitlines() if line.strip().startswith("args: [")]
    args = json.loads(line.split("args:", 1)[1])
    assert args[0] == "run"
    run = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    params = run.make_context("run", args[1:]).params  # a usage error raises here
    assert params["app_ref"] == "app:main" and params["metrics_port"] == 9464
