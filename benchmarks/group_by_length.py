"""`group_by_length` on and off: steady query groups/s on data whose passages vary in length.

MedQuAD's 13.5K training question/answer pairs (answers from a line to a page; in-batch negatives
only, train_group_size 1), all-MiniLM-L6-v2, 2 workers, batch 32 per worker, queries 64 / passages
256 tokens, ZeRO-2, `attention_dropout: 0`. Steady state = log windows after step `--warm`.
Also reports, from the same rows, the share of real tokens in the padded passage tensors with
random batches and with length-grouped ones (what the lever can save at most).

    python benchmarks/group_by_length.py [--steps 16] [--warm 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHARED = os.environ.get("BGE_RAY_BENCH_SHARED", os.path.join(os.path.dirname(REPO), "shared"))  # data/ and peers/ (benchmarks/README.md, "Data")
DATA = os.path.join(SHARED, "data", "medquad", "train_triplets.jsonl")
BATCH = 32


def padding_efficiency(sample: int = 4096) -> dict[str, float]:
    """Real passage tokens / padded passage tokens for random and length-grouped batches of BATCH rows."""
    import numpy as np

    from bge_ray.data.collate import LENGTH_POOL_BATCHES
    from bge_ray.model.tokenizer import load_tokenizer
    from tests.helpers import minilm_path

    tok = load_tokenizer(minilm_path())
    with open(DATA, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    random.Random(0).shuffle(rows)
    lengths = np.array([len(x) for x in tok([r["pos"][0] for r in rows[:sample]], truncation=True,
                                            max_length=256)["input_ids"]])

    def efficiency(batches: list[np.ndarray]) -> float:
        return float(sum(lengths[b].sum() for b in batches) / sum(len(b) * lengths[b].max() for b in batches))

    order = np.arange(len(lengths))
    plain = [order[i:i + BATCH] for i in range(0, len(order) - BATCH + 1, BATCH)]
    pool = BATCH * LENGTH_POOL_BATCHES
    grouped = []
    for k in range(0, len(order), pool):
        part = order[k:k + pool][np.argsort(lengths[order[k:k + pool]], kind="stable")]
        grouped += [part[i:i + BATCH] for i in range(0, len(part) - BATCH + 1, BATCH)]
    return {"random": efficiency(plain), "grouped": efficiency(grouped)}


def run(group: bool, steps: int, warm: int, work: str) -> dict:
    import bge_ray
    from bge_ray.config import load_config

    tag = "grouped" if group else "plain"
    cfg = load_config(None, [
        "--model_name_or_path", "sentence-transformers/all-MiniLM-L6-v2", "--train_data", DATA,
        "--query_max_len", "64", "--passage_max_len", "256", "--train_group_size", "1",
        "--per_device_train_batch_size", str(BATCH), "--learning_rate", "2e-5", "--temperature", "0.02",
        "--sentence_pooling_method", "mean", "--max_steps", str(steps), "--logging_steps", "2",
        "--save_steps", "100000", "--num_workers", "2", "--deepspeed", "zero2", "--attention_dropout", "0",
        "--group_by_length", "true" if group else "false",
        "--output_dir", os.path.join(work, tag), "--storage_path", os.path.join(work, "storage"),
        "--run_name", f"gbl-{tag}-{int(time.time())}",
    ])
    result = bge_ray.finetune(cfg)
    steady = [m for m in result.history if m["step"] > warm]
    secs = sum(m["window_s"] for m in steady)
    return {"group_by_length": group, "steps": result.metrics["step"],
            "steady_groups_per_s": sum(m["window_groups"] for m in steady) / secs,
            "steady_tokens_per_s": sum(m["window_tokens"] for m in steady) / secs,
            "train_loss_mean": result.metrics["train_loss"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--work", default=os.path.join(os.path.dirname(REPO), "bench-work", "group_by_length"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, REPO)
    summary = {"machine": f"{platform.node()} {os.cpu_count()} cpus", "date": time.strftime("%Y-%m-%d"),
               "batch_per_worker": BATCH, "padding_efficiency": padding_efficiency(),
               "runs": [run(g, args.steps, args.warm, os.path.abspath(args.work)) for g in (False, True)]}
    plain, grouped = summary["runs"]
    summary["speedup"] = grouped["steady_groups_per_s"] / plain["steady_groups_per_s"]
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "group_by_length_medquad.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
