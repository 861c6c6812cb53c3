"""What the launchers cost before any training code runs: the floor under "time to first step".

Times, from a fresh process's start, how long until the training function runs on every worker
(``--workers``, 2 by default; ``--gpu``: one GPU each, NCCL), with nothing in it (no model, no data):

* ``ray-train``: ``ray.init()`` of a local cluster, then an empty Ray Train ``TorchTrainer``
  (gloo, or NCCL with ``--gpu``), as ``bge-ray train`` starts one;
* ``ray-train-nodash``: the same without the Ray dashboard;
* ``ray-train-attached``: the same ``TorchTrainer`` on a Ray cluster that is already running
  (``ray start --head --block`` beforehand, not timed; stopped after), as a job submitted to a
  cluster starts;
* ``torchrun``: ``torch.distributed.run`` with as many processes, that import torch and join a
  process group, as FlagEmbedding starts.

Each variant runs ``--repeats`` times in its own process (a fresh local Ray each time)::

    python benchmarks/startup_floor.py --repeats 3 --out benchmarks/results/startup_floor.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

RAY_TRAIN = r"""
import sys, time
t0 = float(sys.argv[1])
workers, gpu = int(sys.argv[4]), sys.argv[5] == "1"
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
if sys.argv[2].startswith("attach"):
    ray.init(address=sys.argv[2].split("=", 1)[1])
else:
    # a GPU machine's every core, as bge-ray train takes it; 2 on the CPU machine the figures were first made on
    ray.init(num_cpus=None if gpu else max(2, workers), include_dashboard=sys.argv[2] == "1")
t_init = time.time() - t0

def loop(config):
    import time
    print(f"FLOOR_FN {time.time() - config['t0']}", flush=True)  # reported metrics without a checkpoint are not kept

trainer = TorchTrainer(loop, train_loop_config={"t0": t0}, scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu),
                       torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
                       run_config=RunConfig(storage_path=sys.argv[3]))
trainer.fit()
print("FLOOR_INIT", t_init, flush=True)
"""

ATTACH_PORT = 6391


def _wait_for_head(env: dict) -> None:
    """Until a driver can connect to the head on ATTACH_PORT (and its idle workers have settled)."""
    probe = f"import ray; ray.init(address='127.0.0.1:{ATTACH_PORT}')"
    for _ in range(60):
        if subprocess.run([sys.executable, "-c", probe], capture_output=True, env=env).returncode == 0:
            time.sleep(5)
            return
        time.sleep(2)
    raise RuntimeError("the head started by `ray start --head` did not come up in 2 min")


TORCHRUN = r"""
import os, time
import torch
import torch.distributed as dist
dist.init_process_group(os.environ["FLOOR_BACKEND"])
at = time.time() - float(os.environ["FLOOR_T0"])
print(f"FLOOR_FN {at}", flush=True)  # one write: the processes share the output
dist.destroy_process_group()
"""


def run_once(variant: str, work: str, workers: int = 2, gpu: bool = False) -> dict:
    env = dict(os.environ, FLOOR_BACKEND="nccl" if gpu else "gloo")
    env.pop("RAY_ADDRESS", None)
    holder = None
    if variant == "ray-train-attached":
        # a head held by `ray start --block` until it is terminated; its own temp dir, so that the
        # cluster it records there is not what the next variant's plain ray.init() finds
        token = os.path.join(work, "token")
        with open(token, "w") as f:
            f.write(secrets.token_hex(32))
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token)
        holder = subprocess.Popen(["ray", "start", "--head", "--block", "--num-cpus", "2", "--port", str(ATTACH_PORT),
                                   "--temp-dir", os.path.join(work, "ray"), "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        _wait_for_head(env)
        mode = f"attach=127.0.0.1:{ATTACH_PORT}"
    else:
        mode = {"ray-train": "1", "ray-train-nodash": "0", "torchrun": ""}[variant]
    t0 = time.time()
    if variant == "torchrun":
        script = os.path.join(work, "floor_torchrun.py")
        with open(script, "w") as f:
            f.write(TORCHRUN)
        env["FLOOR_T0"] = repr(t0)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(workers), "--master_port", "29541",
               script]
    else:
        cmd = [sys.executable, "-c", RAY_TRAIN, repr(t0), mode, os.path.join(work, "storage"), str(workers),
               "1" if gpu else "0"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    finally:
        if holder is not None:
            holder.terminate()  # --block stops the head's processes when it is terminated
            holder.wait(timeout=120)
    wall = time.time() - t0
    found: dict[str, list[float]] = {}
    for line in (proc.stdout + proc.stderr).splitlines():  # Ray prefixes a worker's lines with its name
        for key in ("FLOOR_FN", "FLOOR_INIT"):
            if key + " " in line:
                found.setdefault(key, []).append(float(line.split(key + " ")[1].split()[0]))
    if proc.returncode != 0 or "FLOOR_FN" not in found:
        raise RuntimeError(f"{variant} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    # the training function has run on every worker when the last one reached it
    return {"cluster_up_s": found.get("FLOOR_INIT", [None])[0], "train_fn_s": max(found["FLOOR_FN"]), "exit_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="torchrun,ray-train,ray-train-nodash,ray-train-attached")
    ap.add_argument("--out", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL (both launchers)")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="startup_floor_") as work:
        for i in range(args.repeats):  # interleaved, so that a slow patch of the machine hits every variant
            for variant in args.variants.split(","):
                r = run_once(variant, work, args.workers, args.gpu)
                runs.setdefault(variant, []).append(r)
                print(f"{variant:17s} run {i + 1}: training function on every worker {r['train_fn_s']:5.1f} s "
                      f"after launch" + (f" (ray.init returned at {r['cluster_up_s']:.1f} s)" if r["cluster_up_s"] else ""),
                      flush=True)
    summary = {"machine": f"{platform.node()} {os.cpu_count()} cpus", "date": time.strftime("%Y-%m-%d"),
               "workers": args.workers, "gpu": args.gpu, "runs": runs,
               "median_train_fn_s": {v: statistics.median(r["train_fn_s"] for r in rs) for v, rs in runs.items()}}
    print(json.dumps(summary["median_train_fn_s"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
