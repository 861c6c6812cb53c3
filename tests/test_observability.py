"""What a run leaves behind (bge_ray/train/trackers.py, progress.py, card.py, console.py): tracker
files read back with each tracker's own reader, the model card and its loading snippet, the
curves, progress lines and the ETA, credentials kept out of everything written."""

from __future__ import annotations

import json
import os
import re
import sys
import time

import numpy as np
import pytest
import torch

from bge_ray.config import FinetuneConfig
from bge_ray.console import ProgressLine
from bge_ray.model.embedder import Embedder
from bge_ray.model.tokenizer import load_tokenizer
from bge_ray.storage import strip_credentials
from bge_ray.train.card import model_card, write_model_card
from bge_ray.train.export import export_model
from bge_ray.train.progress import Clock, format_eval, plot_curves
from bge_ray.train.trackers import MLflow, TensorBoard, Wandb, hyperparameters, scalars

RECORDS = [{"kind": "train", "step": s, "loss": 1.0 / s, "learning_rate": 1e-5 * s, "grad_norm": 2.0,
            "groups_per_s": 3.0, "tokens_per_s": 900.0, "data_wait_frac": 0.01, "epoch": s / 10}
           for s in (2, 4, 6)]
EVALS = [{"kind": "eval", "step": s, "metric": "ndcg@10", "eval_ndcg@10": v, "eval_recall@100": 0.9, "eval_s": 3.0}
         for s, v in ((0, 0.61), (6, 0.70))]


def test_credentials_never_leave_the_config():
    cfg = {"train_data": ["s3://AKIA123:topsecret@bucket/train/", "gs://b/x?X-Amz-Signature=abc&part=1"],
           "eval_data": "https://user:pw@host/eval?token=t&split=test", "storage_path": "s3://bucket/runs",
           "ray_address": "ray://head:10001", "learning_rate": 1e-5}
    clean = strip_credentials(cfg)
    text = json.dumps(clean)
    for secret in ("topsecret", "AKIA123", "abc", "pw@", "token=t", "user:"):
        assert secret not in text, secret
    assert clean["train_data"] == ["s3://bucket/train/", "gs://b/x?part=1"]
    assert clean["eval_data"] == "https://host/eval?split=test" and clean["storage_path"] == "s3://bucket/runs"
    assert hyperparameters(cfg)["train_data"] == "['s3://bucket/train/', 'gs://b/x?part=1']"


def test_records_become_train_and_eval_scalars():
    assert scalars(RECORDS[0]) == {"train/loss": 0.5, "train/learning_rate": 2e-5, "train/grad_norm": 2.0,
                                   "train/groups_per_s": 3.0, "train/tokens_per_s": 900.0,
                                   "train/data_wait_frac": 0.01, "train/epoch": 0.2}
    assert scalars(EVALS[1]) == {"eval/ndcg@10": 0.70, "eval/recall@100": 0.9}


def _log_all(tracker):
    """What a run logs, in the order it happens: zero-shot validation, steps, validation at step 6."""
    for record in [EVALS[0], *RECORDS, EVALS[1]]:
        tracker.log(scalars(record), record["step"])
    tracker.close()


def test_tensorboard_event_files_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_all(TensorBoard(str(tmp_path), "run", {"learning_rate": 1e-5}))
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss")] == [(2, 0.5), (4, 0.25),
                                                                                         (6, 1 / 6)]
    assert [e.step for e in events.Scalars("eval/ndcg_at_10")] == [0, 6]
    assert events.Scalars("train/learning_rate")[-1].value == pytest.approx(6e-5)


def test_wandb_offline_run(tmp_path, monkeypatch):
    """wandb 0.2x+ writes an offline run as a record log that `wandb sync` uploads; its Python side has
    no reader, so the log's bytes are checked for every history key, the config and the run name."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _log_all(Wandb(str(tmp_path), "trial_0001", {"temperature": 0.02, "train_data": "['s3://b/t']"}))
    (run_dir,) = [p for p in (tmp_path / "wandb").iterdir() if p.name.startswith("offline-run-")]
    assert run_dir.name.endswith("-trial_0001")
    (log,) = run_dir.glob("run-trial_0001.wandb")
    deadline = time.time() + 20  # wandb's service process may still be writing after finish() returns
    while b"eval/ndcg@10" not in (data := log.read_bytes()) and time.time() < deadline:
        time.sleep(0.5)
    for key in (b"train/loss", b"train/learning_rate", b"train/tokens_per_s", b"eval/ndcg@10", b"temperature"):
        assert key in data, key
    assert b"0.16666666666666666" in data and b"0.7" in data  # the last loss and the last nDCG@10


def test_mlflow_file_store(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store, in maintenance
    # MLflow tags a run with the git commit of the program's main file: here a script in the temp dir,
    # not pytest's own installation (whose folders the read guard keeps the tests out of)
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "train.py")])
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    tracker = MLflow(str(tmp_path), "run-a", {"temperature": 0.02})
    run_id = tracker.run.info.run_id
    _log_all(tracker)
    client = MlflowClient()
    assert [(m.step, pytest.approx(m.value)) for m in client.get_metric_history(run_id, "train/loss")] == [
        (2, 0.5), (4, 0.25), (6, 1 / 6)]
    assert [m.step for m in client.get_metric_history(run_id, "eval/ndcg_at_10")] == [0, 6]
    assert client.get_run(run_id).data.params["temperature"] == "0.02"
    resumed = MLflow(str(tmp_path), "run-a", {"temperature": 0.02})  # a resumed run continues its tracker run
    assert resumed.run.info.run_id == run_id
    resumed.close()


def test_curves_png(tmp_path):
    path = plot_curves(RECORDS + EVALS, str(tmp_path / "curves.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _exported(tiny_model, out, **values):
    cfg = FinetuneConfig(model_name_or_path=tiny_model, train_data=["s3://key:secret@bucket/train.jsonl"],
                         output_dir=str(out), sentence_pooling_method="mean", **values).to_dict()
    model = Embedder.from_pretrained(tiny_model, pooling="mean").model
    export_model(model, load_tokenizer(tiny_model), model.state_dict(), str(out), cfg)
    return cfg


def test_model_card_shows_the_evaluation_and_its_loading_snippet_runs(tiny_model, tmp_path):
    out = tmp_path / "model"
    cfg = _exported(tiny_model, out, query_instruction_for_retrieval="query: ", eval_data=str(tmp_path))
    evals = {"zero-shot": {"step": 0, "ndcg@10": 0.6123, "recall@100": 0.9}, "best": {"step": 6, "ndcg@10": 0.7045},
             "final": {"step": 12, "ndcg@10": 0.6988}}
    write_model_card(str(out), cfg, {"s3://key:secret@bucket/train.jsonl": 50}, evals)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers")
    assert "| ndcg@10 | 0.6123 | 0.7045 | 0.6988 |" in card
    assert "zero-shot (step 0) | best (step 6) | final (step 12)" in card
    assert "`s3://bucket/train.jsonl` | 50 |" in card and "secret" not in card
    assert f"base_model: {tiny_model}" in card and "| `temperature` | 0.02 |" in card
    snippets = re.findall(r"```python\n(.*?)```", card, re.S)
    namespace: dict = {}
    exec(snippets[0], namespace)  # sentence-transformers, as the card says, with the query prompt
    st_emb = namespace["queries"]
    ours = Embedder.from_pretrained(str(out), pooling="mean", normalize=True).eval()
    tok = load_tokenizer(str(out))
    enc = tok(["query: what causes tides"], return_tensors="pt")
    with torch.no_grad():
        want = ours.encode(enc["input_ids"], enc["attention_mask"]).numpy()
    np.testing.assert_allclose(st_emb, want, atol=1e-5)
    exec("\n".join(["model_dir = " + repr(str(out)), snippets[2]]), namespace)  # transformers + bge-ray's pool
    np.testing.assert_allclose(namespace["embedding"].detach().numpy(), want, atol=1e-5)


def test_a_matryoshka_export_names_its_dims_and_loads_truncated_in_sentence_transformers(tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "m"
    cfg = _exported(tiny_model, out, use_mrl=True, mrl_dims=[32, 16, 8], metric_for_best_model="ndcg@10_dim8")
    assert json.loads((out / "config_sentence_transformers.json").read_text())["matryoshka_dims"] == [32, 16, 8]
    assert json.loads((out / "bge_ray.json").read_text())["matryoshka_dims"] == [32, 16, 8]
    card = model_card(str(out), cfg)
    assert "## Matryoshka" in card and "truncate_dim=8" in card and "--truncate_dim 32 16 8" in card
    full = SentenceTransformer(str(out), device="cpu").encode(["what causes tides"])
    cut = SentenceTransformer(str(out), device="cpu", truncate_dim=8).encode(["what causes tides"], normalize_embeddings=True)
    np.testing.assert_allclose(cut, full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True), atol=1e-5)
    line = format_eval({"step": 4, "metric": "ndcg@10_dim8", "eval_ndcg@10_dim8": 0.5, "eval_ndcg@10": 0.7,
                        "eval_ndcg@10_dim16": 0.6, "eval_s": 1.0})
    assert line == "eval step     4 | ndcg@10_dim8 0.5000 | ndcg@10 by dim full:0.7000 16:0.6000 8:0.5000 | 1s"


def test_a_card_without_evaluation_says_so(tiny_model, tmp_path):
    cfg = _exported(tiny_model, tmp_path / "m")
    card = model_card(str(tmp_path / "m"), cfg)
    assert "No evaluation set was given" in card and "s3://bucket/train.jsonl" in card


def test_progress_lines_come_at_their_cadence_whatever_the_work_does(capsys):
    with ProgressLine("eval m: passages", 100, "passages", every_s=0.2) as progress:
        progress.add(10)
        time.sleep(0.7)  # no new work for a while: the ticker still prints
        progress.add(40)
    lines = [line for line in capsys.readouterr().err.splitlines() if "eval m: passages" in line]
    assert len(lines) >= 3
    assert re.search(r"eval m: passages: 10/100 passages \(10%\) \| [\d.]+/s \| eta \S+", lines[0])
    assert lines[-1].startswith("[bge-ray] eval m: passages: 50 passages in ")


def test_eta_after_a_resume_counts_this_launch_and_leaves_validations_out():
    clock = Clock()
    clock.start = (1000.0, 40)  # this launch's first step: 40 of a run resumed at 39
    clock.eval_s = 30.0  # one validation ran in between
    # 10 steps in 130 s of which 30 s validation: 10 s a step, 50 steps left
    assert clock.eta(50, 100, 1130.0) == pytest.approx(500.0)
    assert Clock().eta(5, 10, 1.0) is None  # no rate yet


def test_metrics_file_of_a_resumed_run_keeps_the_lines_before_the_resume(tmp_path):
    from bge_ray.train.progress import RunLog

    run_dir = str(tmp_path)
    first = RunLog(time.time(), run_dir)
    first.handle({"records": [dict(r, time=time.time(), total_steps=6) for r in RECORDS]})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    resumed = RunLog(time.time(), run_dir, resumed_at=4)  # the checkpoint was at step 4: step 6 is trained again
    resumed.handle({"records": [dict(RECORDS[2], loss=0.3, time=time.time(), total_steps=6)]})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(2, 0.5), (4, 0.25), (6, 0.3)]
    assert [r["step"] for r in resumed.history] == [2, 4, 6]
    assert os.path.exists(resumed.finish())
