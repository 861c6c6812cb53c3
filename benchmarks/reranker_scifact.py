"""Reranker fine-tuning on SciFact: does a cross-encoder trained with ``bge-ray train-reranker`` improve
what the bundled embedder retrieves? (all-MiniLM-L6-v2 as the reranker's encoder, CPU, 2 workers.)

One run of FlagEmbedding's encoder-only reranker job shape (its example's learning rate 6e-5, warm-up
0.1, group 8) on the SciFact training claims with 15 mined hard negatives, 1 epoch, ZeRO-2, attention
dropout off (for speed, as the other SciFact runs here), pairs of 64 + 192 tokens. It is validated on
the bundled SciFact sample (the quickstart's 60 held-out test claims, 1,000 abstracts) by reranking
all-MiniLM-L6-v2's top 100 (``eval_retriever``): step 0 is the zero-shot reranker (MiniLM with an
untrained classification head), the last validation the fine-tuned one, and the retriever alone is
measured beside them. Then ``bge_ray.evaluate`` reranks the same top 100 with the exported model as
FlagEmbedding's ``FlagReranker`` scores pairs at its default 512 tokens (``bge-ray eval`` cuts a
bge-ray export's pairs as trained unless a length is given). Writes ``benchmarks/results/reranker_scifact.json``.

    python benchmarks/reranker_scifact.py [--max_steps N] [--epochs E] [--lr LR] [--no_eval_512] [--name N]
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
SHARED = os.environ.get("BGE_RAY_BENCH_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
DATA = os.path.join(SHARED, "data", "scifact", "train_minilm_hardnegs.jsonl")
SAMPLE = os.path.join(REPO, "bge_ray", "quickstart", "scifact_eval")
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
KEEP = ("ndcg@10", "recall@10", "mrr@10", "ndcg@100", "recall@100")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max_steps", type=int, default=-1, help="fewer optimizer steps than the epoch's")
    ap.add_argument("--epochs", default="1", help="num_train_epochs")
    ap.add_argument("--lr", default="6e-5", help="learning_rate (FlagEmbedding's reranker example: 6e-5)")
    ap.add_argument("--no_eval_512", action="store_true", help="skip the FlagReranker-rule evaluation at 512 tokens")
    ap.add_argument("--name", default="reranker_scifact", help="results/<name>.json")
    ap.add_argument("--work", default=os.path.join(REPO, "..", "bench-work"))
    args = ap.parse_args()
    work = os.path.abspath(args.work)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import bge_ray
    from bge_ray.config import RerankerConfig, load_config

    cfg = load_config(None, [
        "--model_name_or_path", MODEL, "--train_data", DATA, "--query_max_len", "64", "--passage_max_len", "192",
        "--train_group_size", "8", "--per_device_train_batch_size", "4", "--learning_rate", args.lr,
        "--warmup_ratio", "0.1", "--weight_decay", "0.01", "--num_train_epochs", args.epochs, "--attention_dropout", "0",
        "--logging_steps", "10", "--num_workers", "2", "--deepspeed", "zero2", "--max_steps", str(args.max_steps),
        "--eval_data", SAMPLE, "--eval_retriever", MODEL, "--eval_rerank_top_k", "100", "--eval_steps", "100000",
        "--eval_batch_size", "32", "--output_dir", os.path.join(work, "reranker"), "--overwrite_output_dir",
        "--storage_path", os.path.join(work, "storage"), "--run_name", f"reranker-{int(time.time())}",
    ], RerankerConfig)
    result = bge_ray.finetune(cfg)
    m, evals = result.metrics, result.evals
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
           "job": " ".join(f"{k}={v}" for k, v in sorted(cfg.to_dict().items()) if k in (
               "train_group_size", "per_device_train_batch_size", "learning_rate", "query_max_len",
               "passage_max_len", "max_steps", "num_train_epochs")),
           "steps": m["step"], "wall_s": m["wall_s"], "train_loss_mean": m["train_loss"],
           "validation (pairs 64+192, the training cut)": {
               "retriever alone": {k: m[f"retriever_{k}"] for k in KEEP},
               "zero-shot reranker (step 0)": {k: evals[0][f"eval_{k}"] for k in KEEP},
               f"fine-tuned reranker (step {evals[-1]['step']})": {k: evals[-1][f"eval_{k}"] for k in KEEP}}}
    if not args.no_eval_512:
        rows = bge_ray.evaluate([MODEL], SAMPLE, ks=(10, 100), pooling="mean", reranker=result.model_dir,
                                rerank_top_k=100, reranker_options={"max_length": 512})
        out["bge-ray eval --reranker (FlagReranker's pairs, 512 tokens)"] = {
            r["mode"]: {k: r[k] for k in KEEP} for r in rows}
    path = os.path.join(HERE, "results", f"{args.name}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
