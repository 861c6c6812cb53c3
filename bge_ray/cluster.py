"""Where bge-ray runs: joining or starting Ray, and checking the cluster can hold a job."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
from ray._private.services import canonicalize_bootstrap_address
from ray._private.state import state as ray_state
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from bge_ray.console import log
from bge_ray.errors import ConfigError

HUGE_PAGE_MALLOC = "glibc.malloc.hugetlb=1"


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
    if address and address.startswith(("http://", "https://")):
        raise ConfigError(f"ray_address {address} is the job API (what `ray job submit --address` takes); a driver "
                          "joins the cluster at its GCS address (HEAD:6379) or its client address (ray://HEAD:10001)")
    if os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        # `export RAY_ADDRESS=http://...:8265` is how `ray job submit` finds the job API; ray.init would
        # try to join it as a cluster and fail, so this process looks for the cluster as if it were unset
        log(f"RAY_ADDRESS={os.environ['RAY_ADDRESS']} is the job API, not a cluster address: ignored here "
            "(set ray_address to join a cluster)")
        os.environ.pop("RAY_ADDRESS")
    address = address or os.environ.get("RAY_ADDRESS")
    to_console = os.environ.get("BGE_RAY_WORKER_LOGS", "").lower() == "console"
    env = {"env_vars": worker_env(os.environ)}
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # a `ray job submit` driver: the job's runtime env (working_dir, env_vars) already applies to
        # every worker, and Ray refuses a second one that touches the same fields (a CPU job gains
        # from putting worker_env's GLIBC_TUNABLES in its own env_vars)
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


def worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables of the Ray workers bge-ray starts (a local cluster, or one it joins).

    glibc's malloc gives each large tensor a fresh mapping and unmaps it when freed, so every CPU
    step faults its activations in again, 4 KiB a fault, in the kernel (benchmarks/README.md, "malloc
    and huge pages", measures it). ``glibc.malloc.hugetlb=1`` (glibc 2.35+; older glibc and
    other C libraries ignore it) marks those mappings for transparent huge pages, 2 MiB a fault.
    Where memory lands only: every number computed is the same. A user's own GLIBC_TUNABLES is kept,
    and one that names glibc.malloc.hugetlb wins (``glibc.malloc.hugetlb=0`` turns this off).
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        tunables = f"{tunables}:{HUGE_PAGE_MALLOC}" if tunables else HUGE_PAGE_MALLOC
    return {"TOKENIZERS_PARALLELISM": "false", "GLIBC_TUNABLES": tunables}


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


@dataclass(frozen=True)
class Capacity:
    """What the cluster holds now and the most it can grow to (``None``: no autoscaler told Ray its
    node types, so it never grows)."""

    now: dict[str, float]
    most: dict[str, float] | None

    @property
    def limit(self) -> dict[str, float]:
        """The resources a job can count on getting: the autoscaler's maximum, else what is there."""
        if self.most is None:
            return self.now
        return {k: max(self.most.get(k, 0), self.now.get(k, 0)) for k in {*self.most, *self.now}}

    def has_gpus(self) -> bool:
        return self.limit.get("GPU", 0) > 0


def capacity() -> Capacity:
    """The connected cluster's :class:`Capacity` (the autoscaler's maximum from the cluster config it
    publishes, as Ray Train's own resource check reads it)."""
    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    most = None
    if not started_here():
        try:
            found = ray_state.get_max_resources_from_cluster_config()
        except Exception:  # noqa: BLE001 - an older or foreign GCS: treat as a fixed cluster
            found = None
        most = {k: float(v) for k, v in found.items()} if found else None
    return Capacity(now, most)


def actor_count(requested: int | None, use_gpu: bool, streaming: bool = True) -> int:
    """Encoder actors for one stage. A ``streaming`` stage also runs read and write tasks, so on CPU
    one CPU stays free for them (actors holding every CPU stall the pipeline)."""
    res = ray.cluster_resources()
    if use_gpu:  # one actor per GPU the cluster can grow to: an autoscaler adds nodes for the actors asked for
        return requested or max(1, int(capacity().limit.get("GPU", 0)))
    cpus = int(res.get("CPU", 1))
    room = max(1, cpus - 1) if streaming else max(1, cpus)
    if requested and requested > room:
        log(f"concurrency {requested} leaves no CPU for this stage's read/write tasks on a {cpus}-CPU cluster; "
             f"using {room}")
    return min(requested, room) if requested else room


def need_for_training(num_workers: int, per_worker: dict[str, float], extra_cpus: float = 0.0) -> dict[str, float]:
    """Resources a run holds: its workers, ``extra_cpus`` (a Tune trial's function) and one whole CPU
    for its Ray Data tasks, which cannot use a fraction left over by the others."""
    cpus = num_workers * per_worker.get("CPU", 1) + extra_cpus
    other = {k: num_workers * v for k, v in per_worker.items() if k not in ("CPU", "GPU")}
    return {"CPU": math.ceil(cpus - 1e-9) + 1, "GPU": num_workers * per_worker.get("GPU", 0), **other}


def shortfall(need: dict[str, float], have: dict[str, float]) -> list[str]:
    return [f"{amount:g} {kind} ({have.get(kind, 0):g} there)" for kind, amount in need.items()
            if amount and have.get(kind, 0) < amount]


def connect_for(num_workers: int, per_worker: dict[str, float], address: str | None = None) -> None:
    """Connect for a training run: ``num_workers`` workers of ``per_worker`` resources plus one CPU for
    the Ray Data tasks that feed them. A local cluster started here is sized for that, even on a
    machine with fewer cores (CPU slots are logical).

    Raises:
        ConfigError: the cluster cannot hold the run and cannot grow to (a local Ray started earlier,
            a cluster without an autoscaler, or one whose node types are too few): Ray Train would
            wait forever. A cluster that can grow to it gets a warning and waits for the nodes.
    """
    need = need_for_training(num_workers, per_worker)
    already = ray.is_initialized()
    connect_ray(address, max(os.cpu_count() or 1, int(need["CPU"])))
    check_fits(need, f"{num_workers} workers x {per_worker} and 1 CPU for the data pipeline", already)


def check_fits(need: dict[str, float], what: str, already: bool = True) -> None:
    """Fail now when the connected cluster can never hold ``need``; warn when it must grow first.

    Raises:
        ConfigError: the shortfall, named, and how to resolve it.
    """
    cap = capacity()
    short_now = shortfall(need, cap.now)
    if not short_now:
        return
    short = shortfall(need, cap.limit)
    if short and already and started_here():
        raise ConfigError(f"this process already runs a local Ray that is too small: {what} need {', '.join(short)}. "
                          f"Start it big enough first (ray.init(num_cpus={int(need['CPU'])})), or lower num_workers / "
                          "resources_per_worker")
    if short:
        grows = "its autoscaler can add no more" if cap.most is not None else "it has no autoscaler to add nodes"
        raise ConfigError(f"the Ray cluster cannot hold this run: {what} need {', '.join(short)}, and {grows}. "
                          "Lower num_workers / resources_per_worker, or join a bigger cluster")
    log(f"the Ray cluster has too few resources now: {what} need {', '.join(short_now)}; waiting for its "
        "autoscaler to add nodes")


def side_actor() -> dict[str, Any]:
    """Options of the run's own actors (the metrics queue, the batch router): no CPU, on the driver's
    node (the head, on a cluster: losing a worker node does not take them along), outside any
    enclosing placement group (a Tune trial's)."""
    # hard affinity: the driver's node lives as long as the run, and a soft one lets a busy raylet
    # place the actor elsewhere (seen: the metrics queue on a worker node, lost with it)
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return {"num_cpus": 0, "scheduling_strategy": here}
