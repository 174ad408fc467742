"""The versions CI pins (.ci/constraints.txt) lie inside the ranges pyproject.toml declares.

CI runs the suite on those pins only, so a bound raised past a pin (or a pin left below a
raised bound) would make CI test versions users can never get, or fail to install at all.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_every_pinned_version_ci_installs_satisfies_the_declared_range() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared.extend(extra)
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
