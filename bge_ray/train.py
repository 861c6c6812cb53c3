"""The per-worker training recipe: build data, build the DeepSpeed engine, loop, report, checkpoint, export.

Runs inside each Ray Train worker (``TorchTrainer(train_loop_per_worker=train_loop)``). Read it top
to bottom: :func:`train_loop` is the whole story.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from bge_ray.checkpointing import (
    STATE_FILE,
    CheckpointError,
    checkpoint_name,
    load_trained_rows,
    pick_resume_checkpoint,
    staging_dir,
    trained_rows_name,
    write_manifest,
)
from bge_ray.config import FinetuneConfig
from bge_ray.data import GroupCollator, length_grouped, load_tokenizer
from bge_ray.deepspeed_config import fill_model_sizes
from bge_ray.evaluation import EncoderSpec, load_validation_set, validate
from bge_ray.grad_cache import micro_steps, train_micro_batch
from bge_ray.loss import contrastive_loss
from bge_ray.modeling import Embedder
from bge_ray.optim import build_optimizer, linear_schedule

DS_TAG = "deepspeed"
MODEL_SUBDIR = "model"


@dataclass
class TrainPlan:
    """Step arithmetic decided on the driver, from the row count and the config."""

    num_rows: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    num_epochs: int
    warmup_steps: int

    @classmethod
    def make(cls, cfg: FinetuneConfig, num_rows: int) -> TrainPlan:
        from bge_ray.config import ConfigError

        per_worker_rows = num_rows // cfg.num_workers  # Ray Data's equal split
        micro = per_worker_rows // cfg.per_device_train_batch_size
        steps_per_epoch = micro // cfg.gradient_accumulation_steps
        if steps_per_epoch < 1:
            need = cfg.num_workers * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
            raise ConfigError(
                f"{num_rows} training rows are fewer than one optimizer step needs ({need} = num_workers "
                f"{cfg.num_workers} x per_device_train_batch_size {cfg.per_device_train_batch_size} x "
                f"gradient_accumulation_steps {cfg.gradient_accumulation_steps}): add data or lower one of these"
            )
        if cfg.max_steps > 0:
            total = cfg.max_steps
        else:
            total = max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))
        epochs = math.ceil(total / steps_per_epoch)
        warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total)
        return cls(num_rows, micro, steps_per_epoch, total, epochs, warmup)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(values: list[float], op: Any = None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.cpu().tolist()


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 ** 2)


def _batches_in_lockstep(it: Iterator[dict], limit: int, device: torch.device) -> Iterator[tuple[dict, float]]:
    """Yield up to ``limit`` batches, stopping on every worker as soon as any worker runs dry.

    A collective with a missing participant hangs forever, so workers agree each step.
    Also yields the seconds spent waiting for the batch.
    """
    for _ in range(limit):
        t0 = time.perf_counter()
        batch = next(it, None)
        waited = time.perf_counter() - t0
        have = torch.tensor([1 if batch is not None else 0], dtype=torch.int64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
        if int(have.item()) == 0:
            return
        yield batch, waited


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


def engine_config(ds_config: dict[str, Any], model: torch.nn.Module, steps_per_micro_batch: int = 1) -> dict[str, Any]:
    """The driver's DeepSpeed config with the bucket sizes that depend on the model filled from it, and
    DeepSpeed's accumulation counting each micro-batch as ``steps_per_micro_batch`` micro-steps (GradCache's
    chunks: :func:`bge_ray.grad_cache.micro_steps`)."""
    hidden = getattr(getattr(getattr(model, "model", model), "config", None), "hidden_size", None)
    ds = fill_model_sizes(ds_config, int(hidden) if hidden else None, sum(p.numel() for p in model.parameters()))
    if steps_per_micro_batch > 1:
        ds["gradient_accumulation_steps"] *= steps_per_micro_batch
        ds["train_batch_size"] *= steps_per_micro_batch
    return ds


def _new_window() -> dict[str, float]:
    """Counters for one logging window."""
    return {"loss": 0.0, "micro": 0, "groups": 0, "tokens": 0, "wait": 0.0, "t0": time.perf_counter()}


def _save_checkpoint(engine: Any, state: dict, metrics: dict, rows: list[np.ndarray], tag: str | None,
                     export: tuple | None = None) -> None:
    """Every worker writes its DeepSpeed shards, the rows it trained this epoch and, last, a manifest of
    its files into a local dir; Ray uploads each worker's dir into one checkpoint in storage and
    registers it only once all have arrived."""
    rank, world = _world()
    state = dict(state, world_size=world)
    ckpt_dir = staging_dir()
    try:
        engine.save_checkpoint(ckpt_dir, tag=DS_TAG, client_state={"bge_ray": state})
        if export is not None:
            export_fn = export[0]
            export_fn(os.path.join(ckpt_dir, MODEL_SUBDIR))
        keys = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
        np.save(os.path.join(ckpt_dir, trained_rows_name(rank)), keys.astype(np.int64))
        if rank == 0:
            with open(os.path.join(ckpt_dir, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(state, f)
        write_manifest(ckpt_dir, rank)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(ckpt_dir),
                         checkpoint_dir_name=checkpoint_name(state["global_step"], tag))
    finally:
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _choose_checkpoint(latest: Checkpoint) -> tuple[Checkpoint, str | None]:
    """The newest intact checkpoint (rank 0 checks the manifests, every rank gets its answer).

    After falling back past a damaged checkpoint, new checkpoints get a tag so that they never land in
    the damaged one's directory when they reach its step."""
    rank, _ = _world()
    answer: tuple[str, str | None, list[str]] | str = ""
    if rank == 0:
        try:
            path, skipped = pick_resume_checkpoint(latest.filesystem, latest.path)
            answer = (path, time.strftime("r%Y%m%d%H%M%S") if skipped else None, skipped)
        except CheckpointError as e:
            answer = str(e)
    answer = _broadcast(answer)
    if isinstance(answer, str):
        raise CheckpointError(answer)
    path, tag, skipped = answer
    if rank == 0:
        for reason in skipped:
            print(f"[bge-ray] checkpoint {reason}: passed over", flush=True)
    return Checkpoint(path, filesystem=latest.filesystem), tag


def _consolidated_state_dict(engine: Any, zero_stage: int, mixed_precision: bool) -> dict | None:
    """Full weights on rank 0 (a collective under ZeRO-3 and under mixed precision), keys of the inner
    transformers model. With bf16/fp16 under ZeRO 0-2 these are the fp32 master weights, not their
    16-bit copies, so the exported model is as precise as the optimizer's."""
    rank, _ = _world()
    prefix = "model."
    if mixed_precision and zero_stage < 3:
        from deepspeed.utils import safe_get_full_fp32_param

        full = {name: safe_get_full_fp32_param(param) for name, param in engine.module.named_parameters()}
        if rank != 0:
            return None
        # parameters without an fp32 master (frozen ones, optimizers that keep none) and buffers as they are
        sd = {k: (full[k].float() if full.get(k) is not None else v) for k, v in engine.module.state_dict().items()}
    elif zero_stage == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict() if rank == 0 else None
    if rank != 0 or sd is None:
        return None
    return {k[len(prefix):]: v.detach().cpu().contiguous() for k, v in sd.items() if k.startswith(prefix)}


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry point. ``loop_config``: ``cfg`` (dict), ``plan`` (dict), ``ds_config``, ``progress``."""
    import deepspeed

    from bge_ray.export import export_model

    cfg = FinetuneConfig(**loop_config["cfg"])
    plan = TrainPlan(**loop_config["plan"])
    progress = loop_config.get("progress")
    epoch_state = loop_config.get("epoch_state")  # EpochState actor: the epoch (seeds shuffle and groups), rows left out
    t_start = time.time()
    rank, world = _world()
    ctx = ray.train.get_context()
    cpus = max(1, int(cfg.worker_resources.get("CPU", 1)))
    torch.set_num_threads(cpus)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    if cfg.use_gpu and cfg.bf16 and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"bf16 is on but {torch.cuda.get_device_name(device)} has no bf16: use fp16 instead")

    shard = ray.train.get_dataset_shard("train")

    # --- resume point ---
    # A worker group restarted after a failure, or a rerun of the same run, continues from the newest
    # intact checkpoint: same step, optimizer, scheduler and RNG-free data position. Mid-epoch, the
    # rows trained before the checkpoint are left out of the rest of that epoch (exactly: Ray Data's
    # equal split then gives each worker the micro-batches it has left). Read before the model is
    # built, so that the data pipeline can start while the model loads.
    stack = contextlib.ExitStack()
    global_step, start_epoch, skip_micro = 0, 0, 0
    epoch_rows: list[np.ndarray] = []  # row keys this worker trained in the current epoch
    resumed_rows = np.empty(0, dtype=np.int64)  # every worker's, for the resumed epoch's filter
    tag = None
    ckpt_dir = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        checkpoint, tag = _choose_checkpoint(checkpoint)
        ckpt_dir = stack.enter_context(checkpoint.as_directory())
        with open(os.path.join(ckpt_dir, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        if state["world_size"] != world:
            raise CheckpointError(
                f"{checkpoint.path} was written by {state['world_size']} workers; this run has {world}. "
                f"Resume with num_workers: {state['world_size']}, or start over with resume: never"
            )
        global_step = int(state["global_step"])
        start_epoch = global_step // plan.steps_per_epoch
        skip_micro = (global_step % plan.steps_per_epoch) * cfg.gradient_accumulation_steps
        if skip_micro:
            epoch_rows = [load_trained_rows(ckpt_dir, rank)]
            if rank == 0:
                resumed_rows = np.concatenate([load_trained_rows(ckpt_dir, r) for r in range(world)])
    resumed_at = global_step

    def open_epoch(epoch: int) -> Iterator[dict]:
        """This worker's batches of ``epoch``; a resumed epoch leaves out the rows trained before."""
        if epoch_state is not None:
            if rank == 0:
                leave_out = resumed_rows if epoch == start_epoch and skip_micro else np.empty(0, dtype=np.int64)
                ray.get(epoch_state.begin.remote(epoch, leave_out))
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
        # rows arrive shuffled (the read's shuffle buffer, reseeded by the epoch): no local buffer to
        # fill here before the first batch
        seed = cfg.seed * 7919 + epoch * 104729 + rank
        batches = iter(shard.iter_batches(batch_size=cfg.per_device_train_batch_size, batch_format="numpy",
                                          drop_last=True, prefetch_batches=2))
        return length_grouped(batches, cfg.per_device_train_batch_size, seed) if cfg.group_by_length else batches

    # the first epoch's pipeline starts now (reading, tokenizing) and runs while the tokenizer, model and engine load
    first_batches = FirstBatchEarly(open_epoch(start_epoch)) if global_step < plan.total_steps else None

    # --- tokenizer, model and engine ---
    # (the checkpoint's local copy, if it was downloaded, is removed however this ends)
    try:
        tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.cache_dir, cfg.trust_remote_code)
        collate = GroupCollator(
            group_size=cfg.train_group_size, pad_token_id=tokenizer.pad_token_id,
            padding_side=tokenizer.padding_side, pad_to_multiple_of=cfg.pad_to_multiple_of,
            knowledge_distillation=cfg.knowledge_distillation,
        )
        model = Embedder.from_pretrained(cfg.model_name_or_path, pooling=cfg.sentence_pooling_method,
                                         normalize=cfg.normalize_embeddings, cache_dir=cfg.cache_dir,
                                         trust_remote_code=cfg.trust_remote_code, attention_dropout=cfg.attention_dropout)
        if cfg.gradient_checkpointing:
            model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.model.config.use_cache = False
        if cfg.fix_position_embedding:
            model.freeze_position_embeddings()
        ds_config = engine_config(loop_config["ds_config"], model, micro_steps(
            cfg.per_device_train_batch_size, cfg.train_group_size, cfg.sub_batch_size))
        zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        optimizer = scheduler = None
        if "optimizer" not in ds_config:
            optimizer = build_optimizer(model, cfg, cfg.use_gpu)
            if "scheduler" not in ds_config:
                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(plan.warmup_steps, plan.total_steps))
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            model_parameters=[p for p in model.parameters() if p.requires_grad] if optimizer is None else None,
            dist_init_required=False,
        )
        engine.train()
        engine_ready_s = time.time() - t_start
        if ckpt_dir is not None:
            _, client = engine.load_checkpoint(ckpt_dir, tag=DS_TAG)
            saved_step = int(client["bge_ray"]["global_step"])
            if saved_step != global_step:
                raise CheckpointError(f"{checkpoint.path}: its DeepSpeed state is at step {saved_step}, "
                                      f"its {STATE_FILE} at step {global_step}")
            if rank == 0:
                print(f"[bge-ray] resumed from {checkpoint.path} at step {global_step}"
                      + (f" ({skip_micro} micro-batches into epoch {start_epoch})" if skip_micro else ""), flush=True)
    finally:
        stack.close()

    def export(out_dir: str) -> None:
        sd = _consolidated_state_dict(engine, zero_stage, cfg.bf16 or cfg.fp16)
        if rank == 0:
            export_model(engine.module.model, tokenizer, sd, out_dir, cfg.to_dict())

    # --- validation (retrieval metrics of the model being trained) ---
    vset = load_validation_set(cfg.eval_data, cfg.eval_split) if cfg.eval_data else None
    eval_steps = cfg.eval_steps or cfg.save_steps
    eval_spec = EncoderSpec(
        model=cfg.model_name_or_path, pooling=cfg.sentence_pooling_method, normalize=cfg.normalize_embeddings,
        query_instruction=cfg.query_instruction_for_retrieval, query_instruction_format=cfg.query_instruction_format,
        passage_instruction=cfg.passage_instruction_for_retrieval,
        passage_instruction_format=cfg.passage_instruction_format, query_max_len=cfg.query_max_len,
        passage_max_len=cfg.passage_max_len, batch_size=cfg.eval_batch_size,
    )
    zero_shot: dict[str, float] = {}

    def run_eval(step: int) -> dict[str, float]:
        t0 = time.time()
        metrics = validate(engine.module, tokenizer, vset, eval_spec, device)
        out = {f"eval_{k}": v for k, v in metrics.items()}
        out["eval_s"] = time.time() - t0
        out.update({f"zero_shot_{k}": v for k, v in zero_shot.items()})
        if rank == 0 and progress is not None:
            progress.put_nowait(dict(out, kind="eval", step=step, time=time.time(),
                                     metric=cfg.metric_for_best_model))
        return out

    if vset is not None and global_step == 0:
        zero_shot = {k[len("eval_"):]: v for k, v in run_eval(0).items() if k.startswith("eval_") and k != "eval_s"}

    # --- loop ---
    ga = cfg.gradient_accumulation_steps
    window = _new_window()
    totals = {"loss": 0.0, "micro": 0}
    first_step_s: float | None = None
    first_batch_s: float | None = None
    last_metrics: dict[str, Any] = {}
    done = global_step >= plan.total_steps
    for epoch in range(start_epoch, plan.num_epochs):
        if done:
            break
        resumed_epoch = epoch == start_epoch and skip_micro > 0
        if not resumed_epoch:
            epoch_rows = []
        first_micro = skip_micro if resumed_epoch else 0
        batches = first_batches if epoch == start_epoch and first_batches is not None else open_epoch(epoch)
        lockstep = _batches_in_lockstep(batches, plan.micro_batches_per_epoch - first_micro, device)
        for micro, (raw, waited) in enumerate(lockstep, start=first_micro):
            if first_batch_s is None:
                first_batch_s = time.time() - t_start
            epoch_rows.append(np.asarray(raw["row_key"], dtype=np.int64))
            batch = collate(raw)
            inputs = {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
            teacher = inputs.get("teacher_scores")
            loss = train_micro_batch(engine, inputs, lambda q, p, teacher=teacher: contrastive_loss(
                q, p, cfg.temperature, teacher_scores=teacher, kd_loss_type=cfg.kd_loss_type,
                cross_device=cfg.negatives_cross_device), cfg.sub_batch_size)
            window["loss"] += float(loss.detach())
            window["micro"] += 1
            window["groups"] += int(inputs["q_input_ids"].shape[0])
            window["tokens"] += int(batch["q_attention_mask"].sum() + batch["p_attention_mask"].sum())
            window["wait"] += waited
            totals["loss"] += float(loss.detach())
            totals["micro"] += 1
            if (micro + 1) % ga:
                continue
            global_step += 1
            if first_step_s is None:
                first_step_s = time.time() - t_start
                if rank == 0 and progress is not None:
                    progress.put_nowait({"kind": "first_step", "time": time.time(), "step": global_step,
                                         "worker_start": t_start, "engine_ready_s": engine_ready_s,
                                         "first_batch_s": first_batch_s})
            if global_step % cfg.logging_steps == 0 or global_step == plan.total_steps:
                elapsed = time.perf_counter() - window["t0"]
                loss_sum, micro_n, groups, tokens, wait = _all_reduce(
                    [window["loss"], window["micro"], window["groups"], window["tokens"], window["wait"]])
                grad_norm = engine.get_global_grad_norm()
                last_metrics = {
                    "step": global_step, "total_steps": plan.total_steps,
                    "epoch": round(epoch + (micro + 1) / plan.micro_batches_per_epoch, 4),
                    "loss": loss_sum / max(1, micro_n),
                    "learning_rate": float(engine.get_lr()[0]),
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "groups_per_s": groups / elapsed, "tokens_per_s": tokens / elapsed,
                    "data_wait_frac": wait / world / elapsed, "time_to_first_step_s": first_step_s,
                    "time_to_engine_s": engine_ready_s, "time_to_first_batch_s": first_batch_s,
                    "window_s": elapsed, "window_groups": groups, "window_tokens": tokens,
                }
                if rank == 0 and progress is not None:
                    progress.put_nowait(dict(last_metrics, kind="log", time=time.time()))
                window = _new_window()
            if global_step >= plan.total_steps:
                done = True
                break
            if vset is not None and global_step % eval_steps == 0:
                # with eval_data every checkpoint carries its metrics and its model, so the best can be exported
                _save_checkpoint(engine, {"global_step": global_step, "epoch": epoch},
                                 dict(last_metrics, step=global_step, **run_eval(global_step)), epoch_rows, tag,
                                 export=(export,))
            elif vset is None and global_step % cfg.save_steps == 0:
                _save_checkpoint(engine, {"global_step": global_step, "epoch": epoch},
                                 dict(last_metrics, step=global_step), epoch_rows, tag)
    # --- final checkpoint with the exported model ---
    loss_sum, micro_n = _all_reduce([totals["loss"], totals["micro"]])
    (peak,) = _all_reduce([_peak_rss_gib()], op=dist.ReduceOp.MAX if dist.is_initialized() else None)
    final = dict(last_metrics, step=global_step, train_loss=loss_sum / max(1, micro_n),
                 peak_rss_gib_per_worker=peak, train_runtime_s=time.time() - t_start, world_size=world,
                 resumed_at_step=resumed_at,
                 worker_rank=ctx.get_world_rank())
    if vset is not None:
        final.update(run_eval(global_step))
    _save_checkpoint(engine, {"global_step": global_step, "epoch": plan.num_epochs, "final": True}, final,
                     epoch_rows, tag, export=(export,))
