"""The Python API: ``finetune(config) -> FinetuneResult``. The CLI and ``jobs/`` scripts call this."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from bge_ray.config import FinetuneConfig, resolve_config


@dataclass
class FinetuneResult:
    """What a fine-tune produced."""

    model_dir: str
    metrics: dict[str, Any]
    checkpoint: Any
    num_rows: int
    num_bad_rows: int
    config: FinetuneConfig
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    evals: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _log(msg: str) -> None:
    print(f"[bge-ray] {msg}", file=sys.stderr, flush=True)


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``, or the cluster ``ray start`` made on this machine), or start a
    local Ray with ``num_cpus`` logical CPUs."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # a `ray job submit` driver: the job's runtime env (working_dir, env_vars) already applies to
        # every worker, and Ray refuses a second one that touches the same fields
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        ray.init(address=address or "auto", log_to_driver=True)
        return
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    from ray._private.services import canonicalize_bootstrap_address

    if canonicalize_bootstrap_address(None) is not None:
        # `ray start` recorded a cluster on this machine (a head node): with no address, Ray joins it,
        # and refuses a CPU count for a cluster it joins. A stale record (a head that died without
        # `ray stop`) fails in ray.init with Ray's own advice.
        ray.init(runtime_env=env, log_to_driver=True)
        return
    # Ray runs workers at nice 15 by default, below the cluster's own services, which then take CPU
    # from the training workers (benchmarks/README.md, first section)
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=num_cpus, runtime_env=env, log_to_driver=True)


def _started_here() -> bool:
    """Whether this process started the Ray it is connected to (a local cluster, which never grows)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return bool(node is not None and node.head)


def ensure_ray(cfg: FinetuneConfig) -> None:
    """Connect for a fine-tune; a local cluster is sized for the training workers plus room for the
    Ray Data tasks that feed them, even on a machine with fewer cores than workers (CPU slots are logical).

    A local Ray this process started earlier (``ray.init()``, or ``bge_ray.mine()`` before a
    fine-tune) that is too small is an error here: Ray Train would wait forever for workers that
    cannot be placed. A joined cluster that is too small may be waiting for its autoscaler; that
    gets a warning."""
    import ray

    per_worker = cfg.worker_resources.get("CPU", 1)
    need_cpus = int(math.ceil(cfg.num_workers * per_worker)) + 1
    need_gpus = cfg.num_workers * cfg.worker_resources.get("GPU", 0)
    already = ray.is_initialized()
    connect_ray(cfg.ray_address, max(os.cpu_count() or 1, need_cpus))
    have = ray.cluster_resources()
    short = [f"{need:g} {kind} ({have.get(kind, 0):g} there)" for kind, need in (("CPU", need_cpus), ("GPU", need_gpus))
             if need and have.get(kind, 0) < need]
    if not short:
        return
    what = (f"{cfg.num_workers} workers x {cfg.worker_resources} and 1 CPU for the data pipeline need "
            + " and ".join(short))
    if already and _started_here():
        from bge_ray.config import ConfigError

        raise ConfigError(f"this process already runs a local Ray that is too small: {what}. Start it big enough "
                          f"first (ray.init(num_cpus={need_cpus})), or lower num_workers / resources_per_worker")
    _log(f"warning: the Ray cluster has too few resources now: {what}; the run waits until nodes join "
         "(an autoscaling cluster adds them; a fixed one never will)")


class _ProgressPrinter(threading.Thread):
    """Prints the workers' step metrics on the driver as they arrive."""

    def __init__(self, queue: Any, launch_time: float) -> None:
        super().__init__(daemon=True)
        self.queue = queue
        self.launch_time = launch_time
        self.stop_event = threading.Event()
        self.first_step_s: float | None = None
        self.workers_started_s: float | None = None
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        from ray.util.queue import Empty

        try:
            while not self.stop_event.is_set():
                try:
                    item = self.queue.get(timeout=0.5)
                except Empty:
                    continue
                self.show(item)
        except BaseException as e:  # kept and reported by finetune(): progress output must not kill a run
            self.error = e

    def show(self, m: dict[str, Any]) -> None:
        if m.get("kind") == "eval":
            self.evals.append(m)
            metric = m["metric"]
            extra = "".join(f" | {k} {m['eval_' + k]:.4f}" for k in ("recall@100", "mrr@10") if "eval_" + k in m)
            base = f" (zero-shot {m['zero_shot_' + metric]:.4f})" if "zero_shot_" + metric in m else ""
            label = "zero-shot" if m["step"] == 0 else f"step {m['step']:>5}"
            print(f"eval {label} | {metric} {m['eval_' + metric]:.4f}{base}{extra} | {m['eval_s']:.0f}s", flush=True)
            return
        if m.get("kind") == "first_step":
            self.first_step_s = m["time"] - self.launch_time
            self.workers_started_s = m["worker_start"] - self.launch_time
            print(f"first optimizer step {self.first_step_s:.1f}s after launch (workers started at "
                  f"{self.workers_started_s:.1f}s; model and engine ready {m['engine_ready_s']:.1f}s later, "
                  f"first batch {m['first_batch_s']:.1f}s later)", flush=True)
            return
        self.history.append(m)
        done = m["step"] / m["total_steps"]
        elapsed = m["time"] - self.launch_time
        eta = (elapsed / done - elapsed) if done > 0 else float("nan")
        print(
            f"step {m['step']:>5}/{m['total_steps']} | epoch {m['epoch']:.2f} | loss {m['loss']:.4f} | "
            f"lr {m['learning_rate']:.2e} | grad {m['grad_norm']:.3f} | {m['groups_per_s']:.2f} groups/s | "
            f"{m['tokens_per_s']:,.0f} tok/s | data wait {100 * m['data_wait_frac']:.1f}% | "
            f"elapsed {elapsed:,.0f}s | eta {eta:,.0f}s",
            flush=True,
        )


def _latest_state(storage: str, run_name: str) -> dict[str, Any] | None:
    """The trainer state of the newest checkpoint of an earlier run with this name, if any."""
    import pyarrow.fs as pafs

    from bge_ray.checkpointing import STATE_FILE, list_checkpoints, read_json

    fs, root = pafs.FileSystem.from_uri(storage if "://" in storage else f"file://{storage}")
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


def resolve_run_name(cfg: FinetuneConfig, storage: str) -> str:
    """Continue an unfinished run of the same name (``resume: auto``); otherwise use a fresh name."""
    run_name = cfg.run_name or f"bge-ray-{os.path.basename(os.path.abspath(cfg.output_dir))}"
    state = _latest_state(storage, run_name)
    if state is None:
        return run_name
    fresh = f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if cfg.resume == "never":
        _log(f"resume: never; {storage}/{run_name} exists, starting a new run {fresh}")
        return fresh
    if state.get("final"):
        _log(f"the run {storage}/{run_name} already finished (step {state['global_step']}); starting a new run {fresh}")
        return fresh
    step = state.get("global_step", 0)
    _log(f"resuming the unfinished run {storage}/{run_name} from step {step} (resume: never starts over)")
    return run_name


def _publish_model(src: str, output_dir: str) -> str:
    """Copy the exported model to ``output_dir``, replacing an old one only once the new one is complete."""
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
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


def finetune(config: FinetuneConfig | dict[str, Any] | str, callbacks: list[Any] | None = None,
             publish: bool = True) -> FinetuneResult:
    """Fine-tune an embedder on a Ray cluster and write the model to ``output_dir``.

    ``config``: a :class:`FinetuneConfig`, a dict of its fields, or a YAML path. It is validated
    before Ray starts. Connects to ``ray_address`` (or ``RAY_ADDRESS``) or starts a local Ray.
    ``callbacks``: Ray Train ``UserCallback`` objects (a sweep passes ``TuneReportCallback``).
    ``publish=False`` leaves the model in the run's checkpoint (``model_dir`` points there).
    """
    cfg = resolve_config(config)
    launch = time.time()
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from bge_ray.data import EpochState, build_train_dataset
    from bge_ray.deepspeed_config import build_deepspeed_config
    from bge_ray.train import MODEL_SUBDIR, TrainPlan, train_loop

    if cfg.eval_data:
        from bge_ray.evaluation import load_validation_set

        vset = load_validation_set(cfg.eval_data, cfg.eval_split)  # a bad eval set fails before Ray starts
        _log(f"validation: {len(vset.dataset.eval_queries)} queries, {len(vset.doc_ids)} documents "
             f"from {cfg.eval_data}; best model by {cfg.metric_for_best_model}")
    ensure_ray(cfg)
    # both off the CPU budget and outside any enclosing placement group (a Tune trial's), so they fit anywhere
    side_actor = {"num_cpus": 0, "scheduling_strategy": "DEFAULT"}
    epoch_state = ray.remote(EpochState).options(**side_actor).remote()
    dataset, summary = build_train_dataset(cfg, epoch_state)
    _log(f"training data: {summary.describe()}")
    plan = TrainPlan.make(cfg, summary.num_rows)
    ds_config = build_deepspeed_config(cfg, cfg.num_workers, plan.total_steps, plan.warmup_steps)
    _log(
        f"plan: {plan.total_steps} optimizer steps ({plan.steps_per_epoch}/epoch, {plan.num_epochs} epoch(s)) on "
        f"{cfg.num_workers} worker(s) x batch {cfg.per_device_train_batch_size} x group {cfg.train_group_size}, "
        f"ZeRO-{ds_config['zero_optimization'].get('stage', 0)}"
        f"{', bf16' if cfg.bf16 else ', fp16' if cfg.fp16 else ''}"
    )
    progress = Queue(maxsize=10_000, actor_options=side_actor)
    storage = cfg.storage_path or os.path.join(os.path.expanduser("~"), "ray_results")
    if "://" not in storage:
        storage = os.path.abspath(storage)
    run_name = resolve_run_name(cfg, storage)
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "plan": dataclasses.asdict(plan), "ds_config": ds_config,
                           "progress": progress, "epoch_state": epoch_state},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=cfg.worker_resources),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.save_total_limit,
                checkpoint_score_attribute=f"eval_{cfg.metric_for_best_model}" if cfg.eval_data else None,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=list(callbacks or []),
        ),
        datasets={"train": dataset},
    )
    printer = _ProgressPrinter(progress, launch)
    printer.start()
    try:
        result = trainer.fit()
    finally:
        printer.stop_event.set()
        printer.join(timeout=5)
        if printer.error is not None:
            _log(f"progress display failed: {type(printer.error).__name__}: {printer.error}")
        while not progress.empty():  # show what arrived after the printer's last look
            printer.show(progress.get_nowait())
        ray.kill(progress.actor)
        ray.kill(epoch_state)
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint; see the run in {storage}/{run_name}")
    chosen, metrics = result.checkpoint, dict(result.metrics or {})
    if cfg.eval_data and cfg.final_model == "best":
        key = f"eval_{cfg.metric_for_best_model}"
        scored = [(c, m) for c, m in (result.best_checkpoints or []) if key in m]
        if scored:
            chosen, best = max(scored, key=lambda cm: cm[1][key])
            metrics.update({f"best_{k}": v for k, v in best.items() if k.startswith("eval_")})
            metrics["best_step"] = best["step"]
            _log(f"best checkpoint by {cfg.metric_for_best_model}: step {best['step']} ({best[key]:.4f})")
    if publish:
        with chosen.as_directory() as ckpt_dir:
            src = os.path.join(ckpt_dir, MODEL_SUBDIR)
            if not os.path.isdir(src):
                raise RuntimeError(f"the checkpoint {chosen.path} holds no exported model")
            model_dir = _publish_model(src, cfg.output_dir)
    else:
        model_dir = f"{chosen.path.rstrip('/')}/{MODEL_SUBDIR}"
    if printer.first_step_s is not None:
        metrics["launch_to_first_step_s"] = printer.first_step_s
        metrics["launch_to_workers_s"] = printer.workers_started_s
    metrics["wall_s"] = time.time() - launch
    _log(f"model written to {model_dir}")
    return FinetuneResult(model_dir=model_dir, metrics=metrics, checkpoint=result.checkpoint,
                          num_rows=summary.num_rows, num_bad_rows=summary.num_bad, config=cfg,
                          history=printer.history, evals=printer.evals)
