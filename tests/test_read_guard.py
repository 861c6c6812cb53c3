"""The read guard (tests/read_guard/sitecustomize.py) catches a test that opens a file outside the checkout."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from tests.conftest import GUARD_ROOTS, read_guard
from tests.helpers import REPO


@contextlib.contextmanager
def narrowed(monkeypatch):
    """The guard with only the checkout and the interpreter allowed (not the temp dir), unlogged."""
    monkeypatch.delenv(read_guard.LOG_ENV)
    read_guard.set_roots([REPO, sys.prefix, sys.base_prefix])
    try:
        yield
    finally:
        read_guard.set_roots(GUARD_ROOTS)


def test_a_path_beside_the_checkout_is_outside(monkeypatch):
    with narrowed(monkeypatch):
        assert not read_guard.is_allowed(os.path.join(os.path.dirname(REPO), "shared", "data", "scifact", "x.tsv"))
        assert not read_guard.is_allowed(REPO + "-other/file")  # a sibling whose name starts with the checkout's
        assert read_guard.is_allowed(os.path.join(REPO, "tests", "data", "cranfield", "qrels.tsv"))


def test_opening_a_file_outside_fails_in_this_process(monkeypatch, tmp_path):
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text("{}\n")
    with narrowed(monkeypatch):
        for attempt in (lambda: open(outside), lambda: os.listdir(tmp_path), outside.read_text,
                        lambda: open(tmp_path / "new.txt", "w")):
            with pytest.raises(read_guard.OutsideReadError, match="read guard: (open|os.listdir) (reads|writes)"):
                attempt()
        with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:  # inside: fine
            assert "bge-ray" in f.read()
        with pytest.raises(FileNotFoundError):  # a probe for a file that is not there reads nothing: let through
            open(tmp_path / "missing.txt")


def test_every_python_process_the_tests_start_is_guarded(tmp_path):
    """A subprocess (as a Ray worker or a CLI run) gets the guard from PYTHONPATH: its read outside
    fails there and lands in the log the conftest checks after each test."""
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text("{}\n")
    log = tmp_path / "guard.log"
    env = dict(os.environ, **{read_guard.ROOTS_ENV: os.pathsep.join([REPO, sys.prefix, sys.base_prefix]),
                              read_guard.LOG_ENV: str(log)})
    code = ("import sys\ntry:\n    open(sys.argv[1])\nexcept PermissionError as e:\n    print('caught', e)\n"
            "open(sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, str(outside)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "OutsideReadError" in proc.stderr, proc.stderr[-2000:]
    assert "caught read guard" in proc.stdout  # swallowed once ...
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and all(str(outside) in line for line in lines)  # ... logged both times
