"""``python -m nexus_trio.cli``: the ``nexus`` command."""

from ._app import main

if __name__ == "__main__":
    main()
