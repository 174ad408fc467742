"""API usage as users write it, checked by ``mypy --strict`` (``nox -s typecheck``) and run by
``tests/test_typing_usage.py``: a public signature that stops accepting these fails the gate."""
