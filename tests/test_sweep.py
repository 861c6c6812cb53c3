"""bge-ray tune: a real sweep on the session's Ray cluster (Tune function -> TorchTrainer -> DeepSpeed)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from bge_ray.config import load_config
from bge_ray.errors import ConfigError
from bge_ray.sweep.run import tune
from bge_ray.sweep.space import load_sweep
from tests.helpers import FE_EXAMPLES, REPO


@pytest.fixture(scope="module")
def memorize_eval(tmp_path_factory):
    """A BEIR folder whose queries are the training queries and whose corpus is their passages:
    a learning rate that trains raises nDCG within a few steps; one that does not, does not."""
    d = tmp_path_factory.mktemp("memorize")
    with open(FE_EXAMPLES, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    ids: dict[str, str] = {}
    for r in rows:
        for t in r["pos"] + r["neg"]:
            ids.setdefault(t, f"d{len(ids)}")
    (d / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for t, i in ids.items()))
    (d / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{n}", "text": r["query"]}) + "\n"
                                             for n, r in enumerate(rows)))
    (d / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{n}\t{ids[p]}\t1\n" for n, r in enumerate(rows) for p in r["pos"]))
    return str(d)


def sweep_file(tmp_path, tiny_model, eval_dir, **extra) -> str:
    doc = {
        "model_name_or_path": tiny_model, "train_data": [FE_EXAMPLES], "train_group_size": 4,
        "query_max_len": 32, "passage_max_len": 64, "per_device_train_batch_size": 4, "num_workers": 2,
        "deepspeed": "zero2", "max_steps": 4, "eval_steps": 2, "logging_steps": 2, "eval_data": eval_dir,
        "output_dir": str(tmp_path / "best"), "storage_path": str(tmp_path / "storage"),
        "search_space": {
            # grid order (first axis fastest): a trial that learns comes first, so the frozen one
            # after it is certain to fall below ASHA's cut at the first validation
            "learning_rate": {"grid": [3.0e-3, 1.0e-9]},
            "sentence_pooling_method": {"grid": ["mean", "cls"]},
            "temperature": {"loguniform": [0.02, 0.1]},
        },
        "tune": {"num_samples": 1, "grace_period": 1, "reduction_factor": 2},
    }
    doc.update(extra)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_sweep_stops_weak_trials_and_exports_the_best(ray_cluster, tiny_model, memorize_eval, tmp_path):
    result = tune(sweep_file(tmp_path, tiny_model, memorize_eval))
    trials = result.trials
    assert len(trials) == 4
    combos = {(t["params"]["learning_rate"], t["params"]["sentence_pooling_method"]) for t in trials}
    assert combos == {(lr, p) for lr in (1e-9, 3e-3) for p in ("cls", "mean")}
    assert all(0.02 <= t["params"]["temperature"] <= 0.1 for t in trials)
    statuses = [t["status"] for t in trials]
    assert set(statuses) <= {"completed", "stopped early"}
    assert result.num_stopped_early == statuses.count("stopped early") >= 1
    stopped = {(t["params"]["learning_rate"], t["params"]["sentence_pooling_method"])
               for t in trials if t["status"] == "stopped early"}
    assert (1e-9, "mean") in stopped  # frozen, validated right after a trial that learned
    for t in trials:
        if t["status"] == "stopped early":
            assert t["last_step"] < 4
        else:
            assert t["last_step"] == 4 and t["reports"] == 2
    # sorted by the metric; the best is the one exported
    metrics = [t["best_metric"] for t in trials]
    assert metrics == sorted(metrics, reverse=True) and result.best_metric == metrics[0]
    best = trials[0]
    # training moved the metric only where the learning rate could (near-tied scores of a random
    # tiny model may still flip under a 1e-9 step, hence the small band)
    for t in trials:
        if t["params"]["learning_rate"] == 1e-9:
            assert max(h["metric"] for h in t["history"]) == pytest.approx(t["zero_shot"], abs=0.02)
    assert best["params"]["learning_rate"] == 3e-3 and best["best_metric"] > best["zero_shot"] + 0.05

    # the best model: a normal fine-tune output with the pooling it was trained with
    from sentence_transformers import SentenceTransformer

    meta = json.load(open(os.path.join(result.model_dir, "bge_ray.json"), encoding="utf-8"))
    assert meta["sentence_pooling_method"] == best["params"]["sentence_pooling_method"]
    assert meta["training_config"]["temperature"] == pytest.approx(best["params"]["temperature"])
    emb = SentenceTransformer(result.model_dir, device="cpu").encode(["a query"])
    assert emb.shape == (1, 32)

    # the best config trains as is
    cfg = load_config(result.best_config_path)
    assert cfg.learning_rate == best["params"]["learning_rate"]
    assert cfg.sentence_pooling_method == best["params"]["sentence_pooling_method"]
    with open(os.path.join(result.results_dir, "trials.csv"), encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [r["trial"] for r in table] == [t["trial_id"] for t in trials]
    assert "| rank | trial |" in open(os.path.join(result.results_dir, "trials.md"), encoding="utf-8").read()
    with open(os.path.join(result.results_dir, "sweep.png"), "rb") as f:
        png = f.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # the same command again is refused: the best model it exported is not replaced unasked
    with pytest.raises(ConfigError, match="already holds a model: set overwrite_output_dir"):
        tune(sweep_file(tmp_path, tiny_model, memorize_eval))
    # asked, it continues the same experiment instead of starting over
    again = tune(sweep_file(tmp_path, tiny_model, memorize_eval, overwrite_output_dir=True))
    assert again.experiment_path == result.experiment_path
    assert {t["trial_id"] for t in again.trials} == {t["trial_id"] for t in trials}


@pytest.mark.parametrize(("space", "message"), [
    ({"temprature": {"choice": [0.02]}}, "unknown config key 'temprature'.*did you mean 'temperature'"),
    ({"per_device_train_batch_size": {"uniform": [2, 8]}}, "uniform needs a float field.*use randint"),
    ({"learning_rate": {"loguniform": [0, 1e-4]}}, "loguniform needs low > 0"),
    ({"temperature": {"uniform": [-0.1, 0.1]}}, r"search_space.temperature = -0.1 .*temperature must be > 0"),
    ({"sentence_pooling_method": {"choice": ["cls", "max"]}}, "sentence_pooling_method must be one of"),
    ({"gradient_checkpointing": {"choice": ["maybe"]}}, "gradient_checkpointing must be bool"),
    ({"output_dir": {"choice": ["a", "b"]}}, "output_dir cannot be swept"),
    ({"temperature": {"normal": [0.1, 0.01]}}, "unknown distribution 'normal'"),
    ({"train_group_size": {"randint": [0, 4]}}, "train_group_size must be >= 1"),
    ({"mrl_dims": {"choice": [[32, 16]]}}, r"search_space.mrl_dims = \[32, 16\] .*use_mrl is off"),
])
def test_bad_search_space_fails_before_ray(tmp_path, tiny_model, memorize_eval, space, message):
    import ray

    was_up = ray.is_initialized()
    with pytest.raises(ConfigError, match=message):
        load_sweep(sweep_file(tmp_path, tiny_model, memorize_eval, search_space=space))
    assert ray.is_initialized() == was_up


def test_sweep_settings_and_overrides(tmp_path, tiny_model, memorize_eval):
    path = sweep_file(tmp_path, tiny_model, memorize_eval)
    sweep = load_sweep(path, ["--num_samples", "3", "--max_steps", "8", "--search_alg", "random",
                              "--search_space", '{"temperature": {"choice": [0.02, 0.05]}}'])
    assert sweep.settings.num_samples == 3 and sweep.train["max_steps"] == "8"
    assert list(sweep.space) == ["temperature"] and sweep.space["temperature"].args == [0.02, 0.05]
    with pytest.raises(ConfigError, match="grid axes need search_alg: random"):
        load_sweep(path, ["--search_alg", "optuna"])
    with pytest.raises(ConfigError, match="a sweep picks its best trial by a validation metric"):
        load_sweep(path, ["--eval_data", "none"])
    with pytest.raises(ConfigError, match="scheduler must be asha or none"):
        load_sweep(path, ["--scheduler", "hyperband"])
    default = load_sweep(path, ["--search_space", "null"])
    assert set(default.space) == {"temperature", "learning_rate", "sentence_pooling_method"}
    # the training values every trial starts from: typed, validated, the swept field at its first value
    base = sweep.base_config()
    assert base.max_steps == 8 and base.temperature == 0.02 and base.num_workers == 2


def test_search_space_becomes_tunes_domains(tmp_path, tiny_model, memorize_eval):
    from ray import tune as rtune
    from ray.tune.search.sample import Categorical, Float, Integer

    from bge_ray.sweep.run import tune_config, tune_domain

    space = {"temperature": {"loguniform": [0.01, 0.1]}, "learning_rate": {"uniform": [1e-5, 5e-5]},
             "sentence_pooling_method": {"choice": ["cls", "mean"]}, "train_group_size": {"randint": [2, 5]},
             "normalize_embeddings": {"grid": [True, False]}, "query_max_len": {"choice": ["16", 32]}}
    sweep = load_sweep(sweep_file(tmp_path, tiny_model, memorize_eval, search_space=space))
    domains = {n: tune_domain(d) for n, d in sweep.space.items()}
    assert isinstance(domains["temperature"], Float) and (domains["temperature"].lower,
                                                          domains["temperature"].upper) == (0.01, 0.1)
    assert isinstance(domains["temperature"].sampler, Float._LogUniform)
    assert isinstance(domains["learning_rate"], Float) and not isinstance(domains["learning_rate"].sampler,
                                                                           Float._LogUniform)
    assert isinstance(domains["sentence_pooling_method"], Categorical)
    assert domains["sentence_pooling_method"].categories == ["cls", "mean"]
    assert isinstance(domains["train_group_size"], Integer) and domains["train_group_size"].upper == 5
    assert domains["normalize_embeddings"] == rtune.grid_search([True, False])
    assert sweep.space["query_max_len"].args == [16, 32]  # values typed as the field
    mrl = load_sweep(sweep_file(tmp_path, tiny_model, memorize_eval, use_mrl=True,
                                search_space={"mrl_dims": {"choice": [[32, 16], ["32", 8]]},
                                              "mrl_weights": {"grid": [None, [1, 0.5]]}}))
    assert mrl.space["mrl_dims"].args == [[32, 16], [32, 8]] and mrl.space["mrl_weights"].args == [None, [1.0, 0.5]]
    assert tune_domain(mrl.space["mrl_dims"]).categories == [[32, 16], [32, 8]]
    with pytest.raises(ConfigError, match=r"search_space.mrl_weights = \[1.0\] .*one weight >= 0 per mrl_dims"):
        load_sweep(sweep_file(tmp_path, tiny_model, memorize_eval, use_mrl=True, mrl_dims=[32, 16],
                              search_space={"mrl_weights": {"choice": [[1]]}}))
    m3 = load_sweep(sweep_file(tmp_path, tiny_model, memorize_eval, unified_finetuning=True,
                               metric_for_best_model="ndcg@10_hybrid",
                               search_space={"m3_loss_weights": {"grid": [[1, 0.1, 1], [1, 1, 1]]},
                                             "m3_score_weights": {"choice": [[1, 0.3, 1], [0.4, 0.2, 0.4]]}}))
    assert m3.space["m3_loss_weights"].args == [[1.0, 0.1, 1.0], [1.0, 1.0, 1.0]]
    assert tune_domain(m3.space["m3_score_weights"]).categories == [[1.0, 0.3, 1.0], [0.4, 0.2, 0.4]]
    with pytest.raises(ConfigError, match=r"search_space.m3_loss_weights = \[1.0, 1.0\] .*three weights >= 0"):
        load_sweep(sweep_file(tmp_path, tiny_model, memorize_eval, unified_finetuning=True,
                              search_space={"m3_loss_weights": {"choice": [[1, 1]]}}))
    settings = tune_config(sweep, concurrency=2)
    assert settings.metric == "eval_ndcg@10" and settings.mode == "max" and settings.num_samples == 1
    assert settings.scheduler._time_attr == "validations"


GROWABLE = """
import sys
import ray
from ray.core.generated import autoscaler_pb2
from ray.experimental import internal_kv
from bge_ray.config import load_config
from bge_ray.sweep.run import trial_concurrency

ray.init(address=sys.argv[1])
# what an autoscaler publishes: its node types and how many of each it may launch (none launched yet)
config = autoscaler_pb2.ClusterConfig()
head = config.node_group_configs.add(name="head", max_count=1)
head.resources["CPU"] = 3
gpus = config.node_group_configs.add(name="gpu_4x_a10g", max_count=4)
gpus.resources.update({"CPU": 48, "GPU": 4, "accelerator_type:A10G": 1})
internal_kv._internal_kv_put(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), config.SerializeToString(),
                             namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode())
cfg = load_config(None, sys.argv[2:])
print("concurrent trials:", trial_concurrency(cfg, None), "GPUs now:", ray.cluster_resources().get("GPU", 0))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def fixed_head(tmp_path):
    """A second real Ray head of exactly 3 CPUs and no autoscaler (the size a sweep hung on)."""
    port = _free_port()
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=3", "--include-dashboard=false", f"--temp-dir=/tmp/brf-{os.getpid()}",
                             "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        for _ in range(120):
            if subprocess.run(["ray", "health-check", "--address", address], capture_output=True).returncode == 0:
                break
            time.sleep(1)
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


@pytest.mark.slow
def test_sweeps_on_a_fixed_cluster_fail_fast_and_size_by_what_an_autoscaler_can_add(fixed_head, tiny_model, tmp_path):
    # the command that waited forever: 3 CPUs, a trial needs 2 workers + its function + a whole data CPU
    proc = subprocess.run(
        ["bge-ray", "tune", "--config", os.path.join(REPO, "jobs", "configs", "sweep.yaml"), "--num_samples", "3",
         "--max_steps", "10", "--output_dir", str(tmp_path / "sweep"), "--storage_path", str(tmp_path / "runs"),
         "--ray_address", fixed_head],
        capture_output=True, text=True, timeout=180, cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265"})  # the job API's address, exported: ignored
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "one trial needs 4 CPU (3 there)" in proc.stderr and "it has no autoscaler to add nodes" in proc.stderr
    assert "RAY_ADDRESS=http://127.0.0.1:8265 is the job API" in proc.stderr
    train = subprocess.run(  # a run too: 3 workers and a whole CPU for the data tasks cannot fit 3 CPUs
        ["bge-ray", "train", "--model_name_or_path", tiny_model, "--train_data", FE_EXAMPLES, "--num_workers", "3",
         "--output_dir", str(tmp_path / "model"), "--storage_path", str(tmp_path / "runs"), "--ray_address", fixed_head],
        capture_output=True, text=True, timeout=180, cwd=REPO)
    assert train.returncode == 2 and "cannot hold this run" in train.stderr and "4 CPU (3 there)" in train.stderr, (
        train.stderr[-3000:])
    # the same cluster once an autoscaler has published GPU node types it may add: 0 GPUs now, and
    # as many trials at once as its 4 nodes of 4 GPUs hold (2 workers x 1 GPU each: 8)
    grow = subprocess.run(
        [sys.executable, "-c", GROWABLE, fixed_head, "--model_name_or_path", tiny_model, "--train_data", FE_EXAMPLES,
         "--output_dir", str(tmp_path / "out"), "--num_workers", "2", "--use_gpu", "true",
         "--resources_per_worker", '{"CPU": 4, "GPU": 1}', "--accelerator_type", "A10G"],
        capture_output=True, text=True, timeout=180, cwd=REPO)
    assert grow.returncode == 0, grow.stderr[-3000:]
    assert "concurrent trials: 8 GPUs now: 0" in grow.stdout
    assert "autoscaler can grow it to 8 trial(s)" in grow.stderr


def test_a_reranker_sweeps_its_own_fields_and_refuses_an_embedders(tmp_path, tiny_model, memorize_eval):
    """``task: reranker`` in a sweep file: every trial is a reranker fine-tune validated by reranking the
    retriever's top k; a searched value a reranker has no use for is refused before Ray, with the reason."""
    reranker = {"task": "reranker", "eval_retriever": tiny_model, "eval_rerank_top_k": 10,
                "search_space": {"learning_rate": {"loguniform": [1e-5, 1e-4]}, "train_group_size": {"choice": [2, 4]}}}
    sweep = load_sweep(sweep_file(tmp_path, tiny_model, memorize_eval, **reranker))
    base = sweep.base_config()
    assert (base.task, base.eval_retriever, base.eval_rerank_top_k) == ("reranker", tiny_model, 10)
    with pytest.raises(ConfigError, match=r"search_space.temperature = 0.05 .*embedder settings in a reranker run"):
        load_sweep(sweep_file(tmp_path, tiny_model, memorize_eval,
                              **{**reranker, "search_space": {"temperature": {"choice": [0.05]}}}))
