"""Where bge-ray keeps things: file systems for local paths and cloud URIs, the runs' root, the
published model."""

from __future__ import annotations

import os
import re
import shutil
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

_SECRET_PARAM = re.compile(r"(key|secret|token|password|passwd|signature|sig|credential|x-amz-)", re.I)


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


def strip_credentials(value: Any) -> Any:
    """``value`` with credentials taken out of every URI in it (user:password@, secret query
    parameters); dicts and lists are walked."""
    if isinstance(value, dict):
        return {k: strip_credentials(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_credentials(v) for v in value]
    if not isinstance(value, str) or "://" not in value:
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(p for p in parts.query.split("&") if p and not _SECRET_PARAM.search(p.partition("=")[0]))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
