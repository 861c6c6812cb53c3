"""Faults on the real cluster: a SIGKILLed worker, a SIGKILLed driver, a damaged checkpoint."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import torch

import bge_ray
from bge_ray.data.triplets import row_key
from bge_ray.errors import CheckpointError
from bge_ray.train.checkpointing import (
    pick_resume_checkpoint,
    rank_files,
    rank_problem,
    restore_rng_state,
    save_rng_state,
    staging_dir,
    verify,
    write_manifest,
)
from tests.helpers import REPO, SCIFACT_TRAIN, make_beir_subset


def _rows_file(path, n):
    with open(SCIFACT_TRAIN, encoding="utf-8") as f, open(path, "w", encoding="utf-8") as out:
        for _, line in zip(range(n), f, strict=False):
            out.write(line)
    return str(path)


def _finished_checkpoints(run_dir):
    """Checkpoint dirs every rank has finished writing (both manifests there), oldest first."""
    return sorted(d for d in glob.glob(os.path.join(run_dir, "checkpoint_step_*"))
                  if os.path.exists(os.path.join(d, "manifest_rank0.json"))
                  and os.path.exists(os.path.join(d, "manifest_rank1.json")))


def _registered(run_dir):
    """Ray Train's own record of the run's checkpoints (its snapshot): their dir names, oldest first."""
    try:
        with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
            snap = json.load(f)
    except (FileNotFoundError, ValueError):  # not written yet, or caught mid-write
        return []
    names = sorted(r["checkpoint_dir_name"] for r in snap["checkpoint_results"])
    latest = (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    return names if latest == (names[-1] if names else None) else []


def _wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _train_workers():
    """The live Ray Train worker processes, from Ray's state API."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [psutil.Process(a.pid) for a in actors]


def _finetune_in_background(cfg):
    """``bge_ray.finetune(cfg)`` on a thread; its result or error lands in the returned dict."""
    box = {}

    def run():
        try:
            box["result"] = bge_ray.finetune(cfg)
        except BaseException as e:  # handed to the test thread, which re-raises it
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def _config(tiny_model, tmp_path, rows, **extra):
    return {
        "model_name_or_path": tiny_model, "train_data": [_rows_file(tmp_path / "rows.jsonl", rows)],
        "output_dir": str(tmp_path / "model"), "storage_path": str(tmp_path / "storage"), "run_name": "faulty",
        "num_workers": 2, "deepspeed": "zero2", "per_device_train_batch_size": 4, "train_group_size": 1,
        "query_max_len": 32, "passage_max_len": 96, "sentence_pooling_method": "mean", "temperature": 0.05,
        "learning_rate": 1e-3, "num_train_epochs": 1, "logging_steps": 5, "seed": 7, **extra,
    }


def test_killed_worker_resumes_same_step_and_trains_each_row_once(ray_cluster, tiny_model, tmp_path):
    cfg = _config(tiny_model, tmp_path, rows=400, save_steps=5, max_failures=1)
    run_dir = os.path.join(cfg["storage_path"], "faulty")
    thread, box = _finetune_in_background(cfg)
    _wait_for(lambda: _registered(run_dir) or "error" in box, 300, "the first checkpoint")
    assert "error" not in box, box.get("error")
    victims = _train_workers()
    assert len(victims) == 2
    killed = victims[-1]
    killed.send_signal(signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish after a worker was killed"
    if "error" in box:
        raise box["error"]
    result = box["result"]
    assert not killed.is_running()
    # 400 rows / (2 workers x 4) = 50 steps in the one epoch, resumed from a checkpoint, not from zero
    assert result.metrics["step"] == result.metrics["total_steps"] == 50
    resumed = result.metrics["resumed_at_step"]
    assert resumed > 0 and resumed % 5 == 0
    assert os.path.exists(os.path.join(result.model_dir, "model.safetensors"))
    # the final checkpoint lists the rows each worker trained this epoch, across the restart:
    # every row exactly once (the resumed epoch left out what was trained before the checkpoint)
    final = _finished_checkpoints(run_dir)[-1]
    assert final.endswith("checkpoint_step_00000050")
    keys = np.concatenate([np.load(os.path.join(final, f"trained_rows_rank{r}.npy")) for r in range(2)])
    expected = {row_key(cfg["train_data"][0], line) for line in range(1, 401)}
    assert len(keys) == 400 and set(keys.tolist()) == expected


def test_killed_driver_rerun_resumes_past_a_damaged_checkpoint(ray_cluster, tiny_model, tmp_path):
    import yaml

    cfg = _config(tiny_model, tmp_path, rows=400, save_steps=5, save_total_limit=3)
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    run_dir = os.path.join(cfg["storage_path"], "faulty")
    cmd = [sys.executable, "-m", "bge_ray.cli", "train", "--config", str(config_path)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            _wait_for(lambda: len(_registered(run_dir)) >= 2 or driver.poll() is not None, 300, "two checkpoints")
        finally:
            driver.kill()  # SIGKILL: no cleanup, the run is left as a crash leaves it
            driver.wait()
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    registered = _registered(run_dir)
    assert not any(json.load(open(os.path.join(run_dir, d, "trainer_state.json"))).get("final") for d in registered)
    # damage the checkpoint Ray would resume from, the way a cut-off copy would: a DeepSpeed shard loses its tail
    newest, before = (os.path.join(run_dir, d) for d in registered[-1:-3:-1])
    shard = max(glob.glob(os.path.join(newest, "deepspeed", "*")), key=os.path.getsize)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    assert "bytes" in verify(_local_fs(), newest)
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-4000:]
    assert "resuming the unfinished run" in out
    assert f"{os.path.basename(newest)}: deepspeed/{os.path.basename(shard)} has" in out
    step_before = int(os.path.basename(before).split("_")[-1])
    assert f"resumed from {before} at step {step_before}" in out
    with open(os.path.join(_finished_checkpoints(run_dir)[-1], "trainer_state.json")) as f:
        state = json.load(f)
    assert state["final"] and state["global_step"] == 50
    assert os.path.exists(os.path.join(cfg["output_dir"], "model.safetensors"))


def _local_fs():
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem()


def _fake_checkpoint(run_dir, step, world=2):
    path = os.path.join(run_dir, f"checkpoint_step_{step:08d}")
    for rank in range(world):
        local = os.path.join(path, "deepspeed")
        os.makedirs(local, exist_ok=True)
        with open(os.path.join(local, f"shard_rank{rank}.pt"), "wb") as f:
            f.write(os.urandom(4096))
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step, "world_size": world}, f)
    return path


def _manifest(path, rank, files):
    import hashlib

    entries = {}
    for rel in files:
        if not os.path.exists(os.path.join(path, rel)):  # a file this test's checkpoint did not make yet
            os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
            with open(os.path.join(path, rel), "wb") as f:
                f.write(os.urandom(256))
        data = open(os.path.join(path, rel), "rb").read()
        entries[rel] = [len(data), hashlib.sha256(data).hexdigest()]
    with open(os.path.join(path, f"manifest_rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "files": entries}, f)


def test_resume_choice_passes_over_damaged_checkpoints_and_fails_when_none_is_whole(tmp_path):
    run_dir = str(tmp_path)
    paths = {}
    for step in (5, 10, 15):
        path = _fake_checkpoint(run_dir, step)
        _manifest(path, 0, ["deepspeed/shard_rank0.pt", "trainer_state.json"])
        _manifest(path, 1, ["deepspeed/shard_rank1.pt"])
        paths[step] = path
    fs = _local_fs()
    assert pick_resume_checkpoint(fs, paths[15]) == (paths[15], paths[15], [])
    # rank 1 died before finishing step 15 (no manifest); a bit flip in step 10
    os.remove(os.path.join(paths[15], "manifest_rank1.json"))
    with open(os.path.join(paths[10], "deepspeed", "shard_rank0.pt"), "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    chosen, local, skipped = pick_resume_checkpoint(fs, paths[15])
    assert chosen == local == paths[5]
    assert skipped == ["checkpoint_step_00000015: rank 1 never finished writing it (manifest_rank1.json is missing)",
                       "checkpoint_step_00000010: deepspeed/shard_rank0.pt does not match its checksum"]
    # a newer checkpoint than the one Ray hands over is never picked (it was not registered)
    assert pick_resume_checkpoint(fs, paths[5])[0] == paths[5]
    os.remove(os.path.join(paths[5], "deepspeed", "shard_rank1.pt"))
    with pytest.raises(CheckpointError, match=r"no intact checkpoint to resume from: .*shard_rank1.pt is missing"):
        pick_resume_checkpoint(fs, paths[15])


def test_each_rank_reads_only_its_files_and_damage_any_rank_finds_fails_the_checkpoint_for_all(tmp_path):
    run_dir = str(tmp_path)
    paths = {}
    for step in (5, 10):
        path = _fake_checkpoint(run_dir, step)
        _manifest(path, 0, ["deepspeed/mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_0_optim.pt",
                            "trainer_state.json", "trained_rows_rank0.npy", "model/model.safetensors"])
        _manifest(path, 1, ["deepspeed/zero_pp_rank_1_optim.pt", "trained_rows_rank1.npy"])
        paths[step] = path
    manifests = {r: json.load(open(os.path.join(paths[10], f"manifest_rank{r}.json")))["files"] for r in (0, 1)}
    # rank 1 loads its own shard and rows, the shared model states and the trainer state; not rank 0's
    # optimizer shard, not the exported model
    assert sorted(rank_files(manifests, 1)) == ["deepspeed/mp_rank_00_model_states.pt",
                                                "deepspeed/zero_pp_rank_1_optim.pt", "trained_rows_rank1.npy",
                                                "trainer_state.json"]
    assert "model/model.safetensors" not in rank_files(manifests, 0)
    assert {"trained_rows_rank0.npy", "trained_rows_rank1.npy"} <= set(rank_files(manifests, 0))  # rank 0 filters
    # a bit flip in rank 1's shard at step 10: rank 0 alone does not see it, rank 1 does, and both move on
    shard = os.path.join(paths[10], "deepspeed", "zero_pp_rank_1_optim.pt")
    data = bytearray(open(shard, "rb").read())
    data[7] ^= 1
    open(shard, "wb").write(bytes(data))
    fs = _local_fs()
    assert rank_problem(fs, paths[10], 0) is None
    assert rank_problem(fs, paths[10], 1) == "deepspeed/zero_pp_rank_1_optim.pt does not match its checksum"
    both = lambda path, why: [why, rank_problem(fs, path, 1)]  # noqa: E731 - rank 0's view of an all-gather
    chosen, _, skipped = pick_resume_checkpoint(fs, paths[10], 0, both)
    assert chosen == paths[5] and skipped == [
        "checkpoint_step_00000010: deepspeed/zero_pp_rank_1_optim.pt does not match its checksum"]
    # a remote checkpoint is copied, file by file as it is hashed, to a local folder
    local_root = tmp_path / "local"
    chosen, local, _ = pick_resume_checkpoint(fs, paths[5], 1, local_root=str(local_root))
    assert local.startswith(str(local_root)) and sorted(os.listdir(os.path.join(local, "deepspeed"))) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_1_optim.pt"]


def test_manifest_lists_every_file_with_its_size_and_hash(tmp_path):
    (tmp_path / "deepspeed").mkdir()
    (tmp_path / "deepspeed" / "a.pt").write_bytes(b"x" * 10)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 1, "world_size": 1}))
    write_manifest(str(tmp_path), 0)
    manifest = json.loads((tmp_path / "manifest_rank0.json").read_text())
    assert sorted(manifest["files"]) == ["deepspeed/a.pt", "trainer_state.json"]
    assert manifest["files"]["deepspeed/a.pt"][0] == 10
    assert verify(_local_fs(), str(tmp_path)) is None
    (tmp_path / "deepspeed" / "a.pt").write_bytes(b"x" * 11)
    assert verify(_local_fs(), str(tmp_path)) == "deepspeed/a.pt has 11 bytes, 10 were written"


def test_rng_state_round_trip_gives_the_same_dropout_masks_and_its_file_is_rank_owned(tmp_path):
    """A resumed worker draws what it would have drawn had it never stopped (HF keeps rng_state_<rank>.pth too)."""
    torch.manual_seed(5)
    torch.rand(3)
    save_rng_state(str(tmp_path), 1)
    expected = torch.nn.functional.dropout(torch.ones(64), p=0.5, training=True)
    torch.manual_seed(123)  # what a fresh worker's seeding did
    assert not restore_rng_state(str(tmp_path), 0)  # rank 0 saved nothing here
    assert restore_rng_state(str(tmp_path), 1)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(64), p=0.5, training=True), expected)
    write_manifest(str(tmp_path), 1)
    manifests = {1: json.loads((tmp_path / "manifest_rank1.json").read_text())["files"], 0: {}}
    assert "rng_state_rank1.pt" in rank_files(manifests, 1) and "rng_state_rank1.pt" not in rank_files(manifests, 0)


def test_checkpoint_staging_removes_what_dead_processes_of_this_host_left(tmp_path):
    """A worker SIGKILLed while it saves leaves its staging dir (a copy of its shards) behind; the
    next save on the host removes it, and nothing of a live process, another host or anyone else."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = staging_dir(str(tmp_path))
    name, sep, _ = os.path.basename(mine).partition(f"_{os.getpid()}_")  # mkdtemp's suffix may hold "_"
    assert sep and name.startswith("bge_ray_ckpt_")
    host = name[len("bge_ray_ckpt_"):]
    assert host and "_" not in host
    left = tmp_path / f"bge_ray_ckpt_{host}_{dead.pid}_abc"
    (left / "deepspeed").mkdir(parents=True)
    (left / "deepspeed" / "shard.pt").write_bytes(b"x" * 100)
    live = tmp_path / f"bge_ray_ckpt_{host}_{os.getppid()}_abc"
    other_host = tmp_path / f"bge_ray_ckpt_{host}x_{dead.pid}_abc"
    unrelated = tmp_path / f"bge_ray_ckptx_{host}_{dead.pid}_abc"
    for d in (live, other_host, unrelated):
        d.mkdir()
    second = staging_dir(str(tmp_path))
    assert not left.exists()
    assert all(d.is_dir() for d in (live, other_host, unrelated, tmp_path / os.path.basename(mine)))
    assert second != mine and os.path.isdir(second)


@pytest.mark.slow  # starts a Ray of its own
def test_a_too_small_local_ray_is_an_error_not_a_wait(tiny_model, tmp_path):
    """A process that started a 2-CPU Ray (as mine() does on 2 cores) then fine-tunes 2 workers: Ray
    Train would wait forever for the data pipeline's CPU; bge-ray refuses before launching."""
    cfg = _config(tiny_model, tmp_path, rows=16)
    script = (
        "import json, sys, ray, bge_ray\n"
        "ray.init(num_cpus=2, include_dashboard=False)\n"
        "try:\n"
        f"    bge_ray.finetune(json.loads({json.dumps(json.dumps(cfg))}))\n"
        "except bge_ray.ConfigError as e:\n"
        "    print('REFUSED', e)\n"
        "    sys.exit(3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    assert "REFUSED this process already runs a local Ray that is too small" in out.stdout
    assert "need 3 CPU (2 there)" in out.stdout


def _start_node(log_path):
    """One more Ray node on this machine, joined to the session's head, with 2 CPUs of its own."""
    log = open(log_path, "w")  # noqa: SIM115 - closed when the node is stopped
    proc = subprocess.Popen(["ray", "start", f"--address={os.environ['RAY_ADDRESS']}", "--num-cpus=2", "--block",
                             "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _stop_node(node, sig=signal.SIGTERM):
    proc, log = node
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def _alive_nodes():
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def _s3_json(s3, key):
    try:
        return json.loads(s3.get_object(Bucket="bge-ray-test", Key=key)["Body"].read())
    except (s3.exceptions.NoSuchKey, ValueError):
        return None


def test_two_nodes_one_lost_mid_run_the_run_resumes_and_trains_each_row_once(ray_cluster, s3, tiny_model, tmp_path):
    """Head + one more node, a training worker on each (STRICT_SPREAD), training data, eval data and
    checkpoints on the S3 API; the non-head node is SIGKILLed mid-run and a replacement joins (as an
    autoscaler would bring one): the run resumes from its last checkpoint and finishes the epoch."""
    from ray.util.state import list_actors

    rows = _rows_file(tmp_path / "rows.jsonl", 400)
    s3.upload_file(rows, "bge-ray-test", "nodes/train/rows.jsonl")
    eval_dir = make_beir_subset(str(tmp_path / "eval"), n_queries=8, n_extra_docs=30)
    for root, _, names in os.walk(eval_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), eval_dir)
            s3.upload_file(os.path.join(root, name), "bge-ray-test", f"nodes/eval/{rel}")
    cfg = _config(tiny_model, tmp_path, rows=400, save_steps=5, max_failures=2, placement_strategy="STRICT_SPREAD",
                  train_data=["s3://bge-ray-test/nodes/train/"], eval_data="s3://bge-ray-test/nodes/eval",
                  storage_path="s3://bge-ray-test/nodes/runs")
    before = len(_alive_nodes())
    nodes = [_start_node(tmp_path / "node2.log")]
    box = {}
    try:
        _wait_for(lambda: len(_alive_nodes()) == before + 1, 120, "the second node")
        thread, box = _finetune_in_background(cfg)
        snapshot = "nodes/runs/faulty/checkpoint_manager_snapshot.json"
        _wait_for(lambda: _s3_json(s3, snapshot) or "error" in box, 300, "the first checkpoint in the bucket")
        assert "error" not in box, box.get("error")
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        assert len({w.node_id for w in workers}) == 2  # one worker on each node
        import ray

        here = ray.get_runtime_context().get_node_id()
        side = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
                if a.class_name in ("BatchRouter", "_QueueActor")]
        assert len(side) >= 2 and all(a.node_id == here for a in side)  # the run's own actors: the driver's node
        _stop_node(nodes[0], signal.SIGKILL)  # the node, its raylet and its worker, gone at once
        nodes.append(_start_node(tmp_path / "node3.log"))
        thread.join(timeout=900)
        assert not thread.is_alive(), "the run did not finish after a node was lost"
        if "error" in box:
            raise box["error"]
    finally:
        for node in nodes[1:]:
            _stop_node(node)
    result = box["result"]
    assert result.metrics["step"] == result.metrics["total_steps"] == 50
    resumed = result.metrics["resumed_at_step"]
    assert resumed > 0 and resumed % 5 == 0
    assert os.path.exists(os.path.join(result.model_dir, "model.safetensors"))
    final = "nodes/runs/faulty/checkpoint_step_00000050"
    keys = []
    for r in range(2):
        body = s3.get_object(Bucket="bge-ray-test", Key=f"{final}/trained_rows_rank{r}.npy")["Body"].read()
        keys.append(np.load(__import__("io").BytesIO(body)))
    keys = np.concatenate(keys)
    expected = {row_key("s3://bge-ray-test/nodes/train/rows.jsonl", line) for line in range(1, 401)}
    assert len(keys) == 400 and set(keys.tolist()) == expected  # every row of the epoch once, across the loss
