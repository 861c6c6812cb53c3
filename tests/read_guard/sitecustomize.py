"""The test suite's read guard: no test may open a path outside the checkout, the temp dir (where
pytest's tmp_path and the Ray session live) and the installed Python and system files.

``tests/conftest.py`` installs :func:`install` in the pytest process and puts this folder first on
``PYTHONPATH``, so every Python process the tests start (Ray's workers and job drivers, CLI
subprocesses) imports this file as its ``sitecustomize`` and installs the same guard. A violation
raises :class:`OutsideReadError` in the process that made it and is appended to the log named by
``BGE_RAY_READ_GUARD_LOG``, which the conftest checks after every test (a process that swallowed
the error still fails the test). Python's audit hooks see every ``open``, ``os.listdir``,
``os.scandir`` and ``glob.glob`` made from Python; reads made by C++ code (pyarrow's file
systems) are not seen.

Standalone on purpose (no imports from the package or the tests): it runs at interpreter start.
"""

from __future__ import annotations

import os
import sys
import threading

ROOTS_ENV = "BGE_RAY_READ_GUARD_ROOTS"
LOG_ENV = "BGE_RAY_READ_GUARD_LOG"
_EVENTS = frozenset({"open", "os.listdir", "os.scandir", "glob.glob"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class OutsideReadError(PermissionError):
    """A test opened a path outside the checkout, the temp dir and the installed packages."""


_state = threading.local()
_roots: list[str] = []


def set_roots(roots: list[str]) -> None:
    """The folders a test may open files in (resolved; the guard's only configuration)."""
    _roots[:] = sorted({os.path.realpath(r) for r in roots if r})


def roots() -> list[str]:
    return list(_roots)


def is_allowed(path: str) -> bool:
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in _roots)


def _target(event: str, args: tuple) -> tuple[str, bool] | None:
    """(path, writes) an audited call opens, or None when it opens no named path."""
    path = args[0] if args else None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    elif isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path:
        return None  # a file descriptor, or listdir() of the cwd
    if event == "glob.glob":
        while any(c in path for c in "*?["):
            path = os.path.dirname(path) or "."
        return path, False
    if event == "open":
        mode, flags = (args[1] if len(args) > 1 else "r"), (args[2] if len(args) > 2 else 0)
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
        return path, writes
    return path, False


def _hook(event: str, args: tuple) -> None:
    if event not in _EVENTS or not _roots or getattr(_state, "busy", False):
        return
    _state.busy = True
    try:
        target = _target(event, args)
        if target is None:
            return
        path, writes = target
        if is_allowed(path) or not (writes or os.path.exists(path)):
            return  # inside the allowed folders, or a probe for a file that is not there (nothing read)
        what = "writes" if writes else "reads"
        message = (f"read guard: {event} {what} {os.path.realpath(path)!r}, outside the checkout, the temp dir "
                   f"and the installed packages (pid {os.getpid()})")
        log = os.environ.get(LOG_ENV)
        if log:
            with open(log, "a", encoding="utf-8") as f:
                f.write(message + "\n")
    finally:
        _state.busy = False
    raise OutsideReadError(message)


_installed = False


def install(roots_: list[str] | None = None) -> None:
    """Install the guard in this process (once; audit hooks cannot be removed)."""
    global _installed
    if roots_ is not None:
        set_roots(roots_)
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True


def _chain_next_sitecustomize() -> None:
    """Run the sitecustomize this file shadows, if the environment has one."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if __name__ == "sitecustomize":
    if os.environ.get(ROOTS_ENV):
        install(os.environ[ROOTS_ENV].split(os.pathsep))
    _chain_next_sitecustomize()
