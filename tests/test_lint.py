"""The linter is clean: ``ruff check`` over the code (its rules in pyproject.toml's [tool.ruff]), run here so
that CI (the README's test command) fails on an unused import, an unused variable, a duplicated import, an
f-string without placeholders or a line over 120 columns. Fix a finding; do not silence it with ``# noqa``."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ("python", "tests", "bench", "triton_kernels", "examples", "docs", "setup.py")


def _pinned_version() -> str | None:
    with open(os.path.join(ROOT, "requirements-test.txt")) as f:
        m = re.search(r"^ruff==(\S+)", f.read(), re.M)
    return m.group(1) if m else None


def _ruff() -> list[str] | None:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    found = shutil.which("ruff")
    return [found] if found else None


def test_ruff_is_pinned():
    assert _pinned_version(), "requirements-test.txt pins ruff (ruff==X.Y.Z): its rules change between versions"


def test_ruff_check_is_clean():
    ruff = _ruff()
    if ruff is None:
        pytest.skip(f"ruff is not installed (pip install ruff=={_pinned_version()}, or pip install -r "
                    "requirements-test.txt)")
    version = subprocess.run([*ruff, "--version"], capture_output=True, text=True, cwd=ROOT).stdout.split()[-1:]
    proc = subprocess.run([*ruff, "check", "--no-cache", "--output-format", "concise", *PATHS], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode not in (0, 1):  # 2: ruff itself failed (a bad configuration, a path that is not there)
        pytest.fail(f"ruff check could not run (exit {proc.returncode}):\n{proc.stderr}{proc.stdout}")
    findings = [line for line in proc.stdout.splitlines() if re.match(r"\S+:\d+:\d+: ", line)]
    pinned = _pinned_version()
    note = "" if not version or version[0] == pinned else f" (ruff {version[0]} here; the pin is {pinned})"
    assert proc.returncode == 0 and not findings, (f"ruff check {' '.join(PATHS)} found {len(findings)} problem(s)"
                                                   f"{note}:\n" + "\n".join(findings or [proc.stdout]))
