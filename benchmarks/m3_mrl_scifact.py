"""BGE-M3 unified fine-tuning and Matryoshka on SciFact (all-MiniLM-L6-v2, CPU, 2 workers).

Three fine-tunes of the same job (train_scifact.py's: the 809 training claims with 15 mined hard
negatives, batch 8 per worker, group 8, q64/p256, lr 2e-5, 10% warm-up, temperature 0.02, mean
pooling, 1 epoch, ZeRO-2; attention dropout off in all three, for speed), back to back:

* ``m3``: ``unified_finetuning`` with self-distillation from the first step (FlagEmbedding's m3
  example); scored on SciFact test in the four modes (dense, sparse, ColBERT, hybrid);
* ``mrl``: ``use_mrl`` with ``mrl_dims`` 384 256 128 64 32;
* ``plain``: neither;

each scored on SciFact test as soon as it is trained (``mrl`` and ``plain`` at 384, 256, 128, 64 and
32 dimensions; ``--zero_shot`` adds the untrained model's curve). Writes
``benchmarks/results/m3_mrl_scifact.json``.

    python benchmarks/m3_mrl_scifact.py [--runs m3 mrl plain] [--zero_shot] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("BGE_RAY_BENCH_SHARED", os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared"))
DATA = os.path.join(SHARED, "data", "scifact", "train_minilm_hardnegs.jsonl")
SCIFACT = os.path.join(SHARED, "data", "scifact")
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DIMS = (256, 128, 64, 32)
RUNS = {
    "m3": ["--unified_finetuning", "true", "--use_self_distill", "true", "--self_distill_start_step", "0"],
    "mrl": ["--use_mrl", "true", "--mrl_dims", "384", "256", "128", "64", "32"],
    "plain": [],
}


def train(name: str, work: str, max_steps: int) -> dict:
    import bge_ray
    from bge_ray.config import load_config

    cfg = load_config(None, [
        "--model_name_or_path", MODEL, "--train_data", DATA, "--query_max_len", "64", "--passage_max_len", "256",
        "--train_group_size", "8", "--per_device_train_batch_size", "8", "--learning_rate", "2e-5",
        "--warmup_ratio", "0.1", "--num_train_epochs", "1", "--temperature", "0.02",
        "--sentence_pooling_method", "mean", "--normalize_embeddings", "true", "--attention_dropout", "0",
        "--logging_steps", "10", "--save_steps", "100000", "--num_workers", "2", "--deepspeed", "zero2",
        "--output_dir", os.path.join(work, name), "--overwrite_output_dir", "--storage_path",
        os.path.join(work, "storage"), "--run_name", f"{name}-{int(time.time())}", "--max_steps", str(max_steps),
        *RUNS[name],
    ])
    result = bge_ray.finetune(cfg)
    return {"model_dir": result.model_dir, "wall_s": result.metrics["wall_s"], "steps": result.metrics["step"],
            "train_loss_mean": result.metrics["train_loss"], "train_loss_last_log": result.metrics["loss"]}


def scores(rows: list[dict]) -> list[dict]:
    keep = ("model", "mode", "dim", "ndcg@10", "recall@100", "mrr@10", "eval_s")
    return [{k: r[k] for k in keep} for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS), help="none: only --zero_shot")
    ap.add_argument("--zero_shot", action="store_true", help="also the zero-shot model's truncated curve")
    ap.add_argument("--max_steps", type=int, default=-1, help="fewer optimizer steps than the epoch's 50")
    ap.add_argument("--work", default=os.path.join(HERE, "..", "..", "bench-work"))
    args = ap.parse_args()
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bge_ray.retrieval.evaluate import evaluate

    path = os.path.join(HERE, "results", "m3_mrl_scifact.json")
    out: dict = {"machine": f"{platform.node()} {os.cpu_count()} cpus",
                 "job": "train_scifact.py's, attention_dropout 0, 1 epoch (max_steps: see each run)", "runs": {}}
    if os.path.exists(path):  # runs made before (another --runs) are kept
        with open(path) as f:
            out["runs"] = json.load(f).get("runs", {})
    for name in args.runs:  # each run is scored as soon as it is trained, and the file rewritten
        run = out["runs"][name] = {"date": time.strftime("%Y-%m-%d"), "max_steps": args.max_steps,
                                   **train(name, work, args.max_steps)}
        if name == "m3":
            run["eval"] = scores(evaluate([run["model_dir"]], SCIFACT, ks=(10, 100)))
        else:
            run["eval"] = scores(evaluate([run["model_dir"]], SCIFACT, ks=(10, 100), truncate_dims=DIMS))
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
    if args.zero_shot:
        out["zero_shot"] = scores(evaluate([MODEL], SCIFACT, ks=(10, 100), truncate_dims=DIMS, pooling="mean"))
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
    print(json.dumps({n: r["eval"] for n, r in out["runs"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
