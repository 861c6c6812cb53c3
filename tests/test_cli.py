"""The `bge-ray train` door and `jobs/finetune.py`, as a user runs them (subprocesses)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from bge_ray.cli import config_reference, main
from bge_ray.config import FinetuneConfig
from bge_ray.sweep.space import TuneSettings
from bge_ray.tools.config import MineConfig, ScoreConfig
from tests.helpers import FE_EXAMPLES, REPO


def _run(args, env_extra=None, timeout=600):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.mark.parametrize("command, cls", [("train", FinetuneConfig), ("mine", MineConfig), ("score", ScoreConfig),
                                          ("tune", TuneSettings)])
def test_help_explains_every_key(command, cls, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for f in dataclasses.fields(cls):
        assert len(f.metadata["help"]) >= 10, f"{cls.__name__}.{f.name} has no meaning in its help"
        (at,) = [i for i, line in enumerate(lines) if line.startswith(f"  --{f.name} ")]
        assert lines[at + 1].strip() and f.metadata["help"].startswith(lines[at + 1].strip()), f.name
    for name in getattr(cls, "IGNORED", {}):
        assert f"  --{name}: " in out


def test_config_reference_is_current():
    with open(os.path.join(REPO, "docs", "config.md"), encoding="utf-8") as f:
        assert f.read() == config_reference(), "docs/config.md is stale: run python scripts/config_reference.py"


def test_installed_command_prints_help():
    proc = _run(["bge-ray", "train", "--help"])
    assert proc.returncode == 0 and "--negatives_cross_device bool (default: false)" in proc.stdout


def test_bad_config_fails_fast_without_ray(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model_name_or_path: x\ntrain_data: [{FE_EXAMPLES}]\noutput_dir: {tmp_path}/o\n")
    proc = _run(["bge-ray", "train", "--config", str(config), "--temprature", "0.1"])
    assert proc.returncode == 2
    assert "did you mean 'temperature'" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
    proc = _run([sys.executable, "jobs/finetune.py", "--config", str(config), "--fp16", "--bf16", "--use_gpu"])
    assert proc.returncode == 2 and "pick one" in proc.stderr


def test_bad_data_names_file_and_line(ray_cluster, tiny_model, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]}) + "\n" + '{"query": 1}\n')
    address = ray_cluster.get_runtime_context().gcs_address
    proc = _run(["bge-ray", "train", "--model_name_or_path", tiny_model, "--train_data", str(data),
                 "--output_dir", str(tmp_path / "o"), "--train_group_size", "2"], {"RAY_ADDRESS": address})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{data}:2: 'query' must be a string" in proc.stderr


def test_train_door_end_to_end(ray_cluster, tiny_model, tmp_path):
    """`bge-ray train` as a user runs it (jobs/finetune.py, the same door, runs in test_cluster's job test)."""
    out = tmp_path / "model"
    args = ["--model_name_or_path", tiny_model, f"--train_data={FE_EXAMPLES}", "--output_dir", str(out),
            "--storage_path", str(tmp_path / "storage"), "--num_workers", "2", "--deepspeed", "zero1",
            "--per_device_train_batch_size", "4", "--train_group_size", "2", "--max_steps", "2",
            "--logging_steps", "1", "--passage_max_len", "32", "--sentence_pooling_method", "mean"]
    proc = _run(["bge-ray", "train", *args], {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"fine-tuned model: {out}" in proc.stdout
    assert "step     2/2 | epoch" in proc.stdout  # the driver's progress lines
    assert (out / "model.safetensors").exists() and (out / "modules.json").exists()


def test_eval_door_and_job_script_share_the_parser():
    for cmd in (["bge-ray", "eval", "--help"], [sys.executable, "jobs/evaluate.py", "--help"]):
        proc = _run(cmd)
        assert proc.returncode == 0 and "--ignore_identical_ids" in proc.stdout and "--model" in proc.stdout


def test_eval_rejects_bad_cutoffs(tmp_path):
    proc = _run(["bge-ray", "eval", "--model", "m", "--data", str(tmp_path), "--k", "10,x"])
    assert proc.returncode == 2 and "--k must be integers" in proc.stderr
    proc = _run(["bge-ray", "eval", "--model", "m", "--data", str(tmp_path), "--truncate_dim", "64", "half"])
    assert proc.returncode == 2 and "--truncate_dim must be integers" in proc.stderr


def test_eval_refuses_m3_modes_for_a_model_without_the_heads_before_ray(tiny_model, tmp_path):
    proc = _run(["bge-ray", "eval", "--model", tiny_model, "--data", str(tmp_path), "--modes", "dense,sparse"])
    assert proc.returncode == 2 and "has no BGE-M3 heads" in proc.stderr
    assert "Ray" not in proc.stderr.replace("bge-ray", "")
    proc = _run(["bge-ray", "eval", "--model", tiny_model, "--data", str(tmp_path),
                 "--weights_for_different_modes", "1", "x", "1"])
    assert proc.returncode == 2 and "--weights_for_different_modes must be numbers" in proc.stderr


def test_cloud_models_and_output_dirs_are_refused_before_ray_starts(tmp_path):
    proc = _run(["bge-ray", "eval", "--model", "s3://bucket/model", "--data", str(tmp_path)])
    assert proc.returncode == 2 and "models are read from a local folder" in proc.stderr
    assert "Ray" not in proc.stderr.replace("bge-ray", "")  # refused before any cluster work
    proc = _run(["bge-ray", "train", "--model_name_or_path", "m", "--train_data", str(tmp_path),
                 "--output_dir", "s3://b/m"])
    assert proc.returncode == 2 and "output_dir must be a local folder" in proc.stderr
