"""The per-worker recipe of a fine-tune: what every Ray Train worker runs.

``TorchTrainer(train_loop_per_worker=worker.train_loop)`` runs :class:`EmbedderRecipe` (a reranker's:
:class:`bge_ray.train.reranker.RerankerRecipe`, which changes the model, the step and the export);
it reads top to bottom:

    setup()            resume point (before the model, so the data pipeline starts while it loads),
                       tokenizer + model + DeepSpeed engine, the checkpoint's state, the validation set
    train()            the zero-shot validation, then for each epoch's batches:
                         train_step()      forward, loss, backward and optimizer step (GradCache or not)
                         after_step()      log record, validation + checkpoint, or checkpoint
    save_checkpoint()  DeepSpeed shards, trained rows, manifest and (when asked) the exported model,
                       reported to Ray Train with their metrics

Everything a worker measures leaves through ``ray.train.report`` (see :mod:`bge_ray.train.progress`).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import deepspeed
import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint
from ray.train.v2._internal.execution import context as ray_train_context
from ray.train.v2._internal.execution import storage as ray_train_storage

from bge_ray.config.deepspeed import engine_config
from bge_ray.config.finetune import FinetuneConfig
from bge_ray.data.collate import LENGTH_POOL_BATCHES, GroupCollator, length_grouped
from bge_ray.data.icl import IclCollator
from bge_ray.data.pipeline import router_batches
from bge_ray.data.plan import DataSet
from bge_ray.data.text import TextSpec
from bge_ray.errors import CheckpointError
from bge_ray.model.embedder import Embedder
from bge_ray.model.grad_cache import micro_steps, train_micro_batch
from bge_ray.model.lora import add_lora, grow_embeddings, lora_config_of
from bge_ray.model.loss import contrastive_loss, m3_loss, matryoshka_loss
from bge_ray.model.m3 import M3Embedder
from bge_ray.model.optim import build_optimizer, build_scheduler
from bge_ray.model.tokenizer import load_tokenizer
from bge_ray.retrieval.encode import EncoderSpec
from bge_ray.retrieval.evaluate import validate as retrieval_metrics
from bge_ray.seeds import init_seed
from bge_ray.train.card import write_model_card
from bge_ray.train.checkpointing import (
    STATE_FILE,
    checkpoint_name,
    load_trained_rows,
    pick_resume_checkpoint,
    restore_rng_state,
    save_rng_state,
    staging_dir,
    trained_rows_name,
    write_manifest,
)
from bge_ray.train.export import consolidated_state_dict, export_lora, export_model, transformer_state
from bge_ray.train.plan import TrainPlan
from bge_ray.train.progress import ReportBuffer

DS_TAG = "deepspeed"
MODEL_SUBDIR = "model"


def world() -> tuple[int, int]:
    """(rank, world size) of this worker; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(values: list[float], op: Any = None) -> list[float]:
    """Element-wise sum (or ``op``) of ``values`` over all workers."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_gather(obj: Any) -> list[Any]:
    """Every worker's ``obj``, in rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def vote_group() -> Any:
    """The process group for the per-batch votes: a CPU (gloo) group beside a GPU run's NCCL one, so that
    a vote never waits for the GPU's queued work; None (the default group) on gloo or without a group.
    Every worker calls it, in the same order (it makes a group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() != "gloo":
        return dist.new_group(backend="gloo")
    return None


def batches_in_lockstep(it: Iterator[dict], limit: int, group: Any = None,
                        flag: Any = lambda: False) -> Iterator[tuple[dict, float, bool]]:
    """Up to ``limit`` batches, the seconds spent waiting for each and rank 0's ``flag()``, stopping on
    every worker as soon as any worker runs dry (a collective with a missing participant hangs
    forever). One all-reduce a batch, on the CPU over ``group`` (:func:`vote_group`), carries both
    answers; one worker alone needs none."""
    rank, size = world()
    for _ in range(limit):
        t0 = time.perf_counter()
        batch = next(it, None)
        waited = time.perf_counter() - t0
        votes = torch.tensor([1 if batch is not None else 0, 1 if rank == 0 and flag() else 0], dtype=torch.int64)
        if size > 1:
            dist.all_reduce(votes, group=group)
        if int(votes[0]) < size:
            return
        yield batch, waited, bool(votes[1])


class FirstBatchEarly:
    """An iterator whose first item is already being fetched, on a thread, from the moment it is made:
    the data pipeline starts up while the caller builds the model. Errors surface on the first ``next``."""

    _END = object()

    def __init__(self, it: Iterator[Any]) -> None:
        self._it = it
        self._first: list[Any] = []
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(target=self._fetch, name="first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first.append(next(self._it, self._END))
        except BaseException as e:  # re-raised by __next__ in the training thread
            self._error = e

    def __iter__(self) -> FirstBatchEarly:
        return self

    def __next__(self) -> Any:
        if self._thread is None:
            return next(self._it)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
        item = self._first.pop()
        if item is self._END:
            raise StopIteration
        return item


@dataclass
class StepWindow:
    """What the micro-batches since the last log record did. ``loss`` sums the micro-batches' losses
    where they are (on the GPU, a tensor): read when a record is made, not after every step, so the host
    never waits for the GPU between steps."""

    loss: Any = 0.0
    micro: int = 0
    groups: int = 0
    tokens: int = 0
    wait: float = 0.0
    paused: float = 0.0  # seconds spent validating and checkpointing: not training time
    t0: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0 - self.paused

    def add(self, loss: Any, groups: int, tokens: int, wait: float) -> None:
        self.loss = self.loss + loss
        self.micro += 1
        self.groups += groups
        self.tokens += tokens
        self.wait += wait


@dataclass
class ResumePoint:
    """Where a resumed run continues: the checkpoint's local files, step and the rows its epoch trained."""

    path: str
    local_dir: str
    global_step: int
    tag: str | None


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 ** 2)


def _peak_gpu_gib(device: torch.device) -> float:
    """The most GPU memory PyTorch held at once in this process (0 without a GPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report's whole metrics dict on every worker; bge-ray reports every few
    seconds, and prints what matters on the driver."""
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)  # Ray names this logger by its file
    logging.getLogger(ray_train_storage.__name__).setLevel(logging.WARNING)


class EmbedderRecipe:
    """One worker's fine-tune of an embedder (see the module docstring for the order of things)."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        self.cfg = FinetuneConfig(**loop_config["cfg"])
        self.plan = TrainPlan(**loop_config["plan"])
        self.ds_config = loop_config["ds_config"]
        self.router = loop_config["router"]  # BatchRouter actor: every epoch's planned batches
        self.datasets = [DataSet(**{**d, "files": tuple(d["files"])}) for d in loop_config["datasets"]]
        self.vset = ray.get(loop_config["vset"]) if loop_config.get("vset") is not None else None
        self.data_rows = loop_config.get("data_rows")
        self.start = loop_config.get("start")  # resume_from_checkpoint: another run's checkpoint to continue from
        self.rank, self.world = world()
        self.t_start = time.time()
        self.global_step = 0
        self.resume: ResumePoint | None = None
        self.epoch_rows: list[np.ndarray] = []  # row keys this worker trained in the current epoch
        self.reports = ReportBuffer()
        self.window = StepWindow()
        self.totals = StepWindow()
        self.first_batch_s: float | None = None
        self.first_step_s: float | None = None
        self.zero_shot: dict[str, float] = {}
        self.last_record: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        torch.set_num_threads(max(1, int(cfg.worker_resources.get("CPU", 1))))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.manual_seed(init_seed(cfg.seed, self.rank))
        _quiet_ray_train_reports()
        self.device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
        if cfg.use_gpu and cfg.bf16 and not torch.cuda.is_bf16_supported():
            raise RuntimeError(f"bf16 is on but {torch.cuda.get_device_name(self.device)} has no bf16: use fp16 instead")
        if cfg.use_gpu and cfg.tf32 is not None:  # HF's tf32: matmuls and cuDNN convolutions
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
        self.votes = vote_group()
        self.resume = self._find_resume_point()
        start_epoch, _ = self.plan.position(self.global_step, cfg.gradient_accumulation_steps)
        # the first epoch's pipeline starts now and runs while the tokenizer, model and engine load
        self.first_batches = (FirstBatchEarly(self._open_epoch(start_epoch))
                              if self.global_step < self.plan.total_steps else None)
        try:
            self._setup_model()
            self._load_resume_state()
        finally:
            self._release_resume_copy()
        self.eval_spec = EncoderSpec(text=TextSpec.from_config(cfg), pooling=cfg.sentence_pooling_method,
                                     normalize=cfg.normalize_embeddings, batch_size=cfg.eval_batch_size)

    def _find_resume_point(self) -> ResumePoint | None:
        """The newest intact checkpoint of this run (after a worker-group restart or a rerun), or None.

        Every rank checks the candidates' manifests (metadata only), then reads and hashes only the
        files it loads; if any rank finds damage, all fall back to the next older checkpoint. After
        falling back, new checkpoints get a tag, so they never land in the damaged one's directory."""
        latest = ray.train.get_checkpoint() or self.start  # this run's own checkpoint wins once there is one
        if latest is None:
            return None
        fs = latest.filesystem
        local_root = None if isinstance(fs, pafs.LocalFileSystem) else tempfile.mkdtemp(prefix="bge_ray_resume_")
        try:
            path, local_dir, skipped = pick_resume_checkpoint(fs, latest.path, self.rank,
                                                              lambda _, why: all_gather(why), local_root)
        except CheckpointError:
            if local_root:
                shutil.rmtree(local_root, ignore_errors=True)
            raise
        for reason in skipped:
            self.reports.add({"kind": "message", "text": f"checkpoint {reason}: passed over"})
        return self._resume_point(path, local_dir, skipped)

    def _resume_point(self, path: str, local_dir: str, skipped: list[str]) -> ResumePoint:
        with open(os.path.join(local_dir, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        if state["world_size"] != self.world:
            raise CheckpointError(
                f"{path} was written by {state['world_size']} workers; this run has {self.world}. "
                f"Resume with num_workers: {state['world_size']}, or start over with resume: never")
        self.global_step = int(state["global_step"])
        _, skip_micro = self.plan.position(self.global_step, self.cfg.gradient_accumulation_steps)
        self.epoch_rows = [load_trained_rows(local_dir, self.rank)] if skip_micro else []  # the epoch's record
        tag = all_gather(time.strftime("r%Y%m%d%H%M%S") if skipped else None)[0]  # rank 0's clock names it
        return ResumePoint(path, local_dir, self.global_step, tag)

    def _setup_model(self) -> None:
        """Tokenizer, collator, model and DeepSpeed engine (optimizer and schedule inside)."""
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.cache_dir, cfg.trust_remote_code,
                                        cfg.use_fast_tokenizer, tuple(cfg.additional_special_tokens or ()))
        self.collators = self.make_collators()
        model = self.build_model()
        if cfg.gradient_checkpointing:
            model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.model.config.use_cache = False
        if cfg.fix_position_embedding:
            model.freeze_position_embeddings()
        hidden = getattr(model.model.config, "hidden_size", None)
        ds_config = engine_config(self.ds_config, int(hidden) if hidden else None,
                                  sum(p.numel() for p in model.parameters()),
                                  micro_steps(cfg.per_device_train_batch_size, cfg.train_group_size, cfg.sub_batch_size))
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        optimizer = scheduler = None
        if "optimizer" not in ds_config:
            optimizer = build_optimizer(model, cfg)
        if "scheduler" not in ds_config:
            # HF's rule: a DeepSpeed JSON's optimizer without a scheduler gets lr_scheduler_type's, as ours does
            def scheduler(opt: torch.optim.Optimizer) -> Any:
                return build_scheduler(opt, cfg, self.plan.warmup_steps, self.plan.total_steps)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            model_parameters=[p for p in model.parameters() if p.requires_grad] if optimizer is None else None,
            dist_init_required=False)
        self.engine.train()
        self.engine_ready_s = time.time() - self.t_start

    def make_collators(self) -> list[Any]:
        """One collator per data set: padded queries and groups of passages."""
        cfg = self.cfg
        collators = [GroupCollator(group_size=None if ds.kind == "symmetric_class" else ds.group_size,
                                   pad_token_id=self.tokenizer.pad_token_id, padding_side=self.tokenizer.padding_side,
                                   pad_to_multiple_of=cfg.pad_to_multiple_of,
                                   knowledge_distillation=cfg.knowledge_distillation and ds.has_scores)
                     for ds in self.datasets]
        if cfg.icl:  # the queries' in-context examples come from the batch: added here, on the worker
            spec = TextSpec.from_config(cfg)
            collators = [IclCollator(c, self.tokenizer, spec, cfg.seed) for c in collators]
        return collators

    def build_model(self) -> torch.nn.Module:
        """The embedder: its token embeddings grown for added tokens and LoRA adapters on it (``use_lora``),
        both drawn alike on every worker; BGE-M3's, with its sparse and ColBERT heads, under
        ``unified_finetuning``."""
        cfg = self.cfg
        loading = {"pooling": cfg.sentence_pooling_method, "normalize": cfg.normalize_embeddings,
                   "cache_dir": cfg.cache_dir, "trust_remote_code": cfg.trust_remote_code,
                   "attention_dropout": cfg.attention_dropout}
        if cfg.unified_finetuning:
            model = M3Embedder.from_pretrained(cfg.model_name_or_path, tokenizer=self.tokenizer,
                                               colbert_dim=cfg.colbert_dim, seed=cfg.seed, **loading)
        else:
            model = Embedder.from_pretrained(cfg.model_name_or_path, **loading)
        if cfg.additional_special_tokens:
            grow_embeddings(model.model, len(self.tokenizer), cfg.seed)
        if cfg.use_lora:
            model.model = add_lora(model.model, lora_config_of(cfg), cfg.seed)
        if cfg.fix_encoder:
            model.freeze_encoder()
        return model

    def _load_resume_state(self) -> None:
        if self.resume is None:
            return
        _, client = self.engine.load_checkpoint(self.resume.local_dir, tag=DS_TAG)
        saved_step = int(client["bge_ray"]["global_step"])
        if saved_step != self.global_step:
            raise CheckpointError(f"{self.resume.path}: its DeepSpeed state is at step {saved_step}, "
                                  f"its {STATE_FILE} at step {self.global_step}")
        restore_rng_state(self.resume.local_dir, self.rank)
        epoch, skip_micro = self.plan.position(self.global_step, self.cfg.gradient_accumulation_steps)
        self.reports.add({"kind": "message", "text": f"resumed from {self.resume.path} at step {self.global_step}"
                          + (f" ({skip_micro} micro-batches into epoch {epoch})" if skip_micro else "")})

    def _release_resume_copy(self) -> None:
        """Remove the local copy of a remote checkpoint once the engine has loaded it (or failed to)."""
        if self.resume is not None and self.resume.local_dir != self.resume.path:
            shutil.rmtree(os.path.dirname(self.resume.local_dir), ignore_errors=True)

    # ------------------------------------------------------------------ data
    def _resume_epoch(self) -> tuple[int, int]:
        """(epoch, micro-batches into it) this launch started at: (0, 0) for a fresh run."""
        return self.plan.position(self.resume.global_step if self.resume else 0, self.cfg.gradient_accumulation_steps)

    def _open_epoch(self, epoch: int) -> Iterator[tuple[int, dict]]:
        """This worker's (data set, batch) of ``epoch``, in the plan's order; a resumed epoch starts after
        the global batches trained before (group_by_length: at the start of the pool they were regrouped
        in, whose batches already trained are passed over)."""
        done = self._resume_epoch()[1] if self.resume is not None and epoch == self._resume_epoch()[0] else 0
        skip = done % LENGTH_POOL_BATCHES if self.cfg.group_by_length else 0
        if self.rank == 0:
            ray.get(self.router.begin.remote(epoch, done - skip))
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        batches = router_batches(self.router, self.rank)
        if not self.cfg.group_by_length:
            return batches
        regrouped = length_grouped((b for _, b in batches), self.cfg.per_device_train_batch_size, self.cfg.order_seed,
                                   epoch, self.rank, first_pool=(done - skip) // LENGTH_POOL_BATCHES)
        for _ in range(skip):
            next(regrouped, None)
        return ((0, b) for b in regrouped)

    def _epoch_batches(self, epoch: int) -> Iterator[tuple[int, tuple[int, dict], float, bool]]:
        """(micro-batch index in the epoch, (data set, raw batch), seconds waited, whether rank 0 wants a
        progress line) for the rest of ``epoch``."""
        start_epoch, skip_micro = self._resume_epoch()
        first_micro = skip_micro if epoch == start_epoch else 0
        if first_micro == 0:
            self.epoch_rows = []
        batches = self.first_batches if epoch == start_epoch and self.first_batches is not None else self._open_epoch(epoch)
        lockstep = batches_in_lockstep(batches, self.plan.micro_batches_per_epoch - first_micro, self.votes,
                                       self.reports.progress_due)
        for micro, (raw, waited, progress) in enumerate(lockstep, start=first_micro):
            yield micro, raw, waited, progress

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        """Validate the zero-shot model, train the planned steps, save the final checkpoint."""
        if self.vset is not None and self.global_step == 0:
            self.zero_shot = self.validate()
        self.window = StepWindow()  # throughput counts training from here
        start_epoch, _ = self.plan.position(self.global_step, self.cfg.gradient_accumulation_steps)
        for epoch in range(start_epoch, self.plan.num_epochs):
            if self.global_step >= self.plan.total_steps:
                break
            for micro, raw, waited, progress in self._epoch_batches(epoch):
                self.train_step(raw, waited, epoch * self.plan.micro_batches_per_epoch + micro)
                if (micro + 1) % self.cfg.gradient_accumulation_steps:
                    continue
                self.global_step += 1
                self.after_step(epoch, micro, progress)
                if self.global_step >= self.plan.total_steps:
                    break
        self.save_final()

    def train_step(self, item: tuple[int, dict[str, Any]], waited: float, forward: int = 0) -> None:
        """One micro-batch of one data set: collate, forward, contrastive loss (in-batch and cross-device
        negatives unless the data set has none), backward, DeepSpeed step. ``forward``: the micro-batches the
        run trained before this one (FlagEmbedding's count for ``self_distill_start_step``)."""
        d, inputs, tokens = self.take_batch(item)
        teacher, cfg, in_batch = inputs.get("teacher_scores"), self.cfg, self.datasets[d].in_batch_negatives
        settings = {"temperature": cfg.temperature, "teacher_scores": teacher, "kd_loss_type": cfg.kd_loss_type,
                    "cross_device": cfg.negatives_cross_device and in_batch, "in_batch_negatives": in_batch}
        if cfg.unified_finetuning:
            distill = cfg.use_self_distill and forward > cfg.self_distill_start_step

            def loss_fn(q: Any, p: Any) -> torch.Tensor:
                return m3_loss(q, p, inputs["q_attention_mask"], self_distill=distill,
                               score_weights=tuple(cfg.m3_score_weights), loss_weights=tuple(cfg.m3_loss_weights),
                               **settings)
        elif cfg.use_mrl:
            def loss_fn(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
                return matryoshka_loss(q, p, cfg.mrl_dims, cfg.mrl_weights, cfg.normalize_embeddings, **settings)
        else:
            def loss_fn(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
                return contrastive_loss(q, p, **settings)
        loss = train_micro_batch(self.engine, inputs, loss_fn, cfg.sub_batch_size)
        self.count(loss, int(inputs["q_input_ids"].shape[0]), tokens, waited)

    def take_batch(self, item: tuple[int, dict[str, Any]]) -> tuple[int, dict[str, torch.Tensor], int]:
        """(data set, model inputs on the device, real tokens in them, counted on the host) of a raw batch;
        its rows recorded as trained."""
        if self.first_batch_s is None:
            self.first_batch_s = time.time() - self.t_start
        d, raw = item
        self.epoch_rows.append(np.asarray(raw["row_key"], dtype=np.int64))
        host = self.collators[d](raw)
        tokens = int(sum(np.asarray(v).sum() for k, v in host.items() if k.endswith("attention_mask")))
        return d, {k: torch.as_tensor(v, device=self.device) for k, v in host.items()}, tokens

    def count(self, loss: Any, groups: int, tokens: int, waited: float) -> None:
        """Add a micro-batch to the log window and the run's totals."""
        for window in (self.window, self.totals):
            window.add(loss, groups, tokens, waited)

    def after_step(self, epoch: int, micro: int, progress: bool = False) -> None:
        """After optimizer step ``global_step``: log, validate and checkpoint when they are due."""
        step, cfg = self.global_step, self.cfg
        first = self.first_step_s is None  # the first step of this launch (a resumed run's too)
        if first:
            self.first_step_s = time.time() - self.t_start
            self.reports.add({"kind": "first_step", "step": step, "time": time.time(), "worker_start": self.t_start,
                              "engine_ready_s": self.engine_ready_s, "first_batch_s": self.first_batch_s})
        report_now = first
        if self._due(cfg.logging_strategy, cfg.logging_steps) or step == self.plan.total_steps:
            report_now |= self._log_step(epoch, micro)
        elif progress:
            self.reports.add({"kind": "progress", "step": step, "total_steps": self.plan.total_steps,
                              "time": time.time(), "epoch": self._epoch_progress(epoch, micro)})
            report_now = True
        if step >= self.plan.total_steps:
            return  # the final checkpoint follows
        paused = time.perf_counter()
        if self.vset is not None and self._due(cfg.eval_strategy or "steps", cfg.eval_steps or cfg.save_steps):
            self.save_checkpoint(epoch, self.validate(), export=True)
            self.window.paused += time.perf_counter() - paused
        elif self.vset is None and self._due(cfg.save_strategy, cfg.save_steps):
            self.save_checkpoint(epoch, {"kind": "checkpoint"}, export=cfg.save_model_in_checkpoints)
            self.window.paused += time.perf_counter() - paused
        elif report_now:
            ray.train.report({"kind": "log", **self.reports.take()})

    def _due(self, strategy: str, steps: int) -> bool:
        """Whether HF's ``strategy`` (steps, epoch or no) calls for its event after this step."""
        every = {"steps": steps, "epoch": self.plan.steps_per_epoch}.get(strategy)
        return every is not None and self.global_step % every == 0

    def _epoch_progress(self, epoch: int, micro: int) -> float:
        return round(epoch + (micro + 1) / self.plan.micro_batches_per_epoch, 4)

    def _log_step(self, epoch: int, micro: int) -> bool:
        """A log record of the window (averaged over it and the workers); whether rank 0 says a report is due."""
        w = self.window
        elapsed = w.elapsed()
        due = 1.0 if self.rank == 0 and self.reports.due() else 0.0
        loss_sum, micro_n, groups, tokens, wait, due = all_reduce([float(w.loss), w.micro, w.groups, w.tokens, w.wait,
                                                                   due])
        grad_norm = self.engine.get_global_grad_norm()
        self.last_record = {
            "kind": "train", "step": self.global_step, "total_steps": self.plan.total_steps, "time": time.time(),
            "epoch": self._epoch_progress(epoch, micro),
            "loss": loss_sum / max(1, micro_n), "learning_rate": float(self.engine.get_lr()[0]),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "groups_per_s": groups / elapsed, "tokens_per_s": tokens / elapsed,
            "data_wait_frac": wait / self.world / elapsed, "window_s": elapsed, "window_groups": groups,
            "window_tokens": tokens, "time_to_engine_s": self.engine_ready_s,
            "time_to_first_batch_s": self.first_batch_s, "time_to_first_step_s": self.first_step_s}
        self.reports.add(self.last_record)
        self.window = StepWindow()
        return due > 0

    # ------------------------------------------------------------------ validate
    def validate(self) -> dict[str, Any]:
        """Retrieval metrics of the model now (all workers embed, rank 0 searches)."""
        queries, docs = len(self.vset.dataset.eval_queries), len(self.vset.doc_ids)
        what = (f"{sum(map(len, self.vset.candidates.values())):,} (query, passage) pairs of {queries:,} queries"
                if self.vset.candidates is not None else f"{queries:,} queries, {docs:,} passages")
        self.reports.add({"kind": "message", "text": f"validating at step {self.global_step}: {what} on "
                                                     f"{self.world} worker(s)"})
        ray.train.report({"kind": "log", **self.reports.take()})
        t0 = time.time()
        metrics = self.measure()
        out: dict[str, Any] = {"kind": "eval", "step": self.global_step, "metric": self.cfg.metric_for_best_model,
                               **{f"eval_{k}": v for k, v in metrics.items()}, "eval_s": time.time() - t0,
                               **{f"zero_shot_{k}": v for k, v in self.zero_shot.items()}}
        if self.global_step == 0:
            ray.train.report({**self.reports.take(), **out})  # the zero-shot baseline: no checkpoint to rank
            return dict(metrics)
        return out

    def measure(self) -> dict[str, float]:
        """The validation metrics of the model now, on every worker (a collective)."""
        cfg = self.cfg
        return retrieval_metrics(self.engine.module, self.tokenizer, self.vset, self.eval_spec, self.device,
                                 dims=tuple(cfg.mrl_dims) if cfg.use_mrl else (),
                                 modes=("sparse", "colbert", "hybrid") if cfg.unified_finetuning else (),
                                 weights=tuple(cfg.m3_score_weights))

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(self, epoch: int, metrics: dict[str, Any], export: bool = False, final: bool = False) -> None:
        """Every worker writes its DeepSpeed shards, the rows it trained this epoch and, last, a manifest
        of its files into a local dir; Ray uploads each worker's dir into one checkpoint in storage and
        registers it only once all have arrived."""
        state = {"global_step": self.global_step, "epoch": epoch, "world_size": self.world, **({"final": True} if final else {})}
        ckpt_dir = staging_dir()
        tag = self.resume.tag if self.resume else None
        try:
            self.engine.save_checkpoint(ckpt_dir, tag=DS_TAG, client_state={"bge_ray": state})
            if export:
                self._export(os.path.join(ckpt_dir, MODEL_SUBDIR), metrics, checkpoint_name(self.global_step, tag))
            keys = np.concatenate(self.epoch_rows) if self.epoch_rows else np.empty(0, dtype=np.int64)
            np.save(os.path.join(ckpt_dir, trained_rows_name(self.rank)), keys.astype(np.int64))
            save_rng_state(ckpt_dir, self.rank)
            if self.rank == 0:
                with open(os.path.join(ckpt_dir, STATE_FILE), "w", encoding="utf-8") as f:
                    json.dump(state, f)
            write_manifest(ckpt_dir, self.rank)
            ray.train.report({**self.reports.take(), **metrics, "step": self.global_step},
                             checkpoint=Checkpoint.from_directory(ckpt_dir),
                             checkpoint_dir_name=checkpoint_name(self.global_step, tag))
        finally:
            shutil.rmtree(ckpt_dir, ignore_errors=True)

    def _export(self, out_dir: str, metrics: dict[str, Any], name: str) -> None:
        """The model as transformers / sentence-transformers / FlagEmbedding load it (a collective), with
        its card: where it will lie in storage, the zero-shot and this checkpoint's validation."""
        sd = consolidated_state_dict(self.engine, self.zero_stage, self.cfg.bf16 or self.cfg.fp16)
        if self.rank != 0:
            return
        self.export_weights(sd, out_dir)
        evals = {"zero-shot": {"step": 0, **self.zero_shot} if self.zero_shot else None}
        if "eval_s" in metrics:
            evals["this checkpoint"] = {"step": self.global_step,
                                        **{k[len("eval_"):]: v for k, v in metrics.items() if k.startswith("eval_")}}
        stored = f"{ray.train.get_context().get_storage().experiment_fs_path.rstrip('/')}/{name}/{MODEL_SUBDIR}"
        write_model_card(out_dir, self.cfg.to_dict(), self.data_rows, evals, model_dir=stored)

    def export_weights(self, state_dict: dict[str, torch.Tensor], out_dir: str) -> None:
        """The exported model's files (rank 0): transformer, tokenizer, sentence-transformers files, M3 heads."""
        if self.cfg.use_lora:
            export_lora(self.engine.module.model, self.tokenizer, transformer_state(state_dict), out_dir,
                        self.cfg.to_dict())
            return
        export_model(self.engine.module.model, self.tokenizer, transformer_state(state_dict), out_dir,
                     self.cfg.to_dict(), heads=state_dict if self.cfg.unified_finetuning else None)

    def save_final(self) -> None:
        """The last checkpoint, with the exported model and the run's summary."""
        loss_sum, micro_n = all_reduce([float(self.totals.loss), self.totals.micro])
        peak, peak_gpu = all_reduce([_peak_rss_gib(), _peak_gpu_gib(self.device)],
                                    op=dist.ReduceOp.MAX if dist.is_initialized() else None)
        summary = {k: v for k, v in self.last_record.items() if k not in ("kind", "time")}
        if self.device.type == "cuda":
            summary["peak_gpu_mem_gib_per_worker"] = peak_gpu
        summary.update(kind="final", train_loss=loss_sum / max(1, micro_n), peak_rss_gib_per_worker=peak,
                       train_runtime_s=time.time() - self.t_start, world_size=self.world,
                       resumed_at_step=self.resume.global_step if self.resume else 0,
                       worker_rank=ray.train.get_context().get_world_rank())
        if self.vset is not None:
            summary.update({k: v for k, v in self.validate().items() if k not in ("kind", "step")})
        self.save_checkpoint(self.plan.num_epochs, summary, export=True, final=True)

