"""What ``bge-ray mine`` and ``bge-ray score`` run with: the encoder a job asks for, reading validated
rows, writing JSONL shards from Ray Data workers, sizing the encoder actor pool, the report."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
import ray.data
from ray.data._internal.savemode import SaveMode
from ray.data.datasource.file_datasink import BlockBasedFileDatasink

from bge_ray.cluster import capacity
from bge_ray.console import log
from bge_ray.data.read import drop_bad, scan_triplets, triplet_source
from bge_ray.data.triplets import RowRules
from bge_ray.retrieval.encode import EncoderSpec, encoder_spec_for
from bge_ray.storage import filesystem
from bge_ray.tools.config import RowJobConfig


def encoder_spec(cfg: RowJobConfig, model: str, batch_size: int, passage_instruction: str | None = None) -> EncoderSpec:
    """How ``model`` embeds for a mine / score job: its own settings, with the job's overrides."""
    return encoder_spec_for(
        model, pooling=cfg.pooling_method, normalize=cfg.normalize_embeddings,
        query_instruction=cfg.query_instruction_for_retrieval,
        query_instruction_format=cfg.query_instruction_format_for_retrieval,
        passage_instruction=passage_instruction, query_max_len=cfg.embedder_query_max_length,
        passage_max_len=cfg.embedder_passage_max_length, batch_size=batch_size,
        trust_remote_code=cfg.trust_remote_code)


# a row's own instructions, carried through mine and score: the embedder's (prompt) and a reranker's
PROMPT_COLUMNS = ("prompt", "query_prompt", "passage_prompt")


def prompt_columns(rows: list[dict]) -> dict[str, list[str | None]]:
    """The rows' instruction columns, for an output table."""
    return {name: pa.array([r.get(name) for r in rows], type=pa.string()) for name in PROMPT_COLUMNS}


class JsonlShardSink(BlockBasedFileDatasink):
    """Writes rows as JSON Lines shards (one per write task) and counts what it wrote.

    Keeps ``columns`` (None values left out); rows with fewer than ``want_negatives`` negatives
    are counted and a few of their sources kept for the report.
    """

    def __init__(self, path: str, columns: list[str], want_negatives: int = 0, overwrite: bool = False) -> None:
        super().__init__(path, file_format="jsonl", mode=SaveMode.OVERWRITE if overwrite else SaveMode.APPEND)
        self.columns, self.want_negatives = columns, want_negatives
        self.stats: dict[str, Any] = {}

    def write_block_to_file(self, block: Any, file: Any) -> None:
        lines = []
        for row in block.to_arrow().to_pylist():
            obj = {k: row[k] for k in self.columns if row.get(k) is not None}
            lines.append(json.dumps(obj, ensure_ascii=False))
        file.write(("\n".join(lines) + "\n").encode("utf-8"))

    def write(self, blocks: Any, ctx: Any) -> dict[str, Any]:
        blocks = list(blocks)
        stats: dict[str, Any] = {"rows": 0, "short": 0, "short_examples": [], "removed_positives": 0}
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            stats["rows"] += table.num_rows
            if "removed_positives" in table.column_names:
                stats["removed_positives"] += int(pc.sum(table.column("removed_positives")).as_py() or 0)
            if self.want_negatives and "neg" in table.column_names:
                for src, neg in zip(table.column("source").to_pylist(), table.column("neg").to_pylist(), strict=True):
                    if len(neg) < self.want_negatives:
                        stats["short"] += 1
                        if len(stats["short_examples"]) < 5:
                            stats["short_examples"].append(f"{src}: {len(neg)} of {self.want_negatives}")
        super().write(blocks, ctx)
        return stats

    def on_write_complete(self, write_result: Any) -> None:
        super().on_write_complete(write_result)
        total: dict[str, Any] = {"rows": 0, "short": 0, "short_examples": [], "removed_positives": 0}
        for part in write_result.write_returns:
            if not part:
                continue
            for key in ("rows", "short", "removed_positives"):
                total[key] += part[key]
            total["short_examples"].extend(part["short_examples"])
        total["short_examples"] = sorted(total["short_examples"])[:5]
        self.stats = total


def read_rows(paths: list[str], skip_bad_rows: bool) -> tuple[Any, Any]:
    """Validated triplet rows (``neg`` may be empty) and the scan summary; bad rows fail unless skipped."""
    source = triplet_source(paths, RowRules(train_group_size=1, knowledge_distillation=False))
    summary = scan_triplets(source, skip_bad_rows)
    ds = ray.data.read_datasource(source)
    return ds.map_batches(drop_bad, batch_format="pyarrow") if summary.num_bad else ds, summary


def choose_devices(cfg: Any) -> Any:
    """``use_gpu: auto`` decided on the connected cluster: GPU encoders when it has or can add GPUs."""
    if cfg.use_gpu is not None:
        return cfg
    chosen = dataclasses.replace(cfg, use_gpu=capacity().has_gpus())
    log(f"use_gpu: auto -> {'one GPU per encoder actor' if chosen.use_gpu else 'CPU encoders'}")
    return chosen


def write_report(cfg: RowJobConfig, lines: list[str]) -> None:
    """``report.txt`` in the output folder, and the same lines on the console; with ``output_file``, the
    shards joined into that one file (in shard order) and the report beside it."""
    fs, root = filesystem(cfg.output_dir)
    fs.create_dir(root, recursive=True)
    text = ("\n".join(lines) + "\n").encode("utf-8")
    if cfg.output_file:
        out_fs, out = filesystem(cfg.output_file)
        shards = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root)) if i.path.endswith(".jsonl"))
        with out_fs.open_output_stream(out) as dst:
            for shard in shards:
                with fs.open_input_stream(shard) as src:
                    while chunk := src.read(8 << 20):
                        dst.write(chunk)
        with out_fs.open_output_stream(f"{out}.report.txt") as f:
            f.write(text)
        fs.delete_dir(root)
    else:
        with fs.open_output_stream(f"{root}/report.txt") as f:
            f.write(text)
    for line in lines:
        log(line)
