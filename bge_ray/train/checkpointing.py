"""Checkpoints that prove they are whole, and the choice of which one to resume from.

Ray Train registers a checkpoint only after every worker has uploaded its part, so a crash while
one is written never replaces the previous one. Files can still be damaged later (a truncated
upload, a disk error, someone's ``rm``), and nothing in DeepSpeed notices until deep inside
``load_checkpoint``. So each worker adds a manifest of what it wrote (names, sizes, SHA-256). A
resume checks the newest checkpoint cheaply first (every rank's manifest, every listed file there
with its size: metadata only), then each rank reads, and hashes as it reads, only the files it
loads (:func:`rank_files`: its own shards and the shared model states); if any rank finds damage,
all move on to the newest older checkpoint, and the run fails loudly if none is intact.

Layout of one checkpoint directory (``checkpoint_step_<step>[-<tag>]``)::

    deepspeed/...               DeepSpeed's per-rank model and optimizer shards
    model/                      the exported model (only where a model is exported)
    trainer_state.json          rank 0: global_step, epoch, world_size, final
    trained_rows_rank<r>.npy    row keys rank r trained in the current epoch (exact resume)
    rng_state_rank<r>.pt        rank r's torch RNG states (dropout continues as if never stopped)
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
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from bge_ray.errors import CheckpointError

STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint_step_"
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)(?:-(\w+))?$")
_HASH_CHUNK = 8 << 20
STAGING_PREFIX = "bge_ray_ckpt_"
_STAGING = re.compile(rf"^{STAGING_PREFIX}(?P<host>[A-Za-z0-9.-]+)_(?P<pid>\d+)_")


def checkpoint_name(step: int, tag: str | None = None) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}" + (f"-{tag}" if tag else "")


def manifest_name(rank: int) -> str:
    return f"manifest_rank{rank}.json"


def trained_rows_name(rank: int) -> str:
    return f"trained_rows_rank{rank}.npy"


def rng_state_name(rank: int) -> str:
    return f"rng_state_rank{rank}.pt"


def save_rng_state(local_dir: str, rank: int) -> None:
    """This process's torch RNG states (CPU and, where there is one, its CUDA device), as HF's Trainer
    keeps ``rng_state_<rank>.pth``: a resumed run draws the same dropout masks as one never stopped."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, os.path.join(local_dir, rng_state_name(rank)))


def restore_rng_state(local_dir: str, rank: int) -> bool:
    """Restore what :func:`save_rng_state` wrote; False where the checkpoint holds none for ``rank``."""
    path = os.path.join(local_dir, rng_state_name(rank))
    if not os.path.exists(path):
        return False
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


def _sha256(stream: Any) -> str:
    return _sha256_copy(stream, None)[1]


def _sha256_copy(stream: Any, target: Any) -> tuple[int, str]:
    """(bytes, SHA-256) of a stream read once, written on to ``target`` when given."""
    h, size = hashlib.sha256(), 0
    while True:
        chunk = stream.read(_HASH_CHUNK)
        if not chunk:
            return size, h.hexdigest()
        h.update(chunk)
        size += len(chunk)
        if target is not None:
            target.write(chunk)


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


def _manifests(fs: pafs.FileSystem, path: str) -> tuple[dict[int, dict[str, list[Any]]] | None, str | None]:
    """Every rank's manifest (rank -> {relpath: [size, sha256]}), or why they cannot be read."""
    state, why = read_json(fs, f"{path}/{STATE_FILE}")
    if why:
        return None, f"{STATE_FILE} {why}"
    world = state.get("world_size")
    if not isinstance(world, int) or world < 1:
        return None, f"{STATE_FILE} has no world_size"
    manifests = {}
    for rank in range(world):
        manifest, why = read_json(fs, f"{path}/{manifest_name(rank)}")
        if why == "is missing":
            return None, f"rank {rank} never finished writing it ({manifest_name(rank)} is missing)"
        if why:
            return None, f"{manifest_name(rank)} {why}"
        manifests[rank] = manifest["files"]
    return manifests, None


def precheck(fs: pafs.FileSystem, path: str) -> tuple[dict[int, dict[str, list[Any]]] | None, str | None]:
    """The manifests of a checkpoint whose every listed file is there with its size (metadata only,
    no data read), or why it cannot be resumed from."""
    manifests, why = _manifests(fs, path)
    if why:
        return None, why
    sizes = {info.path[len(path.rstrip("/")) + 1:]: info.size
             for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if info.type == pafs.FileType.File}
    for files in manifests.values():
        for rel, (size, _) in sorted(files.items()):
            if rel not in sizes:
                return None, f"{rel} is missing"
            if sizes[rel] != size:
                return None, f"{rel} has {sizes[rel]} bytes, {size} were written"
    return manifests, None


def rank_files(manifests: dict[int, dict[str, list[Any]]], rank: int) -> dict[str, list[Any]]:
    """The files ``rank`` reads to resume: its own (not the exported model), the trainer state and
    DeepSpeed's shared model states that rank 0 wrote, and on rank 0 every rank's trained rows."""
    own = {rel: entry for rel, entry in manifests[rank].items() if not rel.startswith("model/")}
    for rel, entry in manifests.get(0, {}).items():
        shared = rel == STATE_FILE or (rel.startswith("deepspeed/") and "zero_pp_rank_" not in rel)
        if shared or (rank == 0 and rel.startswith("trained_rows_rank")):
            own[rel] = entry
    if rank == 0:
        for files in manifests.values():
            own.update({rel: entry for rel, entry in files.items() if rel.startswith("trained_rows_rank")})
    return own


def fetch_verified(fs: pafs.FileSystem, path: str, files: dict[str, list[Any]], local_dir: str | None) -> str | None:
    """Read each of ``files`` once, checking its size and SHA-256; with ``local_dir`` (a remote
    checkpoint) also copy it there. Returns why a file is damaged, or None."""
    for rel, (size, digest) in sorted(files.items()):
        target = None
        if local_dir is not None:
            os.makedirs(os.path.dirname(os.path.join(local_dir, rel)), exist_ok=True)
            target = open(os.path.join(local_dir, rel), "wb")  # noqa: SIM115 - closed below
        try:
            with fs.open_input_stream(f"{path}/{rel}") as f:
                got_size, got = _sha256_copy(f, target)
        except FileNotFoundError:
            return f"{rel} is missing"
        finally:
            if target is not None:
                target.close()
        if got_size != size:
            return f"{rel} has {got_size} bytes, {size} were written"
        if got != digest:
            return f"{rel} does not match its checksum"
    return None


def verify(fs: pafs.FileSystem, path: str) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None when every rank's files are
    whole (reads every file of every rank: a full audit; a resume reads only :func:`rank_files`)."""
    manifests, why = precheck(fs, path)
    if why:
        return why
    return fetch_verified(fs, path, {rel: e for files in manifests.values() for rel, e in files.items()}, None)


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


def rank_problem(fs: pafs.FileSystem, path: str, rank: int, local_dir: str | None = None) -> str | None:
    """Why ``rank`` cannot resume from the checkpoint at ``path`` (its metadata, then the files it
    loads, read once and hashed; copied to ``local_dir`` when given), or None."""
    manifests, why = precheck(fs, path)
    if why is None:
        why = fetch_verified(fs, path, rank_files(manifests, rank), local_dir)
    return why


def pick_resume_checkpoint(fs: pafs.FileSystem, latest_path: str, rank: int = 0,
                           agree: Callable[[str, str | None], list[str | None]] = lambda path, why: [why],
                           local_root: str | None = None) -> tuple[str, str, list[str]]:
    """The newest intact checkpoint at or before ``latest_path``: its path, the local folder holding
    the files ``rank`` loads (the checkpoint itself on a local file system; a copy under
    ``local_root`` otherwise) and why newer ones were passed over.

    ``agree(path, why)`` gathers every rank's verdict on a candidate (an all-gather in a worker
    group); a candidate is taken only when no rank found damage, so all ranks pick the same.

    Raises:
        CheckpointError: no candidate is intact.
    """
    skipped = []
    for path in resume_candidates(fs, latest_path):
        local_dir = os.path.join(local_root, path.rpartition("/")[2]) if local_root else None
        reasons = [r for r in agree(path, rank_problem(fs, path, rank, local_dir)) if r]
        if not reasons:
            return path, local_dir or path, skipped
        skipped.append(f"{path.rpartition('/')[2]}: {reasons[0]}")
    raise CheckpointError("no intact checkpoint to resume from: " + "; ".join(skipped)
                          + ". Start over with resume: never (or a new run_name)")


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
