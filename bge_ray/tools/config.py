"""The configs of ``bge-ray mine`` and ``bge-ray score`` (FlagEmbedding's ``hn_mine`` and
``add_reranker_score`` names): fields with their help, validation. Light to import, for ``--help``."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow.fs as pafs

from bge_ray.config.compat import Flags
from bge_ray.config.fields import check_format, knob
from bge_ray.config.finetune import POOLING_METHODS, check_local_inputs, check_survives_job, resolve_model_path
from bge_ray.errors import ConfigError
from bge_ray.storage import filesystem

_LAYERED = ("it is for layerwise and lightweight LLM rerankers, which bge-ray does not score; their model code does "
            "not run under transformers 5 (it imports transformers.modeling_attn_mask_utils, which is gone)")
# hn_mine / add_reranker_score flags that mean nothing here; accepted so a FlagEmbedding command moves over.
ROW_JOB_IGNORED = {
    "embedder_model_class": "the model class is read from the model's config",
    "use_fp16": "GPU encoders use bf16 (fp16 on GPUs without bf16); CPU encoders fp32",
    "devices": "Ray places one encoder actor per GPU (use_gpu) or per CPU",
    "use_gpu_for_searching": "the search runs where the miner actors run: set use_gpu",
    "search_batch_size": "the search is chunked over the pool; memory stays O(batch x chunk)",
    "cache_dir": "models load from their directory or the Hugging Face cache",
    "examples_instruction_format": "read only with examples_for_task, which is refused",
    "reranker_model_class": "the model class is read from the model's config",
    "use_bf16": "GPU teachers run in bf16 (fp16 where there is no bf16); CPU teachers fp32",
}


def check_output(output_dir: str | None, overwrite: bool, inputs: list[str]) -> None:
    """``output_dir`` must be new or empty unless ``overwrite``, and never hold the input."""
    if not output_dir:
        raise ConfigError("output_dir is required: the folder the JSONL shards are written to")
    fs, root = filesystem(output_dir)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise ConfigError(f"output_dir {output_dir!r} is a file; give a folder for the shards")
    if "://" not in output_dir:
        out = os.path.abspath(output_dir)
        for path in inputs:
            p = os.path.abspath(path[len("file://"):] if path.startswith("file://") else path)
            if p == out or p.startswith(out + os.sep):
                raise ConfigError(f"output_dir {output_dir!r} holds the input {path!r}; write somewhere else")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(root)) and not overwrite:
        raise ConfigError(f"output_dir {output_dir!r} exists and is not empty; pass --overwrite to replace its contents")


def check_encoder(pooling: str | None, qlen: int, plen: int, batch_field: str, batch: int,
                   concurrency: int | None) -> None:
    if pooling is not None and pooling not in POOLING_METHODS:
        raise ConfigError(f"pooling_method must be one of {', '.join(POOLING_METHODS)} or unset (the model's own), "
                          f"got {pooling!r}")
    if min(qlen, plen) < 2:
        raise ConfigError("embedder_query_max_length and embedder_passage_max_length must be >= 2")
    if batch < 1:
        raise ConfigError(f"{batch_field} must be >= 1, got {batch}")
    if concurrency is not None and concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1 or unset, got {concurrency}")


def parse_range(value: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in str(value).split("-"))
    except ValueError:
        raise ConfigError(f"range_for_sampling must look like START-END (e.g. 10-210), got {value!r}") from None
    if start < 0 or end <= start:
        raise ConfigError(f"range_for_sampling needs 0 <= START < END, got {value!r}")
    return start, end


@dataclass
class RowJobConfig:
    """What mining and scoring share: rows in, shards out, an encoder, the cluster."""

    IGNORED: ClassVar[dict[str, str]] = ROW_JOB_IGNORED

    input_file: list[str] = knob(help="triplet JSONL files, folders, globs or URIs; 'neg' may be empty",
                                 factory=list, shown="required")
    output_dir: str | None = knob(None, "folder for the output shards and report.txt (new or empty unless "
                                  "overwrite)", shown="required (or output_file)")
    output_file: str | None = knob(None, "one JSONL file instead (FlagEmbedding's name): the shards are joined into "
                                   "it and report.txt becomes <output_file>.report.txt; new unless overwrite")
    query_instruction_for_retrieval: str | None = knob(None, "instruction put before every query (a row's "
                                                       "'prompt' overrides it)")
    query_instruction_format_for_retrieval: str = knob("{}{}", "how instruction and query join: two {} slots")
    pooling_method: str | None = knob(None, "cls, mean or last_token", shown="the model's own")
    normalize_embeddings: bool | None = knob(None, "L2-normalise embeddings", shown="the model's own")
    embedder_query_max_length: int = knob(512, "query tokens kept by the embedder")
    embedder_passage_max_length: int = knob(512, "passage tokens kept by the embedder")
    trust_remote_code: bool = knob(False, "allow a model's own Python code to run")
    use_gpu: bool | None = knob(None, "one GPU per encoder actor (bf16, or fp16 where there is no bf16): true, "
                                "false or auto (GPUs when the cluster has or can add them)", shown="auto")
    concurrency: int | None = knob(None, "encoder actors", shown="one per GPU, or per CPU - 1")
    skip_bad_rows: bool = knob(False, "skip and count bad rows instead of stopping at the first one")
    overwrite: bool = knob(False, "allow a non-empty output_dir (its shards are replaced)")
    ray_address: str | None = knob(None, "cluster to join; else RAY_ADDRESS; else a local Ray", shown="local")

    def resolved(self) -> RowJobConfig:
        """A copy with packaged models' hub ids replaced by their local paths (subclasses name them)."""
        return dataclasses.replace(self, **self._shard_dir())

    def _shard_dir(self) -> dict[str, str]:
        """With ``output_file`` alone, the shards go to ``<output_file>.shards`` until they are joined."""
        return {"output_dir": f"{self.output_file}.shards"} if self.output_file and not self.output_dir else {}

    def validate_common(self, batch_field: str, extra_inputs: list[str]) -> None:
        """The checks mining and scoring share (inputs, output folder, encoder settings)."""
        if not self.input_file:
            raise ConfigError("input_file is required: one or more JSONL files, folders or globs")
        if self.output_file:
            if self.output_dir != f"{self.output_file}.shards":
                raise ConfigError("give output_dir (a folder of shards) or output_file (one JSONL file), not both")
            fs, path = filesystem(self.output_file)
            if fs.get_file_info(path).type != pafs.FileType.NotFound and not self.overwrite:
                raise ConfigError(f"output_file {self.output_file!r} exists; pass --overwrite to replace it")
        check_local_inputs(self.input_file, "input_file")
        check_survives_job(self.output_file or self.output_dir, "output_file" if self.output_file else "output_dir")
        check_output(self.output_dir, self.overwrite, self.input_file + extra_inputs)
        check_encoder(self.pooling_method, self.embedder_query_max_length, self.embedder_passage_max_length,
                      batch_field, getattr(self, batch_field), self.concurrency)
        check_format("query_instruction_format_for_retrieval", self.query_instruction_format_for_retrieval)


@dataclass
class MineConfig(RowJobConfig):
    """``bge-ray mine``: FlagEmbedding's hn_mine arguments (``input_file``, ``candidate_pool``,
    ``range_for_sampling``, ``negative_number``, ``embedder_*``) plus the false-negative filters."""

    COMMAND: ClassVar[str] = "mine"
    ALIASES: ClassVar[dict[str, str]] = {"batch_size": "embedder_batch_size"}  # hn_mine's name
    TRANSLATE: ClassVar[Any] = Flags(ROW_JOB_IGNORED, {
        "examples_for_task": ((None,), "in-context examples (decoder-only ICL embedders) are not supported yet"),
    })

    embedder_name_or_path: str = knob("BAAI/bge-base-en-v1.5", "the model that mines")
    candidate_pool: list[str] | None = knob(None, "JSONL files to draw negatives from ('text', or BEIR 'title' + "
                                            "'text')", shown="the input's passages")
    range_for_sampling: str = knob("10-210", "ranks START-END (0-based, END excluded) to sample negatives from")
    negative_number: int = knob(15, "negatives per row")
    positive_score_ratio: float | None = knob(None, "never pick a candidate scoring above this times the row's "
                                              "lowest positive score (false-negative filter)")
    max_negative_score: float | None = knob(None, "never pick a candidate scoring above this (false-negative "
                                            "filter)")
    seed: int = knob(42, "same seed and input: same output")
    passage_instruction_for_retrieval: str | None = knob(None, "instruction put before every candidate passage")
    embedder_batch_size: int = knob(256, "texts per encoder batch")

    def resolved(self) -> MineConfig:
        return dataclasses.replace(self, embedder_name_or_path=resolve_model_path(self.embedder_name_or_path),
                                   **self._shard_dir())

    def validate(self) -> None:
        if self.candidate_pool is not None:
            check_local_inputs(self.candidate_pool, "candidate_pool")
        self.validate_common("embedder_batch_size", self.candidate_pool or [])
        parse_range(self.range_for_sampling)
        if self.negative_number < 1:
            raise ConfigError(f"negative_number must be >= 1, got {self.negative_number}")
        if self.positive_score_ratio is not None and not 0 < self.positive_score_ratio <= 1:
            raise ConfigError(f"positive_score_ratio must be in (0, 1] (e.g. 0.95) or unset, got {self.positive_score_ratio}")
        if self.max_negative_score is not None and not math.isfinite(self.max_negative_score):
            raise ConfigError(f"max_negative_score must be a finite number or unset, got {self.max_negative_score}")


@dataclass
class ScoreConfig(RowJobConfig):
    """``bge-ray score``: teacher scores for every positive and negative of every row."""

    COMMAND: ClassVar[str] = "score"
    ALIASES: ClassVar[dict[str, str]] = {"reranker_batch_size": "batch_size"}  # add_reranker_score's name
    TRANSLATE: ClassVar[Any] = Flags(ROW_JOB_IGNORED, {
        "reranker_peft_path": ((None,), "bge-ray score loads no adapters: give the merged model as "
                                        "reranker_name_or_path (a LoRA run's output_dir/merged_model, with "
                                        "save_merged_lora_model, or peft's merge_and_unload)"),
        "cutoff_layers": ((None, ()), _LAYERED), "compress_ratio": ((1,), _LAYERED),
        "compress_layers": ((None, ()), _LAYERED),
    })

    reranker_name_or_path: str | None = knob(None, "a reranker teacher: a cross-encoder (one logit per pair) or a "
                                             "decoder-only LLM reranker (its \"Yes\" logit); give this or "
                                             "embedder_name_or_path")
    embedder_name_or_path: str | None = knob(None, "a bi-encoder teacher (similarity / teacher_temperature); give "
                                             "this or reranker_name_or_path")
    reranker_max_length: int = knob(512, "tokens of a (query, passage) pair the reranker reads (the passage is "
                                    "shortened to fit, as FlagReranker does)")
    reranker_query_max_length: int | None = knob(None, "query tokens of a pair", shown="3/4 of reranker_max_length")
    query_instruction_for_rerank: str | None = knob(None, "instruction put before every query for the reranker")
    query_instruction_format_for_rerank: str = knob("{}{}", "how instruction and query join: two {} slots")
    passage_instruction_for_rerank: str | None = knob(None, "instruction put before every passage for the reranker")
    passage_instruction_format_for_rerank: str = knob("{}{}", "how instruction and passage join: two {} slots")
    prompt: str | None = knob(None, "a decoder-only (LLM) reranker's question after each pair (FlagLLMReranker's "
                              "prompt); its score is the next token's \"Yes\" logit", shown="FlagEmbedding's")
    normalize: bool = knob(False, "a reranker's scores through a sigmoid (FlagEmbedding's normalize), as "
                           "knowledge_distillation then reads them; else its raw logits")
    batch_size: int = knob(64, "pairs (or texts) per teacher batch")
    # raw cosines of one group lie within ~0.3, so their softmax is near uniform; dividing by the
    # student's temperature puts them on the scale of a reranker's logits
    teacher_temperature: float = knob(0.02, "a bi-encoder teacher's similarities are divided by this to make "
                                      "logits (use the temperature you train with)")

    def resolved(self) -> ScoreConfig:
        return dataclasses.replace(
            self, **{name: resolve_model_path(getattr(self, name)) for name in ("reranker_name_or_path",
                                                                                "embedder_name_or_path")
                     if getattr(self, name)}, **self._shard_dir())

    def validate(self) -> None:
        self.validate_common("batch_size", [])
        if (self.reranker_name_or_path is None) == (self.embedder_name_or_path is None):
            raise ConfigError("give exactly one teacher: reranker_name_or_path (a cross-encoder) "
                              "or embedder_name_or_path (a bi-encoder)")
        if self.reranker_max_length < 4:
            raise ConfigError(f"reranker_max_length must be >= 4, got {self.reranker_max_length}")
        query_tokens = self.reranker_query_max_length
        if query_tokens is not None and not 0 < query_tokens < self.reranker_max_length:
            raise ConfigError(f"reranker_query_max_length must be between 1 and reranker_max_length "
                              f"({self.reranker_max_length}), got {query_tokens}")
        if self.normalize and self.reranker_name_or_path is None:
            raise ConfigError("normalize puts a reranker's logits through a sigmoid; a bi-encoder teacher's scores "
                              "are similarities / teacher_temperature: drop normalize")
        check_format("query_instruction_format_for_rerank", self.query_instruction_format_for_rerank)
        check_format("passage_instruction_format_for_rerank", self.passage_instruction_format_for_rerank)
        if not self.teacher_temperature > 0:
            raise ConfigError(f"teacher_temperature must be > 0, got {self.teacher_temperature}")

    @property
    def teacher(self) -> str:
        return self.reranker_name_or_path or self.embedder_name_or_path or ""
