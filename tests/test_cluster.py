"""Running on a Ray cluster: cluster.yaml against Ray's own schema, the job configs, and
`ray job submit` end to end against the session's real head (job server, token auth)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from bge_ray.cluster import worker_env
from bge_ray.config import load_config
from bge_ray.errors import ConfigError
from tests.helpers import REPO

JOB_CONFIGS = os.path.join(REPO, "jobs", "configs")


def test_cluster_yaml_passes_rays_cluster_config_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(REPO, "cluster.yaml"), encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    config = prepare_config(raw)
    validate_config(config)  # raises on any schema error
    import ray

    assert raw["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert raw["docker"]["image"].endswith("-gpu")
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith(("m", "c", "r"))  # a CPU head
    gpu_types = {k: v for k, v in raw["available_node_types"].items() if k != raw["head_node_type"]}
    assert len(gpu_types) >= 2 and all(v["max_workers"] >= v["min_workers"] >= 0 for v in gpu_types.values())
    start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start  # the job API is not open to the internet
    for commands in (raw["head_start_ray_commands"], raw["worker_start_ray_commands"]):  # token auth everywhere
        assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in commands)
    assert raw["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    for name, node_type in gpu_types.items():  # workers reach s3://; each type is one pinned GPU kind
        assert node_type["node_config"]["IamInstanceProfile"], name
        (accelerator,) = [k for k in node_type["resources"] if k.startswith("accelerator_type:")]
        assert accelerator.split(":")[1] in (ray.util.accelerators.NVIDIA_TESLA_A10G, ray.util.accelerators.NVIDIA_A100)
    assert any("pip install" in c and "-c /home/ray/bge-ray/jobs/cluster-constraints.txt" in c and "bge-ray" in c
               for c in raw["setup_commands"])

    broken = dict(raw, available_node_types={**raw["available_node_types"], "bad": {"node_config": {}}})
    with pytest.raises(Exception, match="resources|max_workers|required"):
        validate_config(prepare_config(broken))


def test_cluster_constraints_pin_versions_pyproject_allows():
    import tomllib
    from packaging.requirements import Requirement

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        wanted = {Requirement(r).name: Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]}
    with open(os.path.join(REPO, "jobs", "cluster-constraints.txt"), encoding="utf-8") as f:
        pins = [Requirement(line.strip()) for line in f if line.strip() and not line.startswith("#")]
    assert {"ray", "torch", "deepspeed", "transformers", "pyarrow"} <= {p.name for p in pins}
    for pin in pins:
        (spec,) = pin.specifier
        assert spec.operator == "==", pin  # exact: every node, now and later, the same
        assert pin.name in wanted and wanted[pin.name].specifier.contains(spec.version), pin


@pytest.mark.parametrize("name", ["quickstart.yaml", "bge-base-8gpu.yaml", "bge-large-multinode.yaml",
                                  "reranker-8gpu.yaml", "llm-embedder-lora.yaml", "bge-en-icl.yaml"])
def test_training_job_configs_are_valid(name):
    cfg = load_config(os.path.join(JOB_CONFIGS, name))
    assert cfg.eval_data and cfg.output_dir
    assert cfg.task == ("reranker" if name.startswith("reranker") else "embedder")
    if name != "quickstart.yaml":
        assert cfg.use_gpu and cfg.bf16 and cfg.gradient_checkpointing
        assert cfg.negatives_cross_device or cfg.eval_retriever  # a reranker has no cross-device negatives
        assert cfg.storage_path.startswith("s3://") and cfg.num_workers >= 8 and cfg.max_failures > 0
        assert cfg.accelerator_type == "A100" and cfg.worker_resources["accelerator_type:A100"] > 0
    assert os.path.isabs(cfg.output_dir)  # survives the job's temporary working_dir
    if name == "bge-large-multinode.yaml":
        assert cfg.zero_stage == 3 and cfg.num_workers > 8
    if name == "llm-embedder-lora.yaml":  # FlagEmbedding's decoder-only example's LoRA block, at scale
        assert cfg.use_lora and cfg.save_merged_lora_model and cfg.additional_special_tokens == ["<instruct>", "<query>"]
        assert cfg.zero_stage == 3 and cfg.sentence_pooling_method == "last_token"
    if name == "bge-en-icl.yaml":  # FlagEmbedding's icl_same_dataset.sh, at scale
        assert cfg.icl and cfg.same_dataset_within_batch and cfg.icl_suffix_str == "\n<response>"
        assert (cfg.example_query_max_len, cfg.query_max_len, cfg.zero_stage) == (256, 2048, 3)


def test_sweep_and_mine_job_configs_are_valid():
    from bge_ray.sweep.space import load_sweep
    from bge_ray.tools.config import MineConfig

    sweep = load_sweep(os.path.join(JOB_CONFIGS, "sweep.yaml"))
    assert set(sweep.space) == {"temperature", "learning_rate", "sentence_pooling_method"}
    assert sweep.base_config().eval_data
    mine_cfg = load_config(os.path.join(JOB_CONFIGS, "mine.yaml"), cls=MineConfig)
    assert os.path.isfile(mine_cfg.input_file[0])


def _ray(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _wait_for(job_id: str, dashboard: str, timeout_s: int = 600) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        time.sleep(2)
    client.stop_job(job_id)
    raise TimeoutError(f"job {job_id} did not finish in {timeout_s}s:\n{client.get_job_logs(job_id)[-3000:]}")


def _submit(dashboard: str, args: list[str]) -> str:
    env_json = json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    proc = _ray("job", "submit", "--address", dashboard, "--working-dir", ".", "--runtime-env-json", env_json,
                "--no-wait", "--", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    job_id = next(w.strip("'\"") for w in out.split() if w.strip("'\"").startswith("raysubmit_"))
    return job_id


def test_ray_job_submit_quickstart_and_a_bad_config(ray_head, tmp_path):
    dashboard = ray_head["dashboard"]
    out = tmp_path / "model"
    job = _submit(dashboard, [
        "python", "jobs/finetune.py", "--config", "jobs/configs/quickstart.yaml", "--max_steps", "2",
        "--logging_steps", "1", "--eval_data", "none", "--output_dir", str(out),
        "--storage_path", str(tmp_path / "runs")])
    bad = _submit(dashboard, ["python", "jobs/finetune.py", "--config", "jobs/configs/quickstart.yaml",
                              "--temperature", "-1"])
    assert _wait_for(bad, dashboard) == "FAILED"
    logs = _ray("job", "logs", "--address", dashboard, bad).stdout
    assert "bge-ray: config error: temperature must be > 0, got -1" in logs
    status = _wait_for(job, dashboard)
    logs = _ray("job", "logs", "--address", dashboard, job).stdout
    assert status == "SUCCEEDED", logs[-4000:]
    assert "step     2/2" in logs and f"fine-tuned model: {out}" in logs

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(out), device="cpu")
    emb = model.encode(["Vitamin D deficiency is linked to bone fractures."], normalize_embeddings=True)
    assert emb.shape == (1, 384) and abs(float((emb ** 2).sum()) - 1) < 1e-4
    assert glob.glob(str(tmp_path / "runs" / "*" / "checkpoint_step_00000002"))


def test_job_scripts_run_the_shipped_code_and_reject_bad_configs_fast():
    for script, needle in (("finetune.py", "--model_name_or_path"), ("sweep.py", "--num_samples"),
                           ("mine.py", "--range_for_sampling"), ("score.py", "--reranker_name_or_path"),
                           ("evaluate.py", "--ignore_identical_ids")):
        proc = subprocess.run([sys.executable, os.path.join("jobs", script), "--help"], capture_output=True,
                              text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": ""})
        assert proc.returncode == 0 and needle in proc.stdout, (script, proc.stderr[-2000:])
    with pytest.raises(ConfigError, match="needs --config"):
        from bge_ray.cli import cmd_tune

        cmd_tune([])


def test_with_no_address_bge_ray_joins_the_cluster_ray_start_recorded(ray_head, tmp_path):
    """On a head node after `ray start --head`, a driver with no address joins that cluster (Ray's
    rule: `ray start` records it in <tmp>/ray/ray_current_cluster); bge-ray must not hand Ray a
    CPU count for a local cluster there (Ray refuses one for a cluster it joins)."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(ray_head["address"])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(tmp_path)
    script = ("import ray\nfrom bge_ray.cluster import connect_ray\nconnect_ray(None, num_cpus=7)\n"
              "print('JOINED', ray.get_runtime_context().gcs_address, ray.cluster_resources()['CPU'])\n")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    joined = next(line.split() for line in out.stdout.splitlines() if line.startswith("JOINED"))
    assert joined[1].rsplit(":", 1)[1] == ray_head["address"].rsplit(":", 1)[1]  # the head's GCS port
    assert float(joined[2]) == 4.0  # the session head's CPUs, not a new local cluster of 7


def test_workers_get_huge_page_malloc_and_keep_the_users_tunables(ray_head):
    """Every Ray worker bge-ray starts or joins gets glibc.malloc.hugetlb=1 (a CPU step's tensors
    fault in 2 MiB at a time, not 4 KiB) added to the user's own GLIBC_TUNABLES, which it keeps."""
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    script = ("import os, ray\nfrom bge_ray.cluster import connect_ray\nconnect_ray(None)\n"
              "print('WORKER', ray.get(ray.remote(lambda: os.environ.get('GLIBC_TUNABLES')).remote()))\n")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("WORKER"))
    assert seen == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"


def test_worker_env_adds_huge_page_malloc_unless_the_user_chose():
    assert worker_env({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert worker_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    assert worker_env({})["TOKENIZERS_PARALLELISM"] == "false"
