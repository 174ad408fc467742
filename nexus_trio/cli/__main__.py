"""``python -m nexus_trio.cli``: the ``nexus`` command.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from ._app import main

if __name__ == "__main__":
    main()
