"""The GPU check: `bge-ray train` (Ray Train + DeepSpeed) and FlagEmbedding on one GPU, back to back.

One process runs the stages below in order, writes everything to one JSON file after each stage, and
skips what would not finish inside ``--budget_s`` (a machine lent for minutes must still bring back
figures). On the GPU machine, after ``benchmarks/gpu/bundle.py`` built ``.gpu-bundle/`` here::

    bash benchmarks/gpu/run.sh        # installs the bundle offline, then runs this with --device cuda

Stages:

1. **env**: the card, driver, CUDA, torch / Ray / DeepSpeed / transformers / FlagEmbedding versions.
2. **data**: the bundle's SciFact hard-negative triplets and the length-varied MedQuAD set, with their
   real token counts under the job's cut (queries 64, passages 256), which the FLOP count needs.
3. **bge-ray**: ``python -m bge_ray train`` on a bge-base-sized BERT (12 x 768, built from a config with
   random weights and the bundled WordPiece tokenizer), 1 GPU worker, DeepSpeed ZeRO-2, bf16, batch 32 x
   group 8: on SciFact, on the length-varied set, and on it with ``group_by_length``.
4. **flagembedding**: FlagEmbedding 1.4.2's ``torchrun -m FlagEmbedding.finetune.embedder.encoder_only.base``
   on the same GPU, the same model, data and knobs, DeepSpeed ZeRO-2 and bf16 (its DeepSpeed config
   without an optimizer, so the HF Trainer's fused torch AdamW runs, as bge-ray's does).
5. **bare step**: ``benchmarks/gpu_step.py``'s step without Ray, on the same shapes.
6. **floor**: Ray Train's empty training function on 1 GPU worker (``benchmarks/startup_floor.py``).

Reported per run: steady real tokens/s and query groups/s (log windows after step 10), model FLOPs
utilisation on real tokens (6 x non-embedding parameters per token, plus attention 12 x layers x
hidden x length per token at the data's token-weighted mean length; over 989 TFLOP/s, the H200's dense
bf16 peak, and over the ~790 TFLOP/s a large bf16 matmul reaches there), launch to first step, peak GPU
memory (PyTorch's own for bge-ray; nvidia-smi's used memory, sampled, for both), data wait.

``--device cpu`` runs the same stages with a 2-layer model, a few steps and FlagEmbedding on gloo: the
smoke test of everything up to the GPU itself (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import glob
import json
import lzma
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
import gpu_step  # noqa: E402 - benchmarks/gpu_step.py: the bare step, and the cards' peaks

STEADY_AFTER = 10
MATMUL_REACHED = {"H200": 790.0}  # measured on this workplace's H200 (8192^3 bf16 matmul, device notes)

BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


class Check:
    """The results file, written whole after every stage, and the time left."""

    def __init__(self, out: str, budget_s: float) -> None:
        self.out, self.t0, self.budget_s = out, time.time(), budget_s
        self.results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "stages": {}}

    def left(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def put(self, name: str, value: object) -> None:
        self.results["stages"][name] = value
        self.results["elapsed_s"] = round(time.time() - self.t0, 1)
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        with open(self.out, "w", encoding="utf-8") as f:
            json.dump(self.results, f, indent=1)
        print(f"[gpu-check] {name}: {json.dumps(value)[:600]}", flush=True)


def command(args: list[str], timeout: float) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e}"


def environment(device: str) -> dict:
    import importlib.metadata as md

    import torch

    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "host": platform.node()}
    for name in ("ray", "deepspeed", "transformers", "FlagEmbedding", "datasets", "tokenizers"):
        try:
            env[name] = md.version(name)
        except md.PackageNotFoundError:
            env[name] = None
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["nvidia_smi"] = command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                     "--format=csv,noheader"], 20)
    return env


def peak_tflops(gpu: str | None) -> tuple[float | None, float | None]:
    """(the card's dense bf16 peak, the rate a large bf16 matmul reached on it here), from ``gpu_step.py``'s table."""
    peak = gpu_step.peak_tflops(gpu) if gpu else None
    return peak, next((v for k, v in MATMUL_REACHED.items() if k in gpu), None) if peak else None


# ---------------------------------------------------------------------------------------------- data
def unpack(bundle: str, work: str) -> dict[str, str]:
    """The bundle's data sets as JSONL files under ``work``: name -> path."""
    out = {}
    os.makedirs(os.path.join(work, "data"), exist_ok=True)
    for name in ("scifact_hardnegs", "medquad_varied"):
        path = os.path.join(work, "data", f"{name}.jsonl")
        with lzma.open(os.path.join(bundle, "data", f"{name}.jsonl.xz"), "rb") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        out[name] = path
    return out


def token_stats(path: str, tokenizer: object, query_max_len: int, passage_max_len: int, group: int) -> dict:
    """Real tokens per query and passage under the job's cut, and the expected tokens and squared
    lengths of one query group (its query, a positive and group-1 of the negatives, drawn uniformly)."""
    queries, passages = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            queries.append(row["query"])
            passages.extend(row["pos"] + row["neg"])
    q = [len(x) for x in tokenizer(queries, truncation=True, max_length=query_max_len)["input_ids"]]
    p = [len(x) for x in tokenizer(passages, truncation=True, max_length=passage_max_len)["input_ids"]]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    stats = {"rows": len(queries), "query_tokens_mean": mean(q), "passage_tokens_mean": mean(p),
             "passages_cut_at_max_len": sum(x == passage_max_len for x in p) / len(p)}
    stats["group_tokens"] = stats["query_tokens_mean"] + group * stats["passage_tokens_mean"]
    stats["group_squared_lengths"] = mean([x * x for x in q]) + group * mean([x * x for x in p])
    return stats


def build_model(work: str, bundle: str, shape: dict) -> tuple[str, dict]:
    """A BERT of ``shape`` with random weights (seed 0) and the bundled tokenizer, saved under ``work``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = os.path.join(work, "model")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, max_position_embeddings=512, **shape)
    model = BertModel(config)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(os.path.join(bundle, "tokenizer")).save_pretrained(path)
    non_embed = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    return path, {"non_embedding_params": non_embed, "params": sum(p.numel() for p in model.parameters()), **shape}


def flops_per_token(model: dict, data: dict) -> float:
    """Training FLOPs per real token: 6 x non-embedding parameters, plus attention's 12 x layers x
    hidden x length at the data's token-weighted mean length (forward 4 x hidden x length per layer)."""
    weighted_len = data["group_squared_lengths"] / data["group_tokens"]
    return 6 * model["non_embedding_params"] + 12 * model["num_hidden_layers"] * model["hidden_size"] * weighted_len


def utilisation(tokens_per_s: float | None, per_token: float, gpu: str | None) -> dict:
    peak, reached = peak_tflops(gpu)
    if not tokens_per_s:
        return {}
    tflops = tokens_per_s * per_token / 1e12
    return {"model_tflops_per_s": tflops, "mfu": tflops / peak if peak else None,
            "of_matmul_reached": tflops / reached if reached else None, "peak_tflops": peak}


# ---------------------------------------------------------------------------------------------- runs
class Sampler(threading.Thread):
    """nvidia-smi's used GPU memory, every half second, while a run lasts (its peak)."""

    def __init__(self, enabled: bool) -> None:
        super().__init__(daemon=True)
        self.enabled, self.peak_mib, self.done = enabled, 0.0, threading.Event()

    def run(self) -> None:
        while self.enabled and not self.done.is_set():
            out = command(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], 5)
            if out.split("\n")[0].strip().isdigit():
                self.peak_mib = max(self.peak_mib, float(out.split("\n")[0]))
            self.done.wait(0.5)


def launch(cmd: list[str], env: dict, log: str, timeout: float, gpu: bool) -> dict:
    """Run ``cmd``; every output line (tqdm's carriage-return updates too) with its time since launch."""
    sampler = Sampler(gpu)
    sampler.start()
    t0 = time.time()
    lines: list[tuple[float, str]] = []
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        buf = b""
        while chunk := proc.stdout.read1(65536):
            buf += chunk
            *done, buf = re.split(rb"[\r\n]", buf)
            for raw in done:
                text = raw.decode("utf-8", "replace")
                lines.append((time.time() - t0, text))
                f.write(f"[+{lines[-1][0]:7.2f}] {text}\n")
        rc = proc.wait()
        timer.cancel()
    sampler.done.set()
    return {"rc": rc, "t0": t0, "wall_s": time.time() - t0, "lines": lines,
            "nvidia_smi_peak_gib": sampler.peak_mib / 1024 if gpu else None, "killed": rc == -9}


def bge_ray_run(name: str, data: str, model: str, work: str, job: dict, extra: list[str], timeout: float) -> dict:
    """``python -m bge_ray train`` on ``data``: its log windows, start-up and memory."""
    run = os.path.join(work, "runs", name)
    cmd = [sys.executable, "-m", "bge_ray", "train", "--model_name_or_path", model, "--train_data", data,
           "--output_dir", os.path.join(run, "model"), "--storage_path", os.path.join(run, "storage"),
           "--run_name", name, "--query_max_len", "64", "--passage_max_len", "256",
           "--train_group_size", str(job["group"]), "--per_device_train_batch_size", str(job["batch"]),
           "--learning_rate", "1e-5", "--temperature", "0.02", "--sentence_pooling_method", "cls",
           "--max_steps", str(job["steps"]), "--logging_steps", "5", "--save_steps", "100000",
           "--num_workers", "1", "--deepspeed", "zero2", "--report_to", "none", *job["device_args"], *extra]
    r = launch(cmd, dict(os.environ), os.path.join(work, "logs", f"{name}.log"), timeout, job["gpu"])
    out = {"command": " ".join(cmd[1:]), "rc": r["rc"], "wall_s": r["wall_s"], "killed": r["killed"],
           "nvidia_smi_peak_gib": r["nvidia_smi_peak_gib"]}
    records = []
    for path in glob.glob(os.path.join(run, "storage", name, "metrics.jsonl")):
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    first = next((m for m in records if m["kind"] == "first_step"), None)
    steady = [m for m in records if m["kind"] == "train" and m["step"] > STEADY_AFTER]
    secs = sum(m["window_s"] for m in steady)
    if first:
        out.update(launch_to_first_step_s=first["time"] - r["t0"], launch_to_workers_s=first["worker_start"] - r["t0"],
                   workers_to_engine_s=first["engine_ready_s"], workers_to_first_batch_s=first["first_batch_s"],
                   workers_to_first_step_s=first["time"] - first["worker_start"])
    if secs:
        out.update(steady_steps=steady[-1]["step"] - STEADY_AFTER, steady_s=secs,
                   groups_per_s=sum(m["window_groups"] for m in steady) / secs,
                   tokens_per_s=sum(m["window_tokens"] for m in steady) / secs,
                   data_wait_frac=sum(m["data_wait_frac"] * m["window_s"] for m in steady) / secs,
                   loss_first=records[next(i for i, m in enumerate(records) if m["kind"] == "train")]["loss"],
                   loss_last=steady[-1]["loss"])
    summary = last_json_block([t for _, t in r["lines"]])
    out.update({k: summary[k] for k in ("peak_gpu_mem_gib_per_worker", "peak_rss_gib_per_worker", "train_loss")
                if k in summary})
    if r["rc"] != 0:
        out["tail"] = [t for _, t in r["lines"][-30:]]
    return out


def last_json_block(lines: list[str]) -> dict:
    """The last pretty-printed JSON object in a command's output (``bge-ray train``'s summary)."""
    end = max((i for i, t in enumerate(lines) if t == "}"), default=None)
    start = max((i for i, t in enumerate(lines[:end]) if t == "{"), default=None) if end is not None else None
    if start is None:
        return {}
    try:
        return json.loads("\n".join(lines[start:end + 1]))
    except json.JSONDecodeError:
        return {}


FE_DEEPSPEED = {  # ZeRO-2 as bge-ray's zero2.json; no optimizer: the HF Trainer's own (fused torch AdamW) runs
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True},
    "steps_per_print": 1000000000,
}


def flagembedding_run(name: str, data: str, model: str, work: str, job: dict, timeout: float) -> dict:
    """FlagEmbedding 1.4.2's encoder-only runner under torchrun, one process, on the same job."""
    ds = os.path.join(work, "fe_zero2.json")
    with open(ds, "w", encoding="utf-8") as f:
        json.dump(FE_DEEPSPEED, f)
    steps = job["steps"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29541",
           "-m", "FlagEmbedding.finetune.embedder.encoder_only.base", "--model_name_or_path", model,
           "--train_data", data, "--query_max_len", "64", "--passage_max_len", "256",
           "--train_group_size", str(job["group"]), "--per_device_train_batch_size", str(job["batch"]),
           "--learning_rate", "1e-5", "--temperature", "0.02", "--sentence_pooling_method", "cls",
           "--normalize_embeddings", "True", "--max_steps", str(steps), "--logging_steps", "5", "--save_steps",
           "100000", "--output_dir", os.path.join(work, "runs", name), "--dataloader_drop_last", "True",
           "--deepspeed", ds, "--report_to", "none", *job["fe_device_args"]]
    shim = os.path.join(HERE, "fe_shim")  # FlagEmbedding 1.4.2 cannot be imported under transformers 5 without it
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (shim, os.environ.get("PYTHONPATH")) if p),
               HF_DATASETS_CACHE=os.path.join(work, "hf_datasets"), HF_DATASETS_OFFLINE="1")
    r = launch(cmd, env, os.path.join(work, "logs", f"{name}.log"), timeout, job["gpu"])
    out = {"command": " ".join(cmd[1:]), "rc": r["rc"], "wall_s": r["wall_s"], "killed": r["killed"],
           "nvidia_smi_peak_gib": r["nvidia_smi_peak_gib"]}
    seen: dict[int, float] = {}
    for t, text in r["lines"]:  # tqdm: " 12/60 [00:03<..."
        for step in re.findall(r"\s(\d+)/" + str(steps) + r" \[", " " + text):
            seen.setdefault(int(step), t)
    losses = [float(x) for _, text in r["lines"] for x in re.findall(r"'loss': '?([0-9.]+)", text)]
    if 1 in seen:
        out["launch_to_first_step_s"] = seen[1]
    if STEADY_AFTER in seen and steps in seen and seen[steps] > seen[STEADY_AFTER]:
        out["steady_s"] = seen[steps] - seen[STEADY_AFTER]
        out["groups_per_s"] = (steps - STEADY_AFTER) * job["batch"] / out["steady_s"]
    if losses:
        out.update(loss_first=losses[0], loss_last=losses[-1])
    if r["rc"] != 0:
        out["tail"] = [t for _, t in r["lines"][-30:]]
    return out


def bare_step(work: str, job: dict, timeout: float) -> dict:
    """``benchmarks/gpu_step.py``: bge-ray's step without Ray or Ray Data, synthetic batches, same shapes."""
    out = os.path.join(work, "gpu_step.json")
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "gpu_step.py"), "--only", "sdpa-zero2-b32",
           "--batch", str(job["batch"]), "--group", str(job["group"]), "--steps", str(job["bare_steps"]),
           "--warmup", "5", "--out", out, *job["bare_args"]]
    r = launch(cmd, dict(os.environ), os.path.join(work, "logs", "bare_step.log"), timeout, job["gpu"])
    if not os.path.exists(out):
        return {"rc": r["rc"], "tail": [t for _, t in r["lines"][-30:]]}
    with open(out, encoding="utf-8") as f:
        return {"rc": r["rc"], **json.load(f)}


def floor(work: str, job: dict, timeout: float) -> dict:
    """Ray Train's and torchrun's empty training function on 1 worker (``benchmarks/startup_floor.py``)."""
    out = os.path.join(work, "floor.json")
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "startup_floor.py"), "--repeats", "1", "--workers", "1",
           "--variants", "torchrun,ray-train", "--out", out, *(["--gpu"] if job["gpu"] else [])]
    r = launch(cmd, dict(os.environ), os.path.join(work, "logs", "floor.log"), timeout, False)
    if not os.path.exists(out):
        return {"rc": r["rc"], "tail": [t for _, t in r["lines"][-30:]]}
    with open(out, encoding="utf-8") as f:
        return {"rc": r["rc"], **json.load(f)}


JOBS = {  # batch 32 x group 8 at q64 / p256, as the bare step measured; a few steps on the CPU smoke
    "cuda": {"shape": BASE, "batch": 32, "group": 8, "steps": 80, "bare_steps": 20, "gpu": True,
             "device_args": ["--use_gpu", "true", "--bf16", "true"], "fe_device_args": ["--bf16", "True"],
             "bare_args": []},
    "cpu": {"shape": TINY, "batch": 4, "group": 4, "steps": 16, "bare_steps": 2, "gpu": False,
            "device_args": ["--use_gpu", "false"], "fe_device_args": ["--use_cpu", "True", "--ddp_backend", "gloo"],
            "bare_args": ["--device", "cpu", "--tiny"]},
}
# name, data set, tool, extra bge-ray arguments; in order of what matters most if time runs out
RUNS = [
    ("bge-ray_scifact", "scifact_hardnegs", "bge-ray", []),
    ("flagembedding_scifact", "scifact_hardnegs", "flagembedding", []),
    ("bare_step", None, "bare", []),
    ("bge-ray_varied", "medquad_varied", "bge-ray", []),
    ("bge-ray_varied_group_by_length", "medquad_varied", "bge-ray", ["--group_by_length", "true"]),
    ("flagembedding_varied", "medquad_varied", "flagembedding", []),
    ("floor", None, "floor", []),
]
NEEDS_S = {"bge-ray": 100, "flagembedding": 90, "bare": 60, "floor": 60}  # skip a run with less time than this left


def one_run(tool: str, name: str, data: str | None, model: str, work: str, job: dict, extra: list[str],
            timeout: float) -> dict:
    if tool == "bge-ray":
        return bge_ray_run(name, data, model, work, job, extra, timeout)
    if tool == "flagembedding":
        return flagembedding_run(name, data, model, work, job, timeout)
    return bare_step(work, job, timeout) if tool == "bare" else floor(work, job, timeout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=os.path.join(REPO, ".gpu-bundle"))
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    ap.add_argument("--work", default="/tmp/gpu_check")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--budget_s", type=float, default=450)
    ap.add_argument("--only", default=None, help="comma-separated run names")
    args = ap.parse_args()
    check, job = Check(args.out, args.budget_s), JOBS[args.device]
    os.makedirs(os.path.join(args.work, "logs"), exist_ok=True)
    env = environment(args.device)
    check.put("env", env)
    from transformers import AutoTokenizer

    sets = unpack(args.bundle, args.work)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.bundle, "tokenizer"))
    data = {name: token_stats(path, tokenizer, 64, 256, job["group"]) for name, path in sets.items()}
    model_path, model = build_model(args.work, args.bundle, job["shape"])
    check.put("data", {"sets": data, "model": model, "job": {k: v for k, v in job.items() if k != "shape"}})
    wanted = set(args.only.split(",")) if args.only else None
    for name, dataset, tool, extra in RUNS:
        if wanted and name not in wanted:
            continue
        if check.left() < NEEDS_S[tool]:
            check.put(name, {"skipped": f"{check.left():.0f} s of the budget left"})
            continue
        try:
            r = one_run(tool, name, dataset and sets[dataset], model_path, args.work, job, extra, check.left() - 10)
        except Exception as e:  # noqa: BLE001 - recorded; the other runs still bring their figures back
            r = {"rc": "error", "error": f"{type(e).__name__}: {e}"}
        if dataset:
            if r.get("groups_per_s") and tool == "flagembedding":  # same data and sampling: the data's tokens per group
                r["tokens_per_s_estimated"] = r["groups_per_s"] * data[dataset]["group_tokens"]
            tokens = r.get("tokens_per_s") or r.get("tokens_per_s_estimated")
            r.update(utilisation(tokens, flops_per_token(model, data[dataset]), env.get("gpu")))
        check.put(name, r)
    failed = [n for n, r in check.results["stages"].items() if isinstance(r, dict) and r.get("rc") not in (None, 0)]
    check.put("summary", {"failed": failed, "elapsed_s": round(time.time() - check.t0, 1)})
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
