"""End to end on the shared Ray cluster: 2 TorchTrainer workers (gloo), DeepSpeed on CPU, tiny BERTs."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from ray.train import UserCallback

import bge_ray
from bge_ray.config import FinetuneConfig
from bge_ray.data.collate import GroupCollator
from bge_ray.data.pipeline import tokenize_rows
from bge_ray.data.text import TextSpec
from bge_ray.data.triplets import ROW_SCHEMA, RowRules, parse_line, sample_row
from bge_ray.model.embedder import Embedder
from bge_ray.model.loss import contrastive_loss
from bge_ray.model.tokenizer import load_tokenizer
from bge_ray.train.launch import default_run_name
from tests.helpers import FE_DS_STAGE0, FE_EXAMPLES, fe_same_dataset_args, make_beir_subset

TEXTS = ["What is the capital of France?", "Paris is the capital and largest city of France.",
         "a much longer passage about contrastive learning of text embeddings for dense retrieval"]


def dataset_loss(model_dir: str, cfg: dict) -> float:
    """The training loss over the whole data set with one fixed draw of groups (no Ray)."""
    import pyarrow as pa

    with open(cfg["train_data"][0], encoding="utf-8") as f:
        rows = [sample_row(parse_line(line.encode(), "f", i, RowRules(cfg["train_group_size"])), cfg["train_group_size"],
                           seed=123, epoch=0) for i, line in enumerate(f, 1)]
    spec = TextSpec(tokenizer=model_dir, query_max_len=cfg["query_max_len"], passage_max_len=cfg["passage_max_len"])
    tokenized = tokenize_rows(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), spec).to_pydict()
    tok = load_tokenizer(model_dir)
    batch = GroupCollator(cfg["train_group_size"], pad_token_id=tok.pad_token_id)(tokenized)
    model = Embedder.from_pretrained(model_dir, pooling=cfg["sentence_pooling_method"], normalize=True).eval()
    with torch.no_grad():
        q, p = model(*(torch.as_tensor(batch[k]) for k in ("q_input_ids", "q_attention_mask", "p_input_ids",
                                                            "p_attention_mask")))
        return contrastive_loss(q, p, cfg["temperature"]).item()


@pytest.fixture(scope="module")
def zero2_run(ray_cluster, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2")
    cfg = {
        "model_name_or_path": tiny_model, "train_data": [FE_EXAMPLES], "output_dir": str(out / "model"),
        "storage_path": str(out / "storage"), "num_workers": 2, "deepspeed": "zero2",
        "per_device_train_batch_size": 4, "train_group_size": 4, "query_max_len": 32, "passage_max_len": 64,
        "sentence_pooling_method": "mean", "temperature": 0.05, "learning_rate": 1e-3, "warmup_ratio": 0.1,
        "num_train_epochs": 2, "logging_steps": 2, "save_steps": 6, "seed": 3,
        "eval_data": make_beir_subset(str(out / "eval"), n_queries=8, n_extra_docs=30), "eval_steps": 6,
    }
    result = bge_ray.finetune(cfg, callbacks=[ReportRecorder(str(out / "reports.jsonl"))])
    return cfg, result


class ReportRecorder(UserCallback):
    """A user's Ray Train callback: appends every report it sees (on the Train controller) to a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:  # noqa: ANN001 - Ray's signature
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: v for k, v in metrics[0].items() if k != "records"}) + "\n")


def test_every_measurement_reaches_the_console_history_metrics_file_and_callbacks(zero2_run, capfd):
    cfg, result = zero2_run
    run_dir = os.path.join(cfg["storage_path"], default_run_name(FinetuneConfig(**cfg)))
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    logged = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in logged] == [m["step"] for m in result.history] == [2, 4, 6, 8, 10, 12]
    assert [r["loss"] for r in logged] == [m["loss"] for m in result.history]
    assert [r["step"] for r in lines if r["kind"] == "eval"] == [e["step"] for e in result.evals] == [0, 6, 12]
    assert [r["step"] for r in lines if r["kind"] == "first_step"] == [1]
    with open(os.path.join(os.path.dirname(cfg["output_dir"]), "reports.jsonl"), encoding="utf-8") as f:
        seen = [json.loads(line) for line in f]
    # the user's callback saw the loss, not only checkpoints: every report carries the latest log record
    assert [r["step"] for r in seen if r["kind"] == "eval"] == [0, 6] and seen[-1]["kind"] == "final"
    assert {r["step"] for r in seen if "loss" in r} >= {6, 12}
    # TensorBoard (report_to's default), read with TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([m["loss"] for m in result.history])
    assert len(events.Scalars("train/learning_rate")) == 6
    assert [e.step for e in events.Scalars("eval/ndcg_at_10")] == [0, 6, 12]
    with open(os.path.join(run_dir, "curves.png"), "rb") as f:
        assert f.read(4) == b"\x89PNG"
    # the published model's card shows what the run measured
    card = open(os.path.join(result.model_dir, "README.md"), encoding="utf-8").read()
    zero, best = result.metrics["zero_shot_ndcg@10"], result.metrics["best_eval_ndcg@10"]
    assert f"| ndcg@10 | {zero:.4f} | {best:.4f} |" in card and f"`{cfg['train_data'][0]}` | 50 |" in card
    assert all("loss" in r for r in seen if r.get("step", 0) >= 2)  # once step 2 logged a loss, every report has one


def test_zero2_two_workers_lowers_loss_and_exports(zero2_run, tiny_model):
    cfg, result = zero2_run
    # 50 rows / (2 workers x 4) = 6 steps per epoch, 2 epochs
    assert result.metrics["step"] == 12 and result.metrics["total_steps"] == 12
    assert result.metrics["world_size"] == 2 and result.num_rows == 50
    assert np.isfinite(result.metrics["train_loss"]) and result.metrics["tokens_per_s"] > 0
    assert [m["step"] for m in result.history] == [2, 4, 6, 8, 10, 12]  # every logging_steps, on the driver
    assert result.metrics["launch_to_first_step_s"] > 0
    last_model = os.path.join(result.checkpoint.path, "model")  # output_dir holds the best-measured one
    before, after = dataset_loss(tiny_model, cfg), dataset_loss(last_model, cfg)
    assert after < 0.8 * before, (before, after)
    files = set(os.listdir(result.model_dir))
    assert {"model.safetensors", "config.json", "tokenizer.json", "modules.json", "bge_ray.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    with open(os.path.join(result.model_dir, "1_Pooling", "config.json")) as f:
        pooling = json.load(f)
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]


def test_validation_during_training_exports_the_best(zero2_run):
    from safetensors.torch import load_file

    _, result = zero2_run
    assert [e["step"] for e in result.evals] == [0, 6, 12]  # zero-shot, every eval_steps, the end
    m = result.metrics
    assert 0 <= m["zero_shot_ndcg@10"] <= 1 and 0 <= m["eval_ndcg@10"] <= 1
    assert m["zero_shot_ndcg@10"] == result.evals[0]["eval_ndcg@10"]
    best = max(result.evals[1:], key=lambda e: e["eval_ndcg@10"])
    assert m["best_step"] == best["step"] and m["best_eval_ndcg@10"] == best["eval_ndcg@10"]
    run_dir = os.path.dirname(result.checkpoint.path)
    best_model = os.path.join(run_dir, f"checkpoint_step_{best['step']:08d}", "model", "model.safetensors")
    exported = load_file(os.path.join(result.model_dir, "model.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in load_file(best_model).items())


def test_checkpoints_hold_deepspeed_state(zero2_run):
    cfg, result = zero2_run
    run_dir = os.path.dirname(result.checkpoint.path)
    ckpts = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_step_"))
    assert ckpts == ["checkpoint_step_00000006", "checkpoint_step_00000012"]
    mid = os.path.join(run_dir, ckpts[0])
    with open(os.path.join(mid, "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == 6
    shards = os.listdir(os.path.join(mid, "deepspeed"))
    # ZeRO-2: one optimizer shard per worker, merged from both workers into one checkpoint
    assert sum("optim_states" in s for s in shards) == 2


def test_same_embeddings_in_transformers_sentence_transformers_and_flagembedding(zero2_run):
    from sentence_transformers import SentenceTransformer

    _, result = zero2_run
    model = Embedder.from_pretrained(result.model_dir, pooling="mean", normalize=True).eval()
    tok = load_tokenizer(result.model_dir)
    enc = tok(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        ours = model.encode(enc["input_ids"], enc["attention_mask"]).numpy()
    st = SentenceTransformer(result.model_dir, device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(st, ours, atol=1e-5)

    from tests.flagembedding_compat import import_flag_model

    FlagModel = import_flag_model()
    fe = FlagModel(result.model_dir, pooling_method="mean", normalize_embeddings=True, use_fp16=False,
                   devices="cpu").encode(TEXTS, max_length=64)
    np.testing.assert_allclose(fe, ours, atol=1e-5)


def _with_scores(src: str, dst: str) -> str:
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for line in f:
            row = json.loads(line)
            row["pos_scores"] = [5.0] * len(row["pos"])
            row["neg_scores"] = [float(-i) for i in range(len(row["neg"]))]
            out.write(json.dumps(row) + "\n")
    return dst


def test_zero3_cross_device_distillation_cls_checkpointing_matryoshka(ray_cluster, tiny_model, tmp_path):
    """ZeRO-3, cross-device negatives, m3 KD, gradient checkpointing, GradCache and Matryoshka at once;
    validation at each Matryoshka cut, the best checkpoint picked by the smallest."""
    data = _with_scores(FE_EXAMPLES, str(tmp_path / "scored.jsonl"))
    result = bge_ray.finetune({
        "model_name_or_path": tiny_model, "train_data": [data], "output_dir": str(tmp_path / "model"),
        "storage_path": str(tmp_path / "storage"), "num_workers": 2, "deepspeed": "zero3",
        "per_device_train_batch_size": 4, "train_group_size": 3, "query_max_len": 16, "passage_max_len": 32,
        "sentence_pooling_method": "cls", "negatives_cross_device": True, "knowledge_distillation": True,
        "kd_loss_type": "m3_kd_loss", "gradient_checkpointing": True, "gradient_accumulation_steps": 2,
        "learning_rate": 5e-4, "max_steps": 3, "logging_steps": 1, "save_steps": 100,
        "query_instruction_for_retrieval": "query: ", "sub_batch_size": 5,  # GradCache: 4 query, 12 passage rows
        "use_mrl": True, "mrl_dims": [32, 16, 8], "metric_for_best_model": "ndcg@10_dim8", "eval_steps": 3,
        "eval_data": make_beir_subset(str(tmp_path / "eval"), n_queries=6, n_extra_docs=10),
    })
    assert result.metrics["step"] == 3
    evals = [r for r in result.evals if r["step"] == 3]
    assert evals and {"eval_ndcg@10", "eval_ndcg@10_dim32", "eval_ndcg@10_dim16", "eval_ndcg@10_dim8"} <= set(evals[0])
    assert evals[0]["eval_ndcg@10_dim32"] == evals[0]["eval_ndcg@10"]  # 32 is the whole embedding
    assert "best_eval_ndcg@10_dim8" in result.metrics
    from safetensors.torch import load_file

    trained = load_file(os.path.join(result.model_dir, "model.safetensors"))
    base = load_file(os.path.join(tiny_model, "model.safetensors"))
    assert set(trained) == set(base)  # ZeRO-3 consolidated every full tensor
    assert all(trained[k].shape == base[k].shape for k in base)
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    with open(os.path.join(result.model_dir, "config_sentence_transformers.json")) as f:
        st_config = json.load(f)
    assert st_config["prompts"] == {"query": "query: "} and st_config["matryoshka_dims"] == [32, 16, 8]
    with open(os.path.join(result.model_dir, "1_Pooling", "config.json")) as f:
        assert json.load(f)["pooling_mode_cls_token"] is True


def test_rerun_of_a_finished_run_starts_fresh_and_unfinished_one_resumes(zero2_run, tmp_path):
    from bge_ray.config import resolve_config
    from bge_ray.errors import ConfigError
    from bge_ray.train.launch import resolve_run_name

    cfg, result = zero2_run
    with pytest.raises(ConfigError, match="already holds a model: set overwrite_output_dir"):
        bge_ray.finetune(cfg)  # FlagEmbedding's rule: the model the run wrote is not replaced unasked
    config = resolve_config(cfg)
    storage, run = cfg["storage_path"], default_run_name(config)
    # the real finished run: a rerun of the same command trains again under a new name
    fresh, resumed_at = resolve_run_name(config, storage)
    assert fresh.startswith(run + "-") and resumed_at is None
    # an unfinished run (newest checkpoint not final) is continued under its own name
    unfinished = tmp_path / run / "checkpoint_step_00000006"
    unfinished.mkdir(parents=True)
    (unfinished / "trainer_state.json").write_text(json.dumps({"global_step": 6, "epoch": 0}))
    assert resolve_run_name(config, str(tmp_path)) == (run, 6)
    config.resume = "never"
    assert resolve_run_name(config, str(tmp_path))[0] != run


def test_a_rerun_trains_the_same_batches_to_the_same_losses(zero2_run, tmp_path):
    """The same seed, config and worker count: the same batches in the same order whatever Ray's task
    scheduling, so the same loss at every step."""
    cfg, first = zero2_run
    again = bge_ray.finetune(dict(cfg, output_dir=str(tmp_path / "again"), storage_path=str(tmp_path / "runs"),
                                  eval_data=None))

    def losses(result):
        return [(r["step"], r["loss"]) for r in result.history if r.get("kind") == "train"]

    assert len(losses(first)) == 6
    assert losses(again) == pytest.approx(losses(first), rel=1e-6)


@pytest.mark.skipif(not __import__("bge_ray.config.finetune", fromlist=["x"]).cpu_supports_bf16(),
                    reason="this CPU has no bf16 (AVX512-BF16 / AMX)")
def test_bf16_on_cpu_trains_and_exports_fp32_master_weights(ray_cluster, tiny_model, tmp_path):
    from safetensors.torch import load_file

    cfg = {
        "model_name_or_path": tiny_model, "train_data": [FE_EXAMPLES], "output_dir": str(tmp_path / "model"),
        "storage_path": str(tmp_path / "storage"), "num_workers": 2, "deepspeed": "zero2", "bf16": True,
        "attention_dropout": 0.0, "per_device_train_batch_size": 4, "train_group_size": 4, "query_max_len": 32,
        "passage_max_len": 64, "sentence_pooling_method": "mean", "temperature": 0.05, "learning_rate": 1e-3,
        "num_train_epochs": 3, "logging_steps": 3, "save_steps": 100, "seed": 3,
        "group_by_length": True,  # regrouped batches: the same 6 per worker and epoch
    }
    result = bge_ray.finetune(cfg)
    assert result.metrics["step"] == 18
    # bf16 kernels on CPU are not bit-reproducible run to run: 2 epochs ended at 0.78-0.81 of the start
    assert dataset_loss(result.model_dir, cfg) < 0.8 * dataset_loss(tiny_model, cfg)
    weights = load_file(os.path.join(result.model_dir, "model.safetensors"))
    # the optimizer's fp32 masters, not bf16 copies: some value is not representable in bf16
    assert all(w.dtype == torch.float32 for w in weights.values())
    emb = weights["embeddings.word_embeddings.weight"]
    assert not torch.equal(emb, emb.to(torch.bfloat16).float())
    with open(os.path.join(result.model_dir, "config.json")) as f:
        assert json.load(f).get("dtype") in (None, "float32")
    model = Embedder.from_pretrained(result.model_dir, pooling="mean")
    assert next(model.parameters()).dtype == torch.float32


def test_first_batch_early_fetches_ahead_keeps_order_and_raises_in_the_caller():
    import threading

    from bge_ray.train.recipe import FirstBatchEarly

    fetched = threading.Event()

    def source():
        fetched.set()
        yield from range(4)

    it = FirstBatchEarly(source())
    assert fetched.wait(5)  # the first item is fetched before anyone asks
    assert list(it) == [0, 1, 2, 3]
    assert list(FirstBatchEarly(iter([]))) == []

    def broken():
        raise ValueError("bad shard")
        yield

    it = FirstBatchEarly(broken())
    with pytest.raises(ValueError, match="bad shard"):
        next(it)


def test_flagembedding_base_same_dataset_arguments_train_unchanged(ray_cluster, tiny_model, tmp_path, capfd):
    """FlagEmbedding's multi-task example (retrieval files with teacher scores, sts, classification and
    clustering without, no_in_batch_neg folders, FlagEmbedding's own ds_stage0.json) on 2 workers."""
    from bge_ray.cli import main

    args = fe_same_dataset_args(tiny_model, str(tmp_path / "out"), str(tmp_path / "cache"))
    args += ["--num_workers", "2", "--storage_path", str(tmp_path / "runs"), "--num_train_epochs", "1"]
    assert main(["train", *args]) == 0
    err = capfd.readouterr().err
    assert "8 data sets, every batch from one of them" in err
    assert "plan: 31 optimizer steps (31/epoch" in err
    with open(os.path.join(tmp_path / "out", "config.json")) as f:
        assert json.load(f)["model_type"] == "bert"
    with open(os.path.join(tmp_path / "runs", os.listdir(tmp_path / "runs")[0], "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if r.get("kind") == "train"]
    assert len(losses) == 31 and all(np.isfinite(losses))


def _cosine(step: int, warmup: int, total: int) -> float:
    """HF's cosine schedule: linear warm-up, then half a cosine down to 0."""
    if step < warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_flagembedding_trainer_flags_schedule_save_and_resume_as_hf(ray_cluster, tiny_model, tmp_path):
    """A DeepSpeed JSON with an optimizer and no scheduler gets lr_scheduler_type's schedule (HF's rule);
    save_strategy epoch checkpoints hold a loadable model without eval_data; resume_from_checkpoint
    continues another run's checkpoint as a new run, the same steps to the same losses."""
    with open(FE_DS_STAGE0) as f:
        ds = {k: v for k, v in json.load(f).items() if k != "scheduler"}
    (tmp_path / "ds_no_scheduler.json").write_text(json.dumps(ds))
    cfg = {
        "model_name_or_path": tiny_model, "train_data": [FE_EXAMPLES], "output_dir": str(tmp_path / "model"),
        "storage_path": str(tmp_path / "storage"), "num_workers": 2, "deepspeed": str(tmp_path / "ds_no_scheduler.json"),
        "per_device_train_batch_size": 4, "train_group_size": 4, "query_max_len": 32, "passage_max_len": 64,
        "learning_rate": 1e-3, "lr_scheduler_type": "cosine", "warmup_ratio": 0.2, "num_train_epochs": 2,
        "logging_steps": 1, "save_strategy": "epoch", "seed": 3, "use_gpu": "auto",
    }
    first = bge_ray.finetune(cfg)
    train = {r["step"]: r for r in first.history if r.get("kind") == "train"}
    assert sorted(train) == list(range(1, 13))  # 6 steps an epoch
    for step, record in train.items():  # warm-up ceil(0.2 * 12) = 3 steps
        assert record["learning_rate"] == pytest.approx(1e-3 * _cosine(step, 3, 12), rel=1e-5, abs=1e-12)
    run_dir = os.path.dirname(first.checkpoint.path)
    epoch_one = os.path.join(run_dir, "checkpoint_step_00000006")
    model = Embedder.from_pretrained(os.path.join(epoch_one, "model"), pooling="cls")  # no eval_data, still a model
    assert model(*(torch.ones(1, 4, dtype=torch.long) for _ in range(4)))[0].shape == (1, 32)

    again = bge_ray.finetune(dict(cfg, output_dir=str(tmp_path / "continued"), resume_from_checkpoint=epoch_one))
    continued = {r["step"]: r for r in again.history if r.get("kind") == "train"}
    assert sorted(continued) == list(range(7, 13)) and again.metrics["step"] == 12
    assert [continued[s]["loss"] for s in continued] == pytest.approx([train[s]["loss"] for s in continued], rel=1e-5)
    assert os.path.dirname(again.checkpoint.path) != run_dir  # a new run; the first is left as it was
    with pytest.raises(bge_ray.ConfigError, match="holds no bge-ray checkpoint"):
        bge_ray.finetune(dict(cfg, output_dir=str(tmp_path / "x"), resume_from_checkpoint=str(tmp_path)))


def _second_call_true():
    calls = iter(range(100))
    return lambda: next(calls) == 1


def _lockstep_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from bge_ray.train.recipe import batches_in_lockstep, vote_group

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    seen = []
    for group in (vote_group(), dist.new_group(backend="gloo")):  # the default group; a side group as GPU runs use
        mine = iter([{"b": i} for i in range(5 if rank == 0 else 3)])  # rank 1 runs dry first
        flag = _second_call_true()  # rank 0 asks for a progress line at its second batch
        seen.append([(b["b"], progress) for b, _, progress in batches_in_lockstep(mine, 10, group, flag)])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"seen": seen, "gloo_needs_no_side_group": vote_group() is None}, f)
    dist.destroy_process_group()


@pytest.mark.slow  # two processes in a gloo group
def test_workers_stop_together_and_hear_rank0s_flag_over_a_cpu_vote(tmp_path):
    """Each batch's vote (any worker dry? rank 0 wants a progress line?) is one CPU all-reduce: both
    workers stop at the shorter one's end and both see rank 0's flag, over the default group or a side group."""
    import torch.multiprocessing as mp

    mp.spawn(_lockstep_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["gloo_needs_no_side_group"]
        assert out["seen"] == [[[0, False], [1, True], [2, False]]] * 2
