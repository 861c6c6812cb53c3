"""GradCache (`sub_batch_size`): peak memory and step time against the whole batch at once.

One process, one DeepSpeed engine (ZeRO-0, fp32, CPU), all-MiniLM-L6-v2, SciFact training claims
with mined negatives, a batch of `--batch` queries x group 8 (queries 64, passages 256 tokens).
Each setting runs in its own subprocess so that its peak RSS is its own:

    python benchmarks/grad_cache_memory.py [--batch 32] [--steps 3] [--sub 0,32,8]

Reports, per `sub_batch_size` (0 = off): peak RSS, seconds per optimizer step (mean of the steps
after the first), the loss of the first step (the same for every setting: the gradient is exact).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHARED = os.environ.get("BGE_RAY_BENCH_SHARED", os.path.join(os.path.dirname(REPO), "shared"))  # data/ and peers/ (benchmarks/README.md, "Data")
DATA = os.path.join(SHARED, "data", "scifact", "train_minilm_hardnegs.jsonl")


def one_setting(batch: int, steps: int, sub: int) -> dict:
    import deepspeed
    import numpy as np
    import torch
    import torch.distributed as dist

    from bge_ray.config import FinetuneConfig
    from bge_ray.config.deepspeed import build_deepspeed_config, engine_config
    from bge_ray.data.collate import GroupCollator
    from bge_ray.data.triplets import sample_row
    from bge_ray.model.embedder import Embedder
    from bge_ray.model.grad_cache import micro_steps, train_micro_batch
    from bge_ray.model.loss import contrastive_loss
    from bge_ray.model.optim import build_optimizer
    from bge_ray.model.tokenizer import load_tokenizer
    from tests.helpers import minilm_path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29600 + sub % 100), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    group = 8
    path = minilm_path()
    cfg = FinetuneConfig(model_name_or_path=path, train_data=[DATA], output_dir="/tmp/unused",
                         per_device_train_batch_size=batch, train_group_size=group, query_max_len=64,
                         passage_max_len=256, sentence_pooling_method="mean", temperature=0.02,
                         learning_rate=2e-5, attention_dropout=0.0, sub_batch_size=sub or None)
    tok = load_tokenizer(path)
    with open(DATA, encoding="utf-8") as f:
        rows = [sample_row(dict(json.loads(next(f)), row_key=k), group, seed=0, epoch=0) for k in range(batch * steps)]
    collate = GroupCollator(group_size=group, pad_token_id=tok.pad_token_id)
    model = Embedder.from_pretrained(path, pooling="mean", attention_dropout=0.0)
    ds = engine_config(build_deepspeed_config(cfg, world_size=1, total_steps=steps), model.model.config.hidden_size,
                       sum(p.numel() for p in model.parameters()), micro_steps(batch, group, cfg.sub_batch_size))
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), config=ds,
                                      dist_init_required=False)
    times, losses = [], []
    for s in range(steps):
        part = rows[s * batch:(s + 1) * batch]
        raw = {
            "row_key": np.arange(s * batch, (s + 1) * batch),
            "q_ids": [tok(r["query"], truncation=True, max_length=64)["input_ids"] for r in part],
            "pos_ids": [tok(r["pos"], truncation=True, max_length=256)["input_ids"] for r in part],
            "neg_ids": [tok(r["neg"], truncation=True, max_length=256)["input_ids"] for r in part],
        }
        inputs = {k: torch.as_tensor(v) for k, v in collate(raw).items()}
        t0 = time.perf_counter()
        loss = train_micro_batch(engine, inputs, lambda q, p: contrastive_loss(q, p, 0.02), cfg.sub_batch_size)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {"sub_batch_size": sub, "batch": batch, "group": group, "peak_rss_gib": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 2**20, "s_per_step": sum(times[1:]) / max(1, len(times) - 1),
        "first_step_s": times[0], "loss_step1": losses[0], "losses": losses, "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sub", default="0,32,8", help="sub_batch_size values, 0 = off")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(one_setting(args.batch, args.steps, args.one)), flush=True)
        return 0
    results = []
    for sub in (int(x) for x in args.sub.split(",")):
        out = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--steps", str(args.steps),
                              "--one", str(sub)], check=True, capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1"))
        line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT "):]))
        r = results[-1]
        print(f"sub_batch_size {sub or 'off':>4}: peak RSS {r['peak_rss_gib']:.2f} GiB, {r['s_per_step']:.1f} s/step, "
              f"loss {r['loss_step1']:.5f}", flush=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", f"grad_cache_memory_b{args.batch}.json"), "w") as f:
        json.dump({"machine": f"{platform.node()} {os.cpu_count()} cpus", "date": time.strftime("%Y-%m-%d"),
                   "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
