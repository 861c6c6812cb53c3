"""``finetune(config) -> FinetuneResult``: a fine-tune launched from the driver. The CLI, ``jobs/``
and sweeps call this.

    validate the config and the validation set (before Ray starts)
      -> connect to Ray -> scan and index the training data (data/scan.py) -> plan the steps
      -> a BatchRouter actor (data/pipeline.py) that streams each epoch's planned batches
      -> TorchTrainer(train_loop) on num_workers workers, each a DeepSpeed engine (recipe.py; a reranker's: reranker.py)
      -> the best (or last) checkpoint's exported model -> output_dir
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import ray
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.queue import Queue
from transformers import AutoConfig

from bge_ray.cluster import actor_count, capacity, check_fits, connect_for, need_for_training, side_actor
from bge_ray.config.deepspeed import build_deepspeed_config
from bge_ray.config.finetune import FinetuneConfig, check_output_dir, check_survives_job, lora_settings_given
from bge_ray.config.parse import resolve_config
from bge_ray.console import log
from bge_ray.data.pipeline import start_router
from bge_ray.data.scan import load_training_data
from bge_ray.errors import ConfigError
from bge_ray.model.embedder import check_matryoshka_dims, set_attention_dropout
from bge_ray.model.lora import lora_targets
from bge_ray.model.m3 import colbert_size
from bge_ray.model.reranker import layered_reranker, reranker_config, yes_token
from bge_ray.model.tokenizer import load_tokenizer, reads_as_decoder
from bge_ray.retrieval.datasets import ValidationSet, load_validation_set
from bge_ray.retrieval.encode import encoder_spec_for
from bge_ray.retrieval.evaluate import evaluate_model
from bge_ray.storage import filesystem, publish_model, storage_root
from bge_ray.train.card import write_model_card
from bge_ray.train.checkpointing import STATE_FILE, list_checkpoints, read_json
from bge_ray.train.plan import TrainPlan
from bge_ray.train.progress import DriverFeed, QueueReader, RunLog
from bge_ray.train.recipe import MODEL_SUBDIR
from bge_ray.train.trackers import open_trackers
from bge_ray.train.worker import train_loop


@dataclass
class FinetuneResult:
    """What a fine-tune produced."""

    model_dir: str                      # the exported model (output_dir, or in the checkpoint with publish=False)
    metrics: dict[str, Any]             # the final report's metrics, best_* from the best validation, timings
    checkpoint: Any                     # the final ray.train.Checkpoint
    num_rows: int                       # usable training rows
    num_bad_rows: int                   # rows skipped (skip_bad_rows)
    config: FinetuneConfig              # the validated config the run used
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)   # every log record
    evals: list[dict[str, Any]] = dataclasses.field(default_factory=list)     # every validation


RUN_CONFIG_FILE = "bge_ray_config.json"  # the config a run started with, in its run folder
# fields a resumed run may change: where and how it runs, not what it trains
RESUMABLE_CHANGES = {"ray_address", "max_failures", "resume", "logging_steps", "report_to", "overwrite_output_dir",
                     "cache_dir", "storage_path", "run_name", "placement_strategy", "resources_per_worker", "use_gpu",
                     "accelerator_type", "tf32", "logging_strategy", "save_model_in_checkpoints", "resume_from_checkpoint"}


def default_run_name(cfg: FinetuneConfig) -> str:
    """``run_name``, else ``bge-ray-<output_dir name>-<hash of its absolute path>``: two projects'
    ``./out`` are two runs."""
    if cfg.run_name:
        return cfg.run_name
    path = os.path.abspath(cfg.output_dir)
    return f"bge-ray-{os.path.basename(path)}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def check_same_config(cfg: FinetuneConfig, storage: str, run_name: str) -> None:
    """Refuse to resume a run whose saved config trains something else than ``cfg``.

    Raises:
        ConfigError: the fields that differ, named, with how to start a new run instead.
    """
    fs, root = filesystem(storage)
    path = f"{root.rstrip('/')}/{run_name}/{RUN_CONFIG_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return
    with fs.open_input_stream(path) as f:
        saved = json.loads(f.read().decode("utf-8"))
    now = json.loads(json.dumps(cfg.to_dict()))
    differ = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in differ[:8])
        raise ConfigError(f"the unfinished run {storage.rstrip('/')}/{run_name} was started with another config "
                          f"({shown}{'; ...' if len(differ) > 8 else ''}); rerun with its config to resume it, or "
                          "with resume: never (or another run_name) to start a new run")


def save_run_config(cfg: FinetuneConfig, storage: str, run_name: str) -> None:
    fs, root = filesystem(storage)
    run_dir = f"{root.rstrip('/')}/{run_name}"
    fs.create_dir(run_dir, recursive=True)
    with fs.open_output_stream(f"{run_dir}/{RUN_CONFIG_FILE}") as f:
        f.write(json.dumps(cfg.to_dict(), indent=1, sort_keys=True).encode("utf-8"))


def latest_state(storage: str, run_name: str) -> dict[str, Any] | None:
    """The trainer state of the newest checkpoint of an earlier run with this name: None when there is
    no such run, ``{}`` when it has no checkpoint yet."""
    fs, root = filesystem(storage)
    run_dir = f"{root.rstrip('/')}/{run_name}"
    if fs.get_file_info(run_dir).type != pafs.FileType.Directory:
        return None
    ckpts = list_checkpoints(fs, run_dir)
    if not ckpts:
        return {}
    state, why = read_json(fs, f"{ckpts[-1]}/{STATE_FILE}")
    if why and why != "is missing":
        raise ValueError(f"{ckpts[-1]}/{STATE_FILE} {why}")
    return state or {}


def resolve_run_name(cfg: FinetuneConfig, storage: str) -> tuple[str, int | None]:
    """The run's name and, when it continues an unfinished run (``resume: auto``), the step it resumes
    from; a finished run, or ``resume: never``, gets a fresh name (the old one plus a timestamp)."""
    run_name = default_run_name(cfg)
    state = latest_state(storage, run_name)
    if state is None:
        return run_name, None
    fresh = f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if cfg.resume == "never":
        log(f"resume: never; {storage}/{run_name} exists, starting a new run {fresh}")
        return fresh, None
    if state.get("final"):
        log(f"the run {storage}/{run_name} already finished (step {state['global_step']}); starting a new run {fresh}")
        return fresh, None
    check_same_config(cfg, storage, run_name)
    step = state.get("global_step", 0)
    log(f"resuming the unfinished run {storage}/{run_name} from step {step} (resume: never starts over)")
    return run_name, step


def best_checkpoint(result: Result, cfg: FinetuneConfig) -> tuple[Any, dict[str, Any]]:
    """The checkpoint whose model is exported and the metrics it adds: the best validation's
    (``final_model: best`` with ``eval_data``; Ray Train ranks checkpoints by it), else the last."""
    metrics = dict(result.metrics or {})
    if not cfg.eval_data or cfg.final_model != "best":
        return result.checkpoint, metrics
    key = f"eval_{cfg.metric_for_best_model}"
    try:
        best = result.get_best_checkpoint(metric=key, mode="max")
    except RuntimeError:  # no checkpoint carries the metric
        best = None
    if best is None:
        return result.checkpoint, metrics
    scored = dict((c.path, m) for c, m in (result.best_checkpoints or []))[best.path]
    metrics.update({f"best_{k}": v for k, v in scored.items() if k.startswith("eval_")})
    metrics["best_step"] = scored["step"]
    log(f"best checkpoint by {cfg.metric_for_best_model}: step {scored['step']} ({scored[key]:.4f})")
    return best, metrics


def start_point(cfg: FinetuneConfig, storage: str) -> tuple[str, int | None, Checkpoint | None]:
    """The run's name, the step an unfinished run of it resumes from, and the checkpoint a new run
    starts from (``resume_from_checkpoint``: a folder; ``true``: this config's unfinished run, which
    must exist).

    Raises:
        ConfigError: an unfinished run with another config; no run to continue; a folder that holds
            no bge-ray checkpoint.
    """
    target = cfg.resume_from_checkpoint
    if target is None or target.lower() == "true":
        run_name, resumed_at = resolve_run_name(cfg, storage)
        if target is not None and resumed_at is None:
            raise ConfigError(f"resume_from_checkpoint: true, but {storage.rstrip('/')}/{default_run_name(cfg)} holds "
                              "no unfinished run of this config to continue")
        return run_name, resumed_at, None
    fs, path = filesystem(target)
    if fs.get_file_info(f"{path.rstrip('/')}/{STATE_FILE}").type != pafs.FileType.File:
        hf = fs.get_file_info(f"{path.rstrip('/')}/trainer_state.json").type == pafs.FileType.File
        raise ConfigError(f"resume_from_checkpoint: {target} holds no bge-ray checkpoint ({STATE_FILE} and DeepSpeed "
                          "state)" + ("; to start from an HF Trainer checkpoint's weights, give it as "
                                      "model_name_or_path" if hf else ""))
    state, _ = read_json(fs, f"{path.rstrip('/')}/{STATE_FILE}")
    run_name, _ = resolve_run_name(dataclasses.replace(cfg, resume="never"), storage)
    log(f"starting from {target} (step {(state or {}).get('global_step', '?')}) as the new run {run_name}")
    return run_name, None, Checkpoint(path=path, filesystem=fs)


def choose_devices(cfg: FinetuneConfig) -> FinetuneConfig:
    """``use_gpu: auto`` decided on the connected cluster (GPUs when it has or can add them), and the
    cluster checked again for GPU workers.

    Raises:
        ConfigError: the devices cannot run the config, or the cluster can never hold the workers.
    """
    if cfg.use_gpu is not None:
        return cfg
    chosen = cfg.with_devices(capacity().has_gpus())
    log(f"use_gpu: auto -> {'GPUs' if chosen.use_gpu else 'CPUs'} ({chosen.num_workers} worker(s) x "
        f"{chosen.worker_resources})")
    if chosen.use_gpu:
        check_fits(need_for_training(chosen.num_workers, chosen.worker_resources),
                   f"{chosen.num_workers} workers x {chosen.worker_resources} and 1 CPU for the data pipeline")
    return chosen


def _trainer(cfg: FinetuneConfig, loop_config: dict[str, Any], storage: str, run_name: str,
             callbacks: list[Any]) -> TorchTrainer:
    return TorchTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=cfg.worker_resources,
                                     placement_strategy=cfg.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.save_total_limit,
                checkpoint_score_attribute=f"eval_{cfg.metric_for_best_model}" if cfg.eval_data else None,
                checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks))


def _lora_targets(cfg: FinetuneConfig) -> list[str]:
    """The target modules LoRA adapts in the model (a line names those left out, and why)."""
    targets, missing = lora_targets(cfg.model_name_or_path, cfg.target_modules, cfg.modules_to_save,
                                    bool(cfg.additional_special_tokens), cfg.cache_dir, cfg.trust_remote_code)
    dropped = [t for t in cfg.target_modules if t not in targets]
    if dropped:
        why = [f"{cfg.model_name_or_path} has no {' '.join(missing)}"] if missing else []
        if len(dropped) > len(missing):
            why.append("embed_tokens only once additional_special_tokens add tokens, as in FlagEmbedding")
        log(f"target_modules: LoRA adapts {' '.join(targets)}; not {' '.join(dropped)} ({'; '.join(why)})")
    return targets


def resolve_model_kind(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with what the model decides: a decoder-only model trains as FlagEmbedding's decoder runners
    train it (``use_lora`` on unless said otherwise; a reranker's ``model_type: decoder``), an encoder in
    full; LoRA's targets cut to the modules the model has.

    Raises:
        ValueError: LoRA settings for an encoder, LoRA with BGE-M3's heads, a ``model_type`` the model is
            not, target modules the model does not have.
    """
    name = cfg.model_name_or_path
    decoder = reads_as_decoder(name, cfg.cache_dir, cfg.trust_remote_code)
    kind = "decoder" if decoder else "encoder"
    rerank = cfg.task == "reranker"
    if rerank and cfg.model_type not in (None, kind):
        raise ValueError(f"model_type {cfg.model_type}: {name} is {'a decoder-only' if decoder else 'an encoder'} model")
    if not decoder:
        if rerank:  # a cross-encoder: its config, its attention dropout's name
            reranker_config(name, cfg.cache_dir, cfg.trust_remote_code, cfg.attention_dropout)
            if cfg.use_lora:
                raise ValueError(f"use_lora for {name}, an encoder reranker: its new classification head would not "
                                 "train (FlagEmbedding's encoder reranker runner has no LoRA); train it in full")
            if cfg.sep_token != "\n":
                log(f"sep_token does nothing for {name}: an encoder's pair is its tokenizer's own "
                    "([CLS] query [SEP] passage [SEP] for BERT), as in FlagEmbedding's encoder runner")
        given = lora_settings_given(cfg)
        if not cfg.use_lora and given:
            raise ValueError(f"{', '.join(given)}: LoRA settings, but {name} is an encoder, which trains in full "
                             "unless use_lora: true; set it, or drop them")
        if not cfg.use_lora:
            return dataclasses.replace(cfg, use_lora=False, model_type=kind if rerank else None)
    elif rerank:  # an LLM reranker: not layered, "Yes" one token, the attention dropout's name
        config = AutoConfig.from_pretrained(name, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code)
        refused = layered_reranker(config, name)
        if refused:
            raise ValueError(refused)
        yes_token(load_tokenizer(name, cfg.cache_dir, cfg.trust_remote_code, cfg.use_fast_tokenizer), name)
        if cfg.attention_dropout is not None:
            set_attention_dropout(config, cfg.attention_dropout, name)
    use_lora = decoder if cfg.use_lora is None else cfg.use_lora
    if use_lora and cfg.unified_finetuning:
        raise ValueError("LoRA with unified_finetuning is not supported: BGE-M3's heads train in full beside an "
                         "encoder that trains in full; set use_lora: false")
    targets = _lora_targets(cfg) if use_lora else cfg.target_modules
    if decoder:
        log(f"{name} is a decoder-only model: it trains as FlagEmbedding's decoder runner trains it ("
            + (f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g} on {' '.join(targets)}" if use_lora else "in full")
            + (", the next token's \"Yes\" logit" if rerank else ", EOS appended, left padding") + ")")
    return dataclasses.replace(cfg, use_lora=use_lora, model_type=kind if rerank else None, target_modules=targets)


def check_model(cfg: FinetuneConfig) -> FinetuneConfig:
    """What the model's config must allow, checked before Ray starts: Matryoshka dims within its size,
    a BGE-M3 head size it can have, a reranker's kind, LoRA's targets; ``cfg`` with what the model decides.

    Raises:
        ConfigError: the setting the model contradicts, and why.
    """
    try:
        if cfg.use_mrl:
            check_matryoshka_dims(cfg.model_name_or_path, cfg.mrl_dims, cfg.cache_dir, cfg.trust_remote_code)
        if cfg.unified_finetuning:
            colbert_size(cfg.model_name_or_path, cfg.colbert_dim, cfg.cache_dir, cfg.trust_remote_code)
        if cfg.eval_retriever:
            encoder_spec_for(cfg.eval_retriever)  # an embedder, not a reranker
        return resolve_model_kind(cfg)
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None


def with_candidates(cfg: FinetuneConfig, vset: ValidationSet) -> ValidationSet:
    """A reranker's validation set: each query's top ``eval_rerank_top_k`` passages by ``eval_retriever``
    (embedded on Ray Data actors, searched exactly), and that retriever's own metrics, logged."""
    spec = encoder_spec_for(cfg.eval_retriever)
    corpus = ray.data.from_items([{"_id": i, "text": t} for i, t in zip(vset.doc_ids, vset.doc_texts, strict=True)])
    row = evaluate_model(vset.dataset, spec, use_gpu=bool(cfg.use_gpu), corpus=corpus, corpus_size=len(vset.doc_ids),
                         concurrency=actor_count(None, bool(cfg.use_gpu), streaming=False),
                         depth=cfg.eval_rerank_top_k, keep_runs=True)[0]
    k = cfg.eval_rerank_top_k
    candidates = {q: sorted(docs, key=docs.get, reverse=True)[:k] for q, docs in row.pop("run").items()}
    metrics = {m: v for m, v in row.items() if "@" in m}
    log(f"validation reranks {cfg.eval_retriever}'s top {k}; the retriever alone: {cfg.metric_for_best_model} "
        f"{metrics[cfg.metric_for_best_model]:.4f}")
    return dataclasses.replace(vset, candidates=candidates, retriever_metrics=metrics)


def finetune(config: FinetuneConfig | dict[str, Any] | str, callbacks: list[Any] | None = None,
             publish: bool = True) -> FinetuneResult:
    """Fine-tune an embedder on a Ray cluster and write the model to ``output_dir``.

    Args:
        config: a :class:`FinetuneConfig`, a dict of its fields, or a YAML path. Validated (once)
            before Ray starts.
        callbacks: more Ray Train ``UserCallback`` objects; each sees every report (a sweep passes
            one that forwards to Tune).
        publish: copy the exported model to ``output_dir``; with False it stays in the run's
            checkpoint (``model_dir`` points there).

    Returns:
        A :class:`FinetuneResult`: the model's directory, the final metrics, the history of log
        records and validations, the checkpoint.

    Raises:
        ConfigError: a bad config, too little data for one step, or a local Ray too small to run it.
        DataValidationError: a bad training row or evaluation set (file and line named).
        CheckpointError: an unfinished run to resume has no intact checkpoint.
    """
    cfg = resolve_config(config)
    check_survives_job(cfg.output_dir, "output_dir")
    if publish:
        check_output_dir(cfg)
    cfg = check_model(cfg)
    launch = time.time()
    vset = load_validation_set(cfg.eval_data, cfg.eval_split) if cfg.eval_data else None  # fails before Ray starts
    if vset is not None:
        log(f"validation: {len(vset.dataset.eval_queries)} queries, {len(vset.doc_ids)} documents from "
            f"{cfg.eval_data}; best model by {cfg.metric_for_best_model}")
    storage = storage_root(cfg.storage_path)
    run_name, resumed_at, start = start_point(cfg, storage)  # an unfinished run with another config: refused here
    connect_for(cfg.num_workers, cfg.worker_resources, cfg.ray_address)
    cfg = choose_devices(cfg)
    if vset is not None and cfg.task == "reranker":
        vset = with_candidates(cfg, vset)
    data = load_training_data(cfg)
    summary = data.summary
    log(f"training data: {data.describe()}")
    plan = TrainPlan.make(cfg, summary.num_rows, data.batches_per_epoch(cfg.num_workers))
    ds_config = build_deepspeed_config(cfg, cfg.num_workers, plan.total_steps, plan.warmup_steps)
    log(f"plan: {plan.total_steps} optimizer steps ({plan.steps_per_epoch}/epoch, {plan.num_epochs} epoch(s)) on "
        f"{cfg.num_workers} worker(s) x batch {cfg.per_device_train_batch_size} x group {cfg.train_group_size}, "
        f"ZeRO-{ds_config['zero_optimization'].get('stage', 0)}{', bf16' if cfg.bf16 else ', fp16' if cfg.fp16 else ''}")
    if resumed_at is None:
        save_run_config(cfg, storage, run_name)
    run_dir = f"{storage.rstrip('/')}/{run_name}"
    router = start_router(cfg, data)
    queue = Queue(maxsize=10_000, actor_options=side_actor())
    run_log = RunLog(launch, run_dir, resumed_at, open_trackers(cfg.report_to, run_dir, run_name, cfg.to_dict()))
    loop_config = {"cfg": cfg.to_dict(), "plan": dataclasses.asdict(plan), "ds_config": ds_config,
                   "router": router, "datasets": [dataclasses.asdict(d) for d in data.datasets],
                   "vset": ray.put(vset) if vset is not None else None, "data_rows": summary.rows_per_file,
                   "start": start}
    trainer = _trainer(cfg, loop_config, storage, run_name, [DriverFeed(queue), *(callbacks or [])])
    reader = QueueReader(queue, run_log)
    reader.start()
    log(f"starting {cfg.num_workers} training worker(s) in {run_dir}")
    try:
        result = trainer.fit()
    finally:
        reader.finish()
        ray.kill(queue.actor)
        ray.kill(router)
        curves = run_log.finish()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint; see the run in {run_dir}")
    chosen, metrics = best_checkpoint(result, cfg)
    model_dir = _model_dir(chosen, cfg.output_dir, publish)
    baseline = vset.retriever_metrics if vset is not None and vset.retriever_metrics else {}
    if publish:
        write_model_card(model_dir, cfg.to_dict(), summary.rows_per_file,
                         {**({"retriever alone": baseline} if baseline else {}), **card_evals(run_log.evals, metrics, cfg)})
    metrics.update(run_log.first_step, wall_s=time.time() - launch, **{f"retriever_{k}": v for k, v in baseline.items()})
    log(f"model written to {model_dir}" + (f"; curves {curves}; metrics {run_log.path}" if curves else ""))
    return FinetuneResult(model_dir=model_dir, metrics=metrics, checkpoint=result.checkpoint,
                          num_rows=summary.num_rows, num_bad_rows=summary.num_bad, config=cfg,
                          history=run_log.history, evals=run_log.evals)


def card_evals(evals: list[dict[str, Any]], metrics: dict[str, Any], cfg: FinetuneConfig) -> dict[str, dict]:
    """The model card's evaluation columns: zero-shot, the exported (best) checkpoint's, the final one's."""
    def strip(e: dict[str, Any]) -> dict[str, Any]:
        return {"step": e["step"], **{k[len("eval_"):]: v for k, v in e.items() if k.startswith("eval_")}}

    out: dict[str, dict | None] = {}
    if evals and evals[0]["step"] == 0:
        out["zero-shot"] = strip(evals[0])
    if "best_step" in metrics:
        out["best"] = next((strip(e) for e in evals if e["step"] == metrics["best_step"]), None)
    if evals and evals[-1]["step"] > 0:
        out["final"] = strip(evals[-1])
    return {k: v for k, v in out.items() if v}


def _model_dir(checkpoint: Any, output_dir: str, publish: bool) -> str:
    """The exported model: copied to ``output_dir`` (``publish``), or where it lies in the checkpoint."""
    if not publish:
        return f"{checkpoint.path.rstrip('/')}/{MODEL_SUBDIR}"
    with checkpoint.as_directory() as ckpt_dir:
        src = os.path.join(ckpt_dir, MODEL_SUBDIR)
        if not os.path.isdir(src):
            raise RuntimeError(f"the checkpoint {checkpoint.path} holds no exported model")
        return publish_model(src, output_dir)
