"""How a text becomes model input: its instruction and its token budget. One rule for training,
evaluation, mining and scoring."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bge_ray.config.finetune import FinetuneConfig

CARRIED_COLUMNS = ("pos_scores", "neg_scores", "row_key", "source", "dataset", "num_neg")  # kept by tokenizing


def regroup(flat: list, sizes: list[int]) -> list[list]:
    """``flat`` cut back into consecutive groups of ``sizes`` (texts tokenized at once, per row again)."""
    groups, k = [], 0
    for size in sizes:
        groups.append(flat[k:k + size])
        k += size
    return groups


def carried_columns(batch: Any) -> dict[str, Any]:
    """The columns of a stream table (``pyarrow.Table``) that tokenizing passes on unchanged."""
    return {name: batch.column(name) for name in CARRIED_COLUMNS if name in batch.column_names}


def apply_instruction(text: str, instruction: str | None, fmt: str = "{}{}") -> str:
    """``fmt.format(instruction, text)``, or the text as it is when there is no instruction.

    An empty instruction is an instruction (FlagEmbedding's rule): with the default format it leaves
    the text unchanged; with ``"<instruct>{}\\n<query>{}"`` it still adds the markers.
    """
    return text if instruction is None else fmt.format(instruction, text)


@dataclass(frozen=True)
class TextSpec:
    """Instructions, formats and token lengths for queries and passages, and the tokenizer to count
    tokens with. Picklable, for Ray tasks and actors."""

    tokenizer: str
    query_max_len: int = 64
    passage_max_len: int = 256
    query_instruction: str | None = None
    query_instruction_format: str = "{}{}"
    passage_instruction: str | None = None
    passage_instruction_format: str = "{}{}"
    cache_dir: str | None = None
    trust_remote_code: bool = False
    use_fast_tokenizer: bool = True
    pairs: bool = False  # a reranker's input: each query with each of its passages, one sequence
    special_tokens: tuple[str, ...] = ()  # additional_special_tokens added to the tokenizer
    llm_sep: str | None = None  # a decoder-only reranker's pairs: what comes between query, passage and prompt
    icl_suffix: str | None = None  # icl (in-context examples): what follows every query; None: no icl
    example_query_max_len: int = 64
    example_passage_max_len: int = 96
    retrieval_use_examples: bool = True

    @classmethod
    def from_config(cls, cfg: FinetuneConfig) -> TextSpec:
        rerank = cfg.task == "reranker"
        return cls(tokenizer=cfg.model_name_or_path, query_max_len=cfg.query_max_len,
                   passage_max_len=cfg.passage_max_len,
                   query_instruction=cfg.query_instruction_for_rerank if rerank else cfg.query_instruction_for_retrieval,
                   query_instruction_format=cfg.query_instruction_format,
                   passage_instruction=(cfg.passage_instruction_for_rerank if rerank
                                        else cfg.passage_instruction_for_retrieval),
                   passage_instruction_format=cfg.passage_instruction_format, cache_dir=cfg.cache_dir,
                   trust_remote_code=cfg.trust_remote_code, use_fast_tokenizer=cfg.use_fast_tokenizer, pairs=rerank,
                   special_tokens=tuple(cfg.additional_special_tokens or ()),
                   llm_sep=cfg.sep_token if rerank and cfg.model_type == "decoder" else None,
                   icl_suffix=cfg.icl_suffix_str if cfg.icl else None, example_query_max_len=cfg.example_query_max_len,
                   example_passage_max_len=cfg.example_passage_max_len,
                   retrieval_use_examples=cfg.retrieval_use_examples)

    def query(self, text: str, instruction: str | None = None) -> str:
        """A query with its instruction: the row's own (its ``prompt``) when given, else the spec's."""
        chosen = instruction if instruction is not None else self.query_instruction
        return apply_instruction(text, chosen, self.query_instruction_format)

    def passage(self, text: str, instruction: str | None = None) -> str:
        """A passage with its instruction: the row's own (a reranker row's ``passage_prompt``) when given."""
        chosen = instruction if instruction is not None else self.passage_instruction
        return apply_instruction(text, chosen, self.passage_instruction_format)

    def format(self, texts: list[str], kind: str, instructions: list[str | None] | None = None) -> list[str]:
        """Queries (``kind == "query"``, each with its own instruction if given) or passages, formatted."""
        if kind == "query":
            return [self.query(t, i) for t, i in zip(texts, instructions or [None] * len(texts), strict=True)]
        return [self.passage(t) for t in texts]

    def max_len(self, kind: str) -> int:
        return self.query_max_len if kind == "query" else self.passage_max_len

    def replace(self, **changes: object) -> TextSpec:
        return dataclasses.replace(self, **changes)
