"""What a new user reads first: the README's quick start, and ``help()``."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import pytest

from aiocronlock import AsyncDBLocker

ROOT = Path(__file__).resolve().parent.parent


def _quick_start() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"```python\n(.*?)```", readme, re.S)
    assert match is not None, "the README has no Python example"
    return match[1]


@pytest.mark.slow
async def test_the_readme_quick_start_stops_on_ctrl_c_without_a_traceback(tmp_path: Path) -> None:
    source = _quick_start()
    assert '"postgresql://app@db/app"' in source
    script = tmp_path / "quick_start.py"
    script.write_text(
        source.replace('"postgresql://app@db/app"', repr(f"sqlite:///{tmp_path}/q.db"))
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    async with asyncio.timeout(30):
        line = await process.stdout.readline()
        assert line.decode().strip() == "call 1s"
        process.send_signal(signal.SIGINT)
        _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert "Traceback" not in stderr.decode()


def _attributes_section(doc: str) -> str:
    """The class docstring's paragraph that starts ``Attributes:``."""
    match = re.search(r"^\s*Attributes:(.*?)(?:\n\s*\n|\Z)", doc, re.S | re.M)
    assert match is not None, "the class docstring has no Attributes section"
    return match[1]


def test_help_documents_every_parameter_and_attribute() -> None:
    """What ``help(AsyncDBLocker)`` shows comes from the docstrings: each name must be
    explained there, not merely appear in a signature."""
    class_doc = AsyncDBLocker.__doc__ or ""
    assert ":param clean_batch_size:" in class_doc
    assert ":param lease:" in (AsyncDBLocker.lock.__doc__ or "")
    assert "CLEAN_" not in (AsyncDBLocker.clean.__doc__ or "")  # no internal constants

    enter_doc = AsyncDBLocker.__aenter__.__doc__ or ""
    assert "clock" in enter_doc and "cleaner" in enter_doc  # what starting does
    assert (AsyncDBLocker.closed.__doc__ or "").strip()
    # Instance attributes have no __doc__ of their own: the class docstring names them.
    attributes = _attributes_section(class_doc)
    for name in ("worker", "engine", "clock_offset"):
        assert f"``{name}``" in attributes, name
