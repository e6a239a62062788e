"""What a new user reads first: the README's quick start, and ``help()``."""

from __future__ import annotations

import asyncio
import pydoc
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


def test_help_documents_every_parameter_and_attribute() -> None:
    text = pydoc.render_doc(AsyncDBLocker, renderer=pydoc.TextDoc())
    for name in ("clean_batch_size", "lease", "worker", "engine", "clock_offset", "closed"):
        assert f"{name}" in text, name
    lock_doc = AsyncDBLocker.lock.__doc__ or ""
    assert ":param lease:" in lock_doc
    clean_doc = AsyncDBLocker.clean.__doc__ or ""
    assert "CLEAN_" not in clean_doc  # no internal constants
    assert (AsyncDBLocker.__aenter__.__doc__ or "").strip()
    assert (AsyncDBLocker.closed.__doc__ or "").strip()
