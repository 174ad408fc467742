"""MkDocs hook: render the reStructuredText bits of our docstrings in the API reference.

The docstrings are written for ``help()`` and Sphinx-style readers (``:class:`X```,
``:meth:`y```, a paragraph ending in ``::`` before a code block). mkdocstrings renders
docstrings as Markdown, where those roles would show literally; after conversion they are
``:class:<code>X</code>``, which this hook turns into plain ``<code>X</code>``.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|exc|data|mod|obj|const):(?=<code>)")
_LITERAL_MARKER = re.compile(r"::(?=</p>)")


def on_page_content(html: str, **kwargs: Any) -> str:
    return _LITERAL_MARKER.sub(":", _ROLE.sub("", html))
