"""JSON Lines files, read line by line: never a whole file, never a whole over-long line in memory.

Plain or gzip, local or any pyarrow file-system URI (Ray Data's ``FileBasedDatasource``). A bad
line is reported with its file and line, never a traceback from inside a Ray task.
"""

from __future__ import annotations

import codecs
import glob
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from ray.data.datasource.file_based_datasource import FileBasedDatasource

from bge_ray.errors import DataValidationError

JSONL_EXTENSIONS = ["jsonl", "json", "jsonl.gz", "json.gz"]
_READ_CHUNK = 1 << 20
MAX_LINE_BYTES = 16 << 20  # one row; longer lines are reported, never read whole


class LineTooLong:
    """Stands in for a line longer than the reader keeps in memory (its bytes were not read into one buffer)."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def iter_lines(f: Any, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | LineTooLong]]:
    """Yield (1-based line number, bytes) for each non-blank line of a binary stream.

    A line longer than ``max_line_bytes`` is never held whole: it is yielded as :class:`LineTooLong`
    (its size) so the caller can report it, and reading goes on at the next line.
    """
    for line_no, _, raw in iter_lines_at(f, max_line_bytes):
        yield line_no, raw


def iter_lines_at(f: Any, max_line_bytes: int = MAX_LINE_BYTES, first_line: int = 1,
                  start: int = 0) -> Iterator[tuple[int, int, bytes | LineTooLong]]:
    """:func:`iter_lines` with each line's byte offset in the stream, for a stream that starts at
    line ``first_line``, byte ``start`` of its file (after a seek)."""
    parts: list[bytes] = []  # the current line so far (dropped once it is too long)
    size = 0
    line_no, offset, line_start = first_line - 1, start, start

    def finish() -> bytes | LineTooLong | None:
        if size > max_line_bytes:
            return LineTooLong(size)
        raw = b"".join(parts)
        return raw if raw.strip() else None

    while True:
        chunk = f.read(_READ_CHUNK)
        if not chunk:
            break
        pieces = chunk.split(b"\n")
        for i, piece in enumerate(pieces):
            size += len(piece)
            offset += len(piece)
            if size <= max_line_bytes:
                parts.append(piece)
            else:
                parts = []
            if i == len(pieces) - 1:
                break  # the line goes on in the next chunk
            offset += 1  # the newline
            line_no += 1
            line = finish()
            if line is not None:
                yield line_no, line_start, line
            parts, size, line_start = [], 0, offset
    if size:
        line = finish()
        if line is not None:
            yield line_no + 1, line_start, line


def decode_json_line(raw: bytes | LineTooLong, where: str) -> tuple[Any, str | None]:
    """``(object, None)`` for a line holding one JSON value, else ``(None, "where: why")``."""
    if isinstance(raw, LineTooLong):
        return None, (f"{where}: the line is {raw.size / 2 ** 20:.1f} MiB, over the "
                      f"{MAX_LINE_BYTES / 2 ** 20:.0f} MiB limit for one row")
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return None, f"{where}: the file is UTF-16; save it as UTF-8"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"{where}: not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"{where}: not valid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, f"{where}: not valid JSON (nested too deeply)"
    except ValueError as e:  # e.g. an integer literal longer than Python converts
        return None, f"{where}: not valid JSON ({e})"


class JsonLinesDatasource(FileBasedDatasource):
    """JSON Lines files (plain or gzip, local or URI), one row per non-blank line through
    ``parse(raw, path, line) -> dict``; a bad line keeps its ``error`` instead of failing the task."""

    _FILE_EXTENSIONS = JSONL_EXTENSIONS

    def __init__(self, paths: list[str] | str, parse: Any, schema: pa.Schema, rows_per_block: int = 1024,
                 **kwargs: Any) -> None:
        super().__init__(paths, file_extensions=JSONL_EXTENSIONS, **kwargs)
        self._parse, self._schema, self._rows_per_block = parse, schema, rows_per_block

    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        rows: list[dict] = []
        for n, raw in iter_lines(f):
            rows.append(self._parse(raw, path, n))
            if len(rows) >= self._rows_per_block:
                yield pa.Table.from_pylist(rows, schema=self._schema)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=self._schema)


def expand_paths(paths: list[str]) -> list[str]:
    """Expand local globs (``data/*.jsonl``); directories and URIs are listed by Ray Data itself."""
    out: list[str] = []
    for path in paths:
        if "://" not in path and any(c in path for c in "*?["):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise DataValidationError(f"train_data: no file matches {path!r}")
            out.extend(matches)
        else:
            out.append(path)
    return out
