"""Checkpoints that prove they are whole, and the choice of which one to resume from.

Ray Train registers a checkpoint only after every worker has uploaded its part, so a crash while
one is written never replaces the previous one. Files can still be damaged later (a truncated
upload, a disk error, someone's ``rm``), and nothing in DeepSpeed notices until deep inside
``load_checkpoint``. So each worker adds a manifest of what it wrote (names, sizes, SHA-256), and
a resume checks the newest checkpoint against the manifests of every rank, falling back to the
newest older one that is intact, and failing loudly if none is.

Layout of one checkpoint directory (``checkpoint_step_<step>[-<tag>]``)::

    deepspeed/...               DeepSpeed's per-rank model and optimizer shards
    model/                      the exported model (only where a model is exported)
    trainer_state.json          rank 0: global_step, epoch, world_size, final
    trained_rows_rank<r>.npy    row keys rank r trained in the current epoch (exact resume)
    manifest_rank<r>.json       rank r's files: {"files": {relpath: [size, sha256]}}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from typing import Any

import numpy as np
import pyarrow.fs as pafs

STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint_step_"
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)(?:-(\w+))?$")
_HASH_CHUNK = 8 << 20
STAGING_PREFIX = "bge_ray_ckpt_"
_STAGING = re.compile(rf"^{STAGING_PREFIX}(?P<host>[A-Za-z0-9.-]+)_(?P<pid>\d+)_")


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be resumed from."""


def checkpoint_name(step: int, tag: str | None = None) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}" + (f"-{tag}" if tag else "")


def manifest_name(rank: int) -> str:
    return f"manifest_rank{rank}.json"


def trained_rows_name(rank: int) -> str:
    return f"trained_rows_rank{rank}.npy"


def _sha256(stream: Any) -> str:
    h = hashlib.sha256()
    while True:
        chunk = stream.read(_HASH_CHUNK)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)


def write_manifest(local_dir: str, rank: int) -> None:
    """List every file this rank wrote into ``local_dir`` (written last, after all of them)."""
    files: dict[str, list[Any]] = {}
    for root, _, names in os.walk(local_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            if rel.startswith("manifest_rank"):
                continue
            with open(path, "rb") as f:
                files[rel] = [os.path.getsize(path), _sha256(f)]
    with open(os.path.join(local_dir, manifest_name(rank)), "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "files": files}, f)


def read_json(fs: pafs.FileSystem, path: str) -> tuple[Any, str | None]:
    """``(object, None)``, or ``(None, why)``: "is missing" or "is unreadable (...)"."""
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode("utf-8")), None
    except FileNotFoundError:
        return None, "is missing"
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"is unreadable ({e})"


def verify(fs: pafs.FileSystem, path: str) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None when every rank's files are whole."""
    state, why = read_json(fs, f"{path}/{STATE_FILE}")
    if why:
        return f"{STATE_FILE} {why}"
    world = state.get("world_size")
    if not isinstance(world, int) or world < 1:
        return f"{STATE_FILE} has no world_size"
    for rank in range(world):
        manifest, why = read_json(fs, f"{path}/{manifest_name(rank)}")
        if why == "is missing":
            return f"rank {rank} never finished writing it ({manifest_name(rank)} is missing)"
        if why:
            return f"{manifest_name(rank)} {why}"
        for rel, (size, digest) in sorted(manifest["files"].items()):
            info = fs.get_file_info(f"{path}/{rel}")
            if info.type != pafs.FileType.File:
                return f"{rel} is missing"
            if info.size != size:
                return f"{rel} has {info.size} bytes, {size} were written"
            with fs.open_input_stream(f"{path}/{rel}") as f:
                if _sha256(f) != digest:
                    return f"{rel} does not match its checksum"
    return None


def _step_of(name: str) -> tuple[int, str] | None:
    m = _NAME.match(name)
    return (int(m.group(1)), m.group(2) or "") if m else None


def list_checkpoints(fs: pafs.FileSystem, run_dir: str) -> list[str]:
    """The run's checkpoint directories, oldest first (by step, then tag)."""
    found = []
    for info in fs.get_file_info(pafs.FileSelector(run_dir)):
        key = _step_of(info.base_name)
        if info.type == pafs.FileType.Directory and key is not None:
            found.append((key, info.path))
    return [p for _, p in sorted(found)]


def resume_candidates(fs: pafs.FileSystem, latest_path: str) -> list[str]:
    """``latest_path`` first, then the run's older checkpoints, newest first."""
    latest_path = latest_path.rstrip("/")
    run_dir, _, latest_name = latest_path.rpartition("/")
    latest_key = _step_of(latest_name)
    older = [p for p in reversed(list_checkpoints(fs, run_dir))
             if p.rpartition("/")[2] != latest_name
             and (latest_key is None or _step_of(p.rpartition("/")[2]) < latest_key)]
    return [latest_path] + older


def pick_resume_checkpoint(fs: pafs.FileSystem, latest_path: str) -> tuple[str, list[str]]:
    """The newest intact checkpoint at or before ``latest_path`` and the reasons the newer ones were passed over."""
    skipped = []
    for path in resume_candidates(fs, latest_path):
        reason = verify(fs, path)
        if reason is None:
            return path, skipped
        skipped.append(f"{path.rpartition('/')[2]}: {reason}")
    raise CheckpointError(
        "no intact checkpoint to resume from: " + "; ".join(skipped)
        + ". Start over with resume: never (or a new run_name)"
    )


def load_trained_rows(local_dir: str, rank: int) -> np.ndarray:
    path = os.path.join(local_dir, trained_rows_name(rank))
    if not os.path.exists(path):
        return np.empty(0, dtype=np.int64)
    return np.load(path, allow_pickle=False)


def _host_tag() -> str:
    """This host's name as it can sit between underscores in a directory name."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def staging_dir(parent: str | None = None) -> str:
    """A new local directory to write one checkpoint into before Ray uploads it, named after this
    host and process.

    A worker killed while it saves never reaches its cleanup, and what it leaves holds a full copy
    of its model and optimizer shards; a node that sees many restarts would fill its disk. So the
    directories that processes of this host left behind and that are no longer running are removed
    first (another host's, sharing the directory, are left to that host)."""
    parent = parent or tempfile.gettempdir()
    host = _host_tag()
    for name in os.listdir(parent):
        m = _STAGING.match(name)
        if m is None or m["host"] != host or _pid_alive(int(m["pid"])):
            continue
        path = os.path.join(parent, name)
        try:
            shutil.rmtree(path)
        except FileNotFoundError:  # another worker of this host removed it first
            pass
        except OSError as e:
            print(f"[bge-ray] could not remove the leftover checkpoint staging dir {path}: {e}", flush=True)
    return tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{host}_{os.getpid()}_", dir=parent)
