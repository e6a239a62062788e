"""Tools that exercise aiocronlock from the outside; not part of the installed package.

Run them from the project root, e.g. ``.venv/bin/python -m harness.contention --help``.
"""
