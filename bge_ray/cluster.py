"""Where bge-ray runs: joining or starting Ray, and checking the cluster can hold a job."""

from __future__ import annotations

import math
import os
from typing import Any

import ray
from ray._private.services import canonicalize_bootstrap_address
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from bge_ray.console import log
from bge_ray.errors import ConfigError


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join a Ray cluster, or start a local one.

    In order: the Ray this process already initialised; ``address``; ``RAY_ADDRESS``; the cluster
    ``ray start`` recorded on this machine (a head node); else a local Ray with ``num_cpus`` logical
    CPUs. Inside a ``ray job submit`` driver the job's own runtime environment applies. The
    workers' own output (Ray, DeepSpeed, transformers) goes to Ray's log files, not this console,
    unless ``BGE_RAY_WORKER_LOGS=console``: bge-ray's own lines reach the console through its reports.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    to_console = os.environ.get("BGE_RAY_WORKER_LOGS", "").lower() == "console"
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # a `ray job submit` driver: the job's runtime env (working_dir, env_vars) already applies to
        # every worker, and Ray refuses a second one that touches the same fields
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        ray.init(address=address or "auto", log_to_driver=to_console)
    elif address:
        ray.init(address=address, runtime_env=env, log_to_driver=to_console)
    elif canonicalize_bootstrap_address(None) is not None:
        # `ray start` recorded a cluster on this machine: with no address Ray joins it, and refuses a
        # CPU count for a cluster it joins. A stale record fails in ray.init with Ray's own advice.
        ray.init(runtime_env=env, log_to_driver=to_console)
    else:
        # Ray runs workers at nice 15 by default, below the cluster's own services, which then take
        # CPU from the training workers (benchmarks/README.md, first section)
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=num_cpus, runtime_env=env, log_to_driver=to_console)
    if not to_console:
        log(f"the workers' own output (Ray, DeepSpeed, transformers) is in Ray's logs: {_logs_dir()} on each node "
            "(BGE_RAY_WORKER_LOGS=console shows it here)")


def _logs_dir() -> str:
    node = getattr(ray._private.worker, "_global_node", None)
    try:
        return node.get_logs_dir_path() if node is not None else "/tmp/ray/session_latest/logs"
    except AttributeError:
        return "/tmp/ray/session_latest/logs"


def started_here() -> bool:
    """Whether this process started the Ray it is connected to (a local cluster, which never grows)."""
    node = getattr(ray._private.worker, "_global_node", None)
    return bool(node is not None and node.head)


def connect_for(num_workers: int, per_worker: dict[str, float], address: str | None = None) -> None:
    """Connect for a training run: ``num_workers`` workers of ``per_worker`` resources plus one CPU for
    the Ray Data tasks that feed them. A local cluster started here is sized for that, even on a
    machine with fewer cores (CPU slots are logical).

    Raises:
        ConfigError: a local Ray this process started earlier (``ray.init()``, or ``bge_ray.mine()``
            before a fine-tune) is too small: Ray Train would wait forever for workers it cannot place.
            A joined cluster that is too small may be waiting for its autoscaler; that gets a warning.
    """
    need_cpus = int(math.ceil(num_workers * per_worker.get("CPU", 1))) + 1
    need_gpus = num_workers * per_worker.get("GPU", 0)
    already = ray.is_initialized()
    connect_ray(address, max(os.cpu_count() or 1, need_cpus))
    have = ray.cluster_resources()
    short = [f"{need:g} {kind} ({have.get(kind, 0):g} there)" for kind, need in (("CPU", need_cpus), ("GPU", need_gpus))
             if need and have.get(kind, 0) < need]
    if not short:
        return
    what = f"{num_workers} workers x {per_worker} and 1 CPU for the data pipeline need " + " and ".join(short)
    if already and started_here():
        raise ConfigError(f"this process already runs a local Ray that is too small: {what}. Start it big enough "
                          f"first (ray.init(num_cpus={need_cpus})), or lower num_workers / resources_per_worker")
    log(f"warning: the Ray cluster has too few resources now: {what}; the run waits until nodes join "
        "(an autoscaling cluster adds them; a fixed one never will)")


def side_actor() -> dict[str, Any]:
    """Options of the run's own actors (the metrics queue, the batch router): no CPU, on the driver's
    node (the head, on a cluster: losing a worker node does not take them along), outside any
    enclosing placement group (a Tune trial's)."""
    # hard affinity: the driver's node lives as long as the run, and a soft one lets a busy raylet
    # place the actor elsewhere (seen: the metrics queue on a worker node, lost with it)
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return {"num_cpus": 0, "scheduling_strategy": here}
