"""``python -m nexus_trio.cli``: the ``nexus`` command.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

import sys

from ._app import main

if __name__ == "__main__":
    # (a Ctrl-C until here, as runpy imported the packages, was said in one line by the
    # scripts' entry, _nexus_trio_main, which the package's first lines import for a
    # ``-m``; from here on it is the command's. Looked up, not imported: 0.16 M
    # instructions of a start's 1,060 M against 0.39 M, callgrind)
    entry = sys.modules.get("_nexus_trio_main")
    if entry is not None:
        # (a Ctrl-C from here until click's handling begins, entry.command_began(), is
        # said in one line too; a stop noted as it started that no run took ends it,
        # after the exit functions)
        entry.run_command(main)
    else:
        main()
