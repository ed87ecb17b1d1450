"""Throw-away virtual environments with pinned old packages, built once from PyPI and cached per user.

A test that checks the oldest versions we claim (transformers 4.46, pyarrow 15/16) runs its checks in such an
environment as a subprocess. Environments live in ``$XDG_CACHE_HOME/geneformer-workflow-tests/<name>`` (default
``~/.cache/...``), keyed by their requirements; a half-built one is never used (it is built under a temporary
name and renamed when complete). When the packages cannot be installed (offline, no index), the test is skipped
with pip's message: it never passes without running.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

INSTALL_TIMEOUT_S = 600


def cache_root() -> Path:
    """The per-user cache directory of these environments."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "geneformer-workflow-tests"


def light_venv(name: str, requirements: list[str]) -> Path:
    """The Python interpreter of a cached environment holding exactly ``requirements`` (and their dependencies).

    Args:
        name: A readable prefix of the directory name, e.g. ``"transformers-4.46.0"``.
        requirements: pip requirement strings, e.g. ``["transformers==4.46.0"]``.

    Returns:
        The path of the environment's ``python``.

    Skips the calling test (``pytest.skip``) when pip cannot install the requirements.
    """
    key = hashlib.sha256("\n".join([sys.version, *requirements]).encode()).hexdigest()[:10]
    target = cache_root() / f"{name}-{key}"

    def build(tmp: Path) -> None:
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True, timeout=120)
        _pip_install([str(tmp / "bin" / "python")], requirements)

    _build_once(target, build)
    return target / "bin" / "python"


def light_overlay(name: str, requirements: list[str]) -> Path:
    """A cached directory of ``requirements`` alone (``pip install --no-deps --target``), to put first on
    ``PYTHONPATH`` of the project's own interpreter: the whole package runs with, e.g., an older pyarrow.

    Same cache, naming and skip rule as :func:`light_venv`; returns the directory.
    """
    key = hashlib.sha256("\n".join(["overlay", sys.version, *requirements]).encode()).hexdigest()[:10]
    target = cache_root() / f"{name}-overlay-{key}"
    _build_once(target, lambda tmp: _pip_install([sys.executable], ["--no-deps", "--target", str(tmp), *requirements]))
    return target


def _pip_install(python: list[str], arguments: list[str]) -> None:
    """``pip install ARGUMENTS`` with ``python``; skips the calling test when the package index cannot serve them."""
    command = [*python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot install {' '.join(arguments)} from the package index: {result.stderr[-400:]}")


def _build_once(target: Path, build: Callable[[Path], None]) -> None:
    """Make ``target`` unless it exists: ``build`` fills a temporary directory beside it, renamed into place
    (a session that finished the same target first wins; the temporary directory is always removed)."""
    if target.is_dir():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another session finished the same target first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_checks(python: Path, script: Path, *args: str, timeout: int = 300) -> str:
    """Run ``script`` under ``python``; returns its output, or fails the test with it."""
    result = subprocess.run(
        [str(python), str(script), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{script.name} failed under {python}:\n{output[-4000:]}"
    return output
