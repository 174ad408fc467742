"""The versions CI pins (.ci/constraints.txt) lie inside the ranges pyproject.toml declares.

CI runs the suite on those pins only, so a bound raised past a pin (or a pin left below a
raised bound) would make CI test versions users can never get, or fail to install at all.
And no range reaches below a version the code is known to need (FLOORS): users would get
the lowest one a range allows, which CI never runs.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def _declared() -> list[str]:
    """The runtime dependencies and those of every extra, as pyproject.toml writes them."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared.extend(extra)
    return declared


def test_every_pinned_version_ci_installs_satisfies_the_declared_range() -> None:
    declared = _declared()
    pins = _pins()
    outside = []
    checked = 0
    for text in declared:
        requirement = Requirement(text)
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            outside.append(f"{requirement.name}: not pinned")
            continue
        checked += 1
        if not requirement.specifier.contains(pin, prereleases=True):
            outside.append(f"{requirement.name}=={pin} outside {requirement.specifier}")
    assert outside == []
    assert checked == len(declared)  # the runtime dependencies and every extra


#: the lowest version of a dependency the code works with, found by running the tests on
#: the lowest versions a range allows, and what the versions below it lack
FLOORS = {
    "nats-py": ("2.10", "Msg.is_acked, read before each in-progress report of a durable delivery"),
    "typer": ("0.15.4", "a cap below click 8.2 (0.12.4 to 0.15.3 fail at `nexus --help`)"),
    "rich": ("14.0", "rich.traceback.Stack.notes and RichHandler.tracebacks_max_frames"),
}


def test_no_declared_range_reaches_below_a_version_the_code_is_known_to_need() -> None:
    """Regression: the nats extra allowed nats-py 2.9, whose messages have no
    ``is_acked``: on it every in-progress report of a durable delivery failed, and
    JetStream redelivered messages that waited for room (handled twice)."""
    declared = _declared()
    too_low = []
    seen = set()
    for text in declared:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name not in FLOORS:
            continue
        seen.add(name)
        floor, why = FLOORS[name]
        lowest = max(
            (Version(spec.version) for spec in requirement.specifier if spec.operator == ">="),
            default=None,
        )
        if lowest is None or lowest < Version(floor):
            too_low.append(f"{requirement.name}{requirement.specifier}: needs >={floor} ({why})")
    assert too_low == []
    assert seen == set(FLOORS)  # each floor names a declared dependency
