"""Hard negatives and distillation benchmark on SciFact with all-MiniLM-L6-v2 (CPU, 2 workers).

The first 200 SciFact training claims (pairs: claim + cited abstracts), then three fine-tunes of
the same length (1 epoch, batch 4 per worker, lr 2e-5, temperature 0.02, mean pooling):

  in-batch   train_group_size 1: only the other claims' positives as negatives
  mined      `bge-ray mine` with the base model over the whole corpus (5,183 abstracts), ranks 3-100,
             7 negatives per claim; train_group_size 4
  mined+kd   the same rows scored by a bi-encoder teacher (`bge-ray score`; here the base model
             itself, the only model on this machine), knowledge_distillation with kl_div

Each is validated on the 60 held-out quickstart claims (1,000 abstracts) at the end, and with
--full on the 300 SciFact test claims over the full corpus. Mining throughput (pool passages/s,
queries/s) is reported from the mining run.

    python benchmarks/negatives_scifact.py [--full] [--variants mined+kd --mined DIR]

``--variants`` runs some of the fine-tunes (merged into the results file); ``--mined`` reuses an
earlier run's mined rows instead of mining again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHARED = os.environ.get("BGE_RAY_BENCH_SHARED", os.path.join(os.path.dirname(REPO), "shared"))  # data/ and peers/ (benchmarks/README.md, "Data")
SCIFACT = os.path.join(SHARED, "data", "scifact")
ROWS = 200


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="also evaluate on the full SciFact test split")
    ap.add_argument("--work", default=os.path.join(REPO, "..", "bench-work", "negatives"))
    ap.add_argument("--variants", nargs="+", default=["in-batch", "mined", "mined+kd"])
    ap.add_argument("--mined", help="an earlier run's mined rows (skips mining)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    import ray

    import bge_ray

    # one local cluster for mining and training: 2 training workers + their data tasks need 3 CPU slots
    ray.init(num_cpus=max(3, os.cpu_count() or 1))
    pairs = os.path.join(work, "pairs.jsonl")
    with open(os.path.join(SCIFACT, "train_triplets.jsonl"), encoding="utf-8") as f, \
            open(pairs, "w", encoding="utf-8") as out:
        for _, line in zip(range(ROWS), f, strict=False):
            row = json.loads(line)
            out.write(json.dumps({"query": row["query"], "pos": row["pos"]}) + "\n")
    stamp = int(time.time())
    mined_dir, scored_dir = os.path.join(work, f"mined-{stamp}"), os.path.join(work, f"scored-{stamp}")
    minilm = "sentence-transformers/all-MiniLM-L6-v2"
    mined = None
    if args.mined:
        mined_dir = os.path.abspath(args.mined)
    else:
        mined = bge_ray.mine(input_file=[pairs], output_dir=mined_dir,
                             candidate_pool=[os.path.join(SCIFACT, "corpus.jsonl")], embedder_name_or_path=minilm,
                             range_for_sampling="3-100", negative_number=7, embedder_query_max_length=64,
                             embedder_passage_max_length=256, concurrency=2)
    # the teacher's similarities as logits at the training temperature (bge-ray score's default, 0.02)
    scored = bge_ray.score(input_file=[mined_dir], output_dir=scored_dir, embedder_name_or_path=minilm,
                           embedder_query_max_length=64, embedder_passage_max_length=256, concurrency=2,
                           teacher_temperature=0.02)
    eval_dir = os.path.join(REPO, "bge_ray", "quickstart", "scifact_eval")
    common = {"model_name_or_path": minilm, "query_max_len": 64, "passage_max_len": 256, "num_train_epochs": 1,
              "per_device_train_batch_size": 4, "learning_rate": 2e-5, "warmup_ratio": 0.1, "temperature": 0.02,
              "sentence_pooling_method": "mean", "logging_steps": 5, "deepspeed": "zero2", "num_workers": 2,
              "eval_data": eval_dir, "eval_steps": 100000, "final_model": "last",
              "storage_path": os.path.join(work, "storage")}
    variants = {
        "in-batch": {"train_data": [pairs], "train_group_size": 1},
        "mined": {"train_data": [mined_dir], "train_group_size": 4},
        "mined+kd": {"train_data": [scored_dir], "train_group_size": 4, "knowledge_distillation": True,
                     "kd_loss_type": "kl_div"},
    }
    results_path = os.path.join(HERE, "results", "negatives_scifact.json")
    earlier = {}
    if os.path.exists(results_path):
        with open(results_path, encoding="utf-8") as f:
            earlier = json.load(f)
    runs = {}
    for name, extra in variants.items():
        if name not in args.variants:
            continue
        out = os.path.join(work, "models", f"{name}-{stamp}")  # never the mined-<stamp> data dir
        res = bge_ray.finetune({**common, **extra, "output_dir": out, "run_name": f"{name}-{stamp}"})
        runs[name] = {"model_dir": res.model_dir, "heldout_ndcg@10": res.metrics.get("eval_ndcg@10"),
                      "heldout_zero_shot_ndcg@10": res.metrics.get("zero_shot_ndcg@10"),
                      "train_loss": res.metrics.get("train_loss"), "wall_s": round(res.metrics["wall_s"], 1),
                      "steps": res.metrics.get("step")}
    if args.full:
        rows = bge_ray.evaluate([r["model_dir"] for r in runs.values()], SCIFACT, ks=(10, 100))
        for run, row in zip(runs.values(), rows, strict=True):
            run["scifact_test_ndcg@10"], run["scifact_test_recall@100"] = row["ndcg@10"], row["recall@100"]
    summary = dict(earlier, machine=f"{platform.node()} {os.cpu_count()} cpus", date=time.strftime("%Y-%m-%d"),
                   rows=ROWS, scoring={"rows": scored.num_rows, "wall_s": round(scored.wall_s, 1)},
                   runs=dict(earlier.get("runs", {}), **runs))
    if mined is not None:
        summary["mining"] = {
            "rows": mined.num_rows, "pool": mined.pool_size, "pool_embed_s": round(mined.pool_embed_s, 1),
            "pool_passages_per_s": round(mined.pool_size / mined.pool_embed_s, 1),
            "search_s": round(mined.search_s, 1), "queries_per_s": round(mined.queries_per_s, 2),
            "removed_positives": mined.removed_positives, "short_rows": mined.short_rows,
            "wall_s": round(mined.wall_s, 1)}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(results_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
