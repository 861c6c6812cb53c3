"""Sweep benchmark: 8 trials of temperature x learning rate x pooling on the quickstart job.

all-MiniLM-L6-v2 on the bundled 200 SciFact claims (7 mined negatives each), 2 workers per trial,
short schedules (max_steps 15, a validation every 5 steps on the 60 held-out claims / 1,000
abstracts), ASHA (grace 1, factor 2), random search, seed 42. Reports the wall time, the trials
ASHA stopped, the best and worst nDCG@10, and the best config; copies the trial table and plot.

    python benchmarks/sweep_scifact.py [--num_samples 8] [--max_steps 15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num_samples", type=int, default=8)
    ap.add_argument("--max_steps", type=int, default=15)
    ap.add_argument("--eval_steps", type=int, default=5)
    ap.add_argument("--work", default=os.path.join(REPO, "..", "bench-work"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = os.path.abspath(args.work)
    name = f"sweep-scifact-{int(time.time())}"
    import bge_ray

    t0 = time.time()
    result = bge_ray.tune(os.path.join(REPO, "jobs", "configs", "sweep.yaml"), [
        "--num_samples", str(args.num_samples), "--max_steps", str(args.max_steps),
        "--eval_steps", str(args.eval_steps), "--output_dir", os.path.join(work, name),
        "--storage_path", os.path.join(work, "storage"), "--run_name", name])
    wall = time.time() - t0
    scored = [t for t in result.trials if t["best_metric"] is not None]
    summary = {
        "machine": f"{platform.node()} {os.cpu_count()} cpus", "date": time.strftime("%Y-%m-%d"),
        "num_trials": len(result.trials), "stopped_early": result.num_stopped_early, "wall_s": round(wall, 1),
        "metric": result.metric, "best": result.best_metric, "worst": min(t["best_metric"] for t in scored),
        "zero_shot": scored[0].get("zero_shot"), "best_params": result.best_params,
        "trials": [{k: t[k] for k in ("trial_id", "params", "best_metric", "best_step", "last_step", "status")}
                   for t in result.trials],
    }
    out = os.path.join(HERE, "results", "sweep_scifact")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    for name_ in ("trials.md", "trials.csv", "sweep.png", "best_config.yaml"):
        shutil.copy(os.path.join(result.results_dir, name_), os.path.join(out, name_))
    print(json.dumps({k: v for k, v in summary.items() if k != "trials"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
