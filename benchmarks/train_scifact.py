"""Training benchmark: all-MiniLM-L6-v2 on SciFact train claims with mined hard negatives.

The same job as the FlagEmbedding peer run in ../shared/peers (batch 8 per worker, group 8,
queries 64 / passages 256 tokens, lr 2e-5, temperature 0.02, mean pooling, 1 epoch, 2 workers).
Reports time from launch to the first optimizer step, steady-state query groups/s and tokens/s
(log windows after the first STEADY_AFTER steps), peak RSS per worker, the training loss, and,
with --eval, nDCG@10 / Recall@100 on the 300 SciFact test claims through the peers' own
evaluation script, so the figures are comparable with theirs.

    python benchmarks/train_scifact.py [--epochs 1] [--deepspeed zero2] [--eval] [--tag NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("BGE_RAY_BENCH_SHARED", os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared"))
DATA = os.path.join(SHARED, "data", "scifact", "train_minilm_hardnegs.jsonl")
STEADY_AFTER = 10


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--deepspeed", default="zero2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eval", action="store_true", help="evaluate on the SciFact test split (peers' script)")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--work", default=os.path.join(HERE, "..", "..", "bench-work"))
    args, extra = ap.parse_known_args()
    tag = args.tag or f"bge_ray_np{args.workers}_e{args.epochs:g}_{args.deepspeed}"
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import bge_ray
    from bge_ray.config import load_config

    cfg = load_config(None, [
        "--model_name_or_path", "sentence-transformers/all-MiniLM-L6-v2", "--train_data", DATA,
        "--query_max_len", "64", "--passage_max_len", "256", "--train_group_size", "8",
        "--per_device_train_batch_size", "8", "--learning_rate", "2e-5", "--warmup_ratio", "0.1",
        "--num_train_epochs", str(args.epochs), "--temperature", "0.02", "--sentence_pooling_method", "mean",
        "--normalize_embeddings", "true", "--logging_steps", "5", "--save_steps", "100000",
        "--num_workers", str(args.workers), "--deepspeed", args.deepspeed,
        "--output_dir", os.path.join(work, tag), "--storage_path", os.path.join(work, "storage"),
        "--run_name", f"{tag}-{int(time.time())}", *extra,
    ])
    import psutil

    before_call = time.time() - psutil.Process().create_time()  # interpreter start, imports, config
    result = bge_ray.finetune(cfg)
    steady = [m for m in result.history if m["step"] > STEADY_AFTER]
    secs = sum(m["window_s"] for m in steady)
    summary = {
        "tag": tag, "machine": f"{platform.node()} {os.cpu_count()} cpus", "config": cfg.to_dict(),
        "steps": result.metrics["step"], "wall_s": result.metrics["wall_s"],
        # from the process's start, like the peer's (its interpreter start and imports included)
        "launch_to_first_step_s": before_call + result.metrics["launch_to_first_step_s"],
        "launch_to_workers_s": before_call + result.metrics["launch_to_workers_s"],
        "worker_start_to_engine_s": result.metrics.get("time_to_engine_s"),
        "worker_start_to_first_batch_s": result.metrics.get("time_to_first_batch_s"),
        "worker_start_to_first_step_s": result.metrics.get("time_to_first_step_s"),
        "steady_groups_per_s": sum(m["window_groups"] for m in steady) / secs if secs else None,
        "steady_tokens_per_s": sum(m["window_tokens"] for m in steady) / secs if secs else None,
        "steady_data_wait_frac": (sum(m["data_wait_frac"] * m["window_s"] for m in steady) / secs) if secs else None,
        "peak_rss_gib_per_worker": result.metrics["peak_rss_gib_per_worker"],
        "train_loss_mean": result.metrics["train_loss"], "train_loss_last_log": result.metrics["loss"],
        "model_dir": result.model_dir,
        "history": result.history,
    }
    if args.eval:
        out = os.path.join(work, f"{tag}.eval.json")
        subprocess.run([sys.executable, os.path.join(SHARED, "peers", "eval_scifact.py"), "--model", result.model_dir,
                        "--pooling", "mean", "--out", out], check=True,
                       env=dict(os.environ, SCIFACT_DIR=os.path.join(SHARED, "data", "scifact")))
        with open(out) as f:
            summary["eval"] = json.load(f)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", f"{tag}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
