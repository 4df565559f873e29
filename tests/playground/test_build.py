"""The committed build (src/morgana/api/playground_static/) is what the sources and the lock file
make: scripts/build-playground.sh, run again into a fresh directory, gives the same bytes."""

import filecmp
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "src" / "morgana" / "api" / "playground_static"


def test_committed_build_is_reproduced_from_the_lock_file(tmp_path: Path) -> None:
    if shutil.which("npm") is None:
        message = "npm is needed to rebuild the playground"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path / "playground_static"
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-playground.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    built = sorted(p.name for p in out.iterdir())
    assert sorted(p.name for p in COMMITTED.iterdir()) == built == ["index.html", "playground.css", "playground.js"]
    stale = [name for name in built if not filecmp.cmp(out / name, COMMITTED / name, shallow=False)]
    assert not stale, f"{stale} differ from the sources: run scripts/build-playground.sh and commit the result"
