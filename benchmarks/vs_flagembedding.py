"""bge-ray against FlagEmbedding on the same machine, back to back, on the same job.

The job is the peers' (../shared/peers/README.md): all-MiniLM-L6-v2 on the 809 SciFact training
claims with 15 mined hard negatives each, group 8, queries 64 / passages 256 tokens, batch 8 per
process, lr 2e-5, temperature 0.02, mean pooling, 1 epoch, 2 processes on this machine's cores.

  1. bge-ray: `benchmarks/train_scifact.py --eval` (2 Ray Train workers, ZeRO-2), extra bge-ray
     arguments passed through;
  2. FlagEmbedding 1.4.2: the peers' `run_fe.sh` (torchrun, 2 x gloo) in its own virtual
     environment (`--peer_venv`, made as the peers' README says).

The headline is the run with no extra arguments: the same model config as FlagEmbedding's
(attention dropout as the model ships it). A lever that changes the model (`--attention_dropout 0`,
`--bf16`) is a separate run, reported as such with its quality effect; the JSON records the
arguments of each run.

Both evaluate with the peers' `eval_scifact.py` on the 300 SciFact test claims. Reported for each:
launch to first optimizer step, steady query groups/s (steps after the first 10), tokens/s
(bge-ray), peak RSS of the largest process, mean training loss, nDCG@10 / Recall@100; then the
ratios.

    python benchmarks/vs_flagembedding.py [--peer_venv ../peer-venv] [--only bge-ray|fe] [bge-ray args]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHARED = os.environ.get("BGE_RAY_BENCH_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
PEERS = os.path.join(SHARED, "peers")
DATA = os.path.join(SHARED, "data", "scifact", "train_minilm_hardnegs.jsonl")
STEADY_AFTER = 10
MODEL_CHANGES = ("--attention_dropout", "--bf16")  # levers that train a different model
GROUPS_PER_STEP = 16  # 2 processes x batch 8


def run_bge_ray(work: str, tag: str, extra: list[str]) -> dict:
    cmd = [sys.executable, os.path.join(HERE, "train_scifact.py"), "--eval", "--tag", tag, "--work", work, *extra]
    subprocess.run(cmd, check=True)
    with open(os.path.join(HERE, "results", f"{tag}.json"), encoding="utf-8") as f:
        r = json.load(f)
    return {
        "launch_to_first_step_s": r["launch_to_first_step_s"], "steady_groups_per_s": r["steady_groups_per_s"],
        "steady_tokens_per_s": r["steady_tokens_per_s"], "data_wait_frac": r["steady_data_wait_frac"],
        "peak_rss_gib_per_process": r["peak_rss_gib_per_worker"], "train_loss_mean": r["train_loss_mean"],
        "wall_s": r["wall_s"], "ndcg@10": r["eval"]["ndcg@10"], "recall@100": r["eval"]["recall@100"],
        "steps": r["steps"],
        # where bge-ray's start-up goes: driver + Ray + Train worker group, then inside the workers
        "launch_to_workers_s": r.get("launch_to_workers_s"), "worker_start_to_engine_s": r.get("worker_start_to_engine_s"),
        "worker_start_to_first_batch_s": r.get("worker_start_to_first_batch_s"),
        "worker_start_to_first_step_s": r.get("worker_start_to_first_step_s"),
    }


def _fe_steady_groups_per_s(log: str, total: int) -> float | None:
    """From the timestamped log (tsrun: each line, tqdm updates included, starts with [+ seconds]):
    groups trained between the end of step STEADY_AFTER and the last step, over that time."""
    seen: dict[int, float] = {}
    for t, step in re.findall(r"\[\+\s*([0-9.]+)\][^\[\n]*?\s(\d+)/" + str(total) + r" \[", log):
        seen.setdefault(int(step), float(t))
    if STEADY_AFTER not in seen or total not in seen or seen[total] <= seen[STEADY_AFTER]:
        return None
    return (total - STEADY_AFTER) * GROUPS_PER_STEP / (seen[total] - seen[STEADY_AFTER])


def run_fe(work: str, tag: str, venv: str, epochs: str) -> dict:
    env = dict(os.environ, VENV=venv, WORK=work, DATA=DATA, NPROC="2", EPOCHS=epochs, XDEV="0", TAG=tag,
               SCIFACT_DIR=os.path.join(SHARED, "data", "scifact"))
    subprocess.run(["bash", os.path.join(PEERS, "run_fe.sh")], check=True, env=env, cwd=work)
    spec = importlib.util.spec_from_file_location("peers_collect", os.path.join(PEERS, "collect.py"))
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)
    r = collect.one(work, tag)
    with open(os.path.join(work, f"{tag}.log"), encoding="utf-8", errors="replace") as f:
        log = f.read()
    return {
        "launch_to_first_step_s": r.get("tqdm_time_to_first_step_s") or r.get("time_to_first_step_s"),
        "steady_groups_per_s": _fe_steady_groups_per_s(log, r["steps_total"]) if r.get("steps_total") else None,
        "whole_run_groups_per_s": r.get("train_samples_per_second"), "steady_tokens_per_s": None,
        "data_wait_frac": None,
        "peak_rss_gib_per_process": r["time_v_max_rss_mib"] / 1024 if r.get("time_v_max_rss_mib") else None,
        "train_loss_mean": r.get("train_loss_avg"), "wall_s": r.get("wall_s"),
        "ndcg@10": r.get("ndcg@10"), "recall@100": r.get("recall@100"), "steps": r.get("steps_total"),
    }


def _fmt(x: object, nd: int = 3) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer_venv", default=os.path.join(os.path.dirname(REPO), "peer-venv"))
    ap.add_argument("--work", default=os.path.join(os.path.dirname(REPO), "bench-work", "vs_fe"))
    ap.add_argument("--epochs", default="1")
    ap.add_argument("--only", choices=["bge-ray", "fe"])
    ap.add_argument("--tag", default="bge_ray_vs_fe")
    args, extra = ap.parse_known_args()
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    out_path = os.path.join(HERE, "results", f"vs_flagembedding_{args.tag}.json")
    runs: dict[str, dict] = {}
    if os.path.exists(out_path):
        with open(out_path, encoding="utf-8") as f:
            runs = json.load(f).get("runs", {})
    if args.only in (None, "bge-ray"):
        runs["bge-ray"] = dict(run_bge_ray(work, args.tag, ["--epochs", args.epochs, *extra]), args=extra,
                               same_model_config=not any(a.split("=")[0] in MODEL_CHANGES for a in extra))
    if args.only in (None, "fe"):
        runs["flagembedding"] = run_fe(work, f"fe_np2_e{args.epochs}", os.path.abspath(args.peer_venv), args.epochs)
    summary = {"machine": f"{platform.node()} {os.cpu_count()} cpus", "date": time.strftime("%Y-%m-%d"),
               "runs": runs}
    if "bge-ray" in runs and "flagembedding" in runs:
        b, f = runs["bge-ray"], runs["flagembedding"]
        summary["ratios"] = {k: (b[k] / f[k] if b.get(k) and f.get(k) else None) for k in
                             ("steady_groups_per_s", "launch_to_first_step_s", "peak_rss_gib_per_process",
                              "ndcg@10")}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    keys = ["launch_to_first_step_s", "steady_groups_per_s", "steady_tokens_per_s", "data_wait_frac",
            "peak_rss_gib_per_process", "train_loss_mean", "ndcg@10", "recall@100", "wall_s"]
    names = list(runs)
    print("| | " + " | ".join(names) + (" | bge-ray / FlagEmbedding |" if "ratios" in summary else " |"))
    print("|---" * (len(names) + 1 + ("ratios" in summary)) + "|")
    for k in keys:
        ratio = summary.get("ratios", {}).get(k)
        cells = [_fmt(runs[n].get(k), 4 if "ndcg" in k or "recall" in k else 3) for n in names]
        print(f"| {k} | " + " | ".join(cells) + (f" | {_fmt(ratio, 2)} |" if "ratios" in summary else " |"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
