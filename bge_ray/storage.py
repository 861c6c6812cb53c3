"""Where bge-ray keeps things: file systems for local paths and cloud URIs, the runs' root, the
published model."""

from __future__ import annotations

import os
import shutil

import pyarrow.fs as pafs


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow file system of a local path or a URI (``s3://``, ``gs://``...), and the path in it."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def storage_root(storage_path: str | None) -> str:
    """Where runs are kept: the given URI or absolute folder, by default ``~/ray_results`` (Ray's)."""
    storage = storage_path or os.path.join(os.path.expanduser("~"), "ray_results")
    return storage if "://" in storage else os.path.abspath(storage)


def publish_model(src: str, output_dir: str) -> str:
    """Copy the exported model in ``src`` to ``output_dir``, replacing an old one only once the new one
    is complete (a crash mid-copy leaves the old model, never half of the new one)."""
    output_dir = os.path.abspath(output_dir)
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    staging = f"{output_dir}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src, staging)
    if os.path.exists(output_dir):
        old = f"{output_dir}.old-{os.getpid()}"
        os.replace(output_dir, old)
        os.replace(staging, output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output_dir)
    return output_dir
