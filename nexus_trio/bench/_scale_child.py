"""One scale measurement in a fresh interpreter: ``python -m nexus_trio.bench._scale_child
(kernel|"raw trio"|lifecycle) N`` prints one JSON object (see :mod:`nexus_trio.bench._scale`).

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import json
import sys

from ._scale import MEASUREMENTS, measure


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in MEASUREMENTS or not argv[1].isdigit():
        print(
            f"usage: python -m nexus_trio.bench._scale_child ({'|'.join(MEASUREMENTS)}) N",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(measure(argv[0], int(argv[1]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
