"""One epoch's data path on a generated training set larger than the memory the run may use: scan
(read and validate every row, index the files), plan, read by byte range, shuffle, sample groups,
tokenize and feed 2 consumers (the workers' side of the router, without a model), on a local Ray
whose object store is capped. Run at 1x, 2x and 4x the data: peak memory should stay flat.

    python benchmarks/data_scale.py --gib 1 2 4 [--object_store_mib 1024]

Each size runs in its own Ray (started here, stopped after). Memory is sampled every 0.5 s over
every process of this Ray and the driver (RSS summed, shared pages counted once per process:
an upper bound). Writes benchmarks/results/data_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

WORDS = ("protein cell gene expression tumor patient study results analysis model data effect clinical "
         "trial response treatment risk factor disease level increase signal pathway receptor").split()


def generate(folder: str, gib: float, files: int = 8) -> tuple[list[str], int]:
    """``files`` JSONL files, ``gib`` GiB in all, rows of ~4 KB (a query, a positive, 24 negatives)."""
    rng = random.Random(0)
    target = int(gib * (1 << 30))
    per_file = target // files
    paths, rows = [], 0

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    block = [json.dumps({"query": text(12), "pos": [text(25)], "neg": [text(25) for _ in range(24)]})
             for _ in range(2000)]
    for i in range(files):
        path = os.path.join(folder, f"part-{i:03d}.jsonl")
        written = 0
        with open(path, "w", encoding="utf-8") as f:
            while written < per_file:
                for line in block:
                    f.write(line + "\n")
                    written += len(line) + 1
                    rows += 1
                    if written >= per_file:
                        break
        paths.append(path)
    return paths, rows


class MemorySampler:
    """Peak summed RSS of the driver and every Ray process, sampled every 0.5 s."""

    def __init__(self) -> None:
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            total = me.memory_info().rss
            for p in psutil.process_iter(["name", "cmdline"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    if p.pid != me.pid and ("ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd
                                            or "ray/_private" in cmd or "default_worker" in cmd):
                        total += p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak = max(self.peak, total)
            time.sleep(0.5)

    def __enter__(self) -> MemorySampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def spilled_mib() -> float:
    """MiB this Ray spilled to disk so far (from its memory summary)."""
    from ray._private.internal_api import memory_summary

    text = memory_summary(stats_only=True)
    for line in text.splitlines():
        if line.strip().startswith("Spilled"):
            return float(line.split()[1])
    return 0.0


def one_size(gib: float, object_store_mib: int, workdir: str) -> dict:
    import ray

    from bge_ray.config.parse import resolve_config
    from bge_ray.data.pipeline import router_batches, start_router
    from bge_ray.data.scan import load_training_data

    folder = os.path.join(workdir, f"data_{gib:g}")
    os.makedirs(folder)
    t0 = time.time()
    paths, rows = generate(folder, gib)
    on_disk = sum(os.path.getsize(p) for p in paths)
    gen_s = time.time() - t0
    ray.init(num_cpus=3, object_store_memory=object_store_mib << 20, include_dashboard=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    try:
        cfg = resolve_config({"model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "train_data": paths,
                              "output_dir": os.path.join(workdir, "out"), "num_workers": 2,
                              "per_device_train_batch_size": 32, "train_group_size": 2, "query_max_len": 32,
                              "passage_max_len": 64})
        with MemorySampler() as mem:
            t0 = time.time()
            data = load_training_data(cfg, os.path.join(workdir, "cache"))
            scan_s = time.time() - t0
            router = start_router(cfg, data)
            t0 = time.time()
            batches = ray.get(router.begin.remote(0, 0))
            got = [0, 0]
            first = [None]

            def consume(rank: int) -> None:
                for _, b in router_batches(router, rank):
                    got[rank] += len(b["row_key"])
                    if first[0] is None:
                        first[0] = time.time() - t0

            threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            epoch_s = time.time() - t0
        spilled = spilled_mib()
        ray.kill(router)
    finally:
        ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)
    return {"data_gib": round(on_disk / (1 << 30), 3), "rows": rows, "generate_s": round(gen_s, 1),
            "scan_s": round(scan_s, 1), "epoch_s": round(epoch_s, 1), "first_batch_s": round(first[0] or 0, 1),
            "rows_fed": sum(got), "global_batches": batches, "rows_per_s": round(sum(got) / epoch_s, 1),
            "peak_rss_gib": round(mem.peak / (1 << 30), 3), "spilled_mib": spilled,
            "object_store_mib": object_store_mib}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, nargs="+", default=[1, 2, 4])
    parser.add_argument("--object_store_mib", type=int, default=1024)
    parser.add_argument("--workdir", default=None)
    a = parser.parse_args()
    workdir = a.workdir or tempfile.mkdtemp(prefix="bge_ray_scale_")
    out = {"machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / (1 << 30):.0f} GiB",
           "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=HERE).stdout.strip(), "runs": []}
    for gib in a.gib:
        out["runs"].append(one_size(gib, a.object_store_mib, workdir))
        print(json.dumps(out["runs"][-1]), flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "data_scale.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
