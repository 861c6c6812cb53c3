"""Moving a FlagEmbedding command over: every flag of its runners and of HF's TrainingArguments either
works with its meaning or is refused with the reason (bge_ray/config/compat.py); its example scripts
and its hn_mine / add_reranker_score invocations parse unchanged."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex

import pytest
from transformers import TrainingArguments

from bge_ray.cli import eval_args
from bge_ray.config import FinetuneConfig, compat, load_config
from bge_ray.config.fields import field_hints
from bge_ray.config.finetune import check_survives_job
from bge_ray.errors import ConfigError
from bge_ray.tools.config import MineConfig, ScoreConfig
from tests.flagembedding_compat import argument_classes
from tests.helpers import FE_DS_STAGE0, FE_EXAMPLE_DATA, FE_EXAMPLES, make_beir_subset

# where bge-ray's default differs from FlagEmbedding's / HF's, and why the model trained is the same
DIFFERENT_DEFAULTS = {
    "model_name_or_path": "required in both",
    "train_data": "required in both",
    "gradient_checkpointing": "None and False both mean off",
    "report_to": "bge-ray writes TensorBoard event files by default; HF reports nowhere",
    "eval_strategy": "bge-ray's None: validate every eval_steps when eval_data is given, as HF's steps",
    "metric_for_best_model": "bge-ray validates retrieval, so its metric is a retrieval metric",
}


@pytest.fixture(scope="module")
def fe_classes():
    return argument_classes()


@pytest.fixture
def base(tmp_path, tiny_model):
    return {"model_name_or_path": tiny_model, "train_data": [FE_EXAMPLES], "output_dir": str(tmp_path / "out")}


def fe_train_data() -> str:
    d = FE_EXAMPLE_DATA
    return f"{d}/retrieval {d}/sts/sts.jsonl {d}/classification-no_in_batch_neg {d}/clustering-no_in_batch_neg"


def encoder_base_args(model: str, out: str, cache: str) -> list[str]:
    """examples/finetune/embedder/encoder_only/base.sh's arguments, paths pointed at the vendored copies."""
    return shlex.split(f"""
    --model_name_or_path {model} --cache_dir {cache}
    --train_data {fe_train_data()} --cache_path {cache} --train_group_size 8 --query_max_len 512
    --passage_max_len 512 --pad_to_multiple_of 8
    --query_instruction_for_retrieval 'Represent this sentence for searching relevant passages: '
    --query_instruction_format '{{}}{{}}' --knowledge_distillation False
    --output_dir {out} --overwrite_output_dir --learning_rate 1e-5 --fp16 --num_train_epochs 4
    --per_device_train_batch_size 2 --dataloader_drop_last True --warmup_ratio 0.1 --gradient_checkpointing
    --deepspeed {FE_DS_STAGE0} --logging_steps 1 --save_steps 1000 --negatives_cross_device --temperature 0.02
    --sentence_pooling_method cls --normalize_embeddings True --kd_loss_type kl_div
    """)


def decoder_base_args(model: str, out: str, cache: str, lora: bool = True) -> list[str]:
    """examples/finetune/embedder/decoder_only/base.sh's arguments (``lora`` False: without its LoRA block)."""
    lora_args = """--use_lora True --lora_rank 32 --lora_alpha 64
    --target_modules q_proj k_proj v_proj o_proj gate_proj down_proj up_proj
    --additional_special_tokens '<instruct>' '<query>' --save_merged_lora_model True""" if lora else ""
    return shlex.split(f"""
    --model_name_or_path {model} --cache_dir {cache} {lora_args}
    --train_data {fe_train_data()} --cache_path {cache} --train_group_size 8 --query_max_len 512
    --passage_max_len 512 --pad_to_multiple_of 8
    --query_instruction_for_retrieval 'Given a query, retrieve passages that are relevant to the query.'
    --query_instruction_format '<instruct>{{}}\\n<query>{{}}' --knowledge_distillation False
    --output_dir {out} --overwrite_output_dir --learning_rate 1e-4 --fp16 --num_train_epochs 4
    --per_device_train_batch_size 2 --dataloader_drop_last True --warmup_ratio 0.1 --gradient_checkpointing
    --deepspeed {FE_DS_STAGE0} --logging_steps 1 --save_steps 1000 --negatives_cross_device --temperature 0.02
    --sentence_pooling_method last_token --normalize_embeddings True --kd_loss_type m3_kd_loss
    """)


def test_every_argument_of_hf_trainer_and_flagembedding_runners_is_handled(fe_classes):
    hints = field_hints(FinetuneConfig)
    for cls in (TrainingArguments, *fe_classes):
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        assert names, cls
        assert [n for n in names if n not in hints and not compat.TRAIN.known(n)] == [], cls.__name__


def test_shared_fields_default_as_flagembedding_does(fe_classes):
    ours = FinetuneConfig()
    hints = field_hints(FinetuneConfig)
    differ = {}
    for cls in fe_classes[:3]:  # the encoder-only base runner's three argument classes
        for f in dataclasses.fields(cls):
            if f.name in hints and f.default is not dataclasses.MISSING and f.default != getattr(ours, f.name):
                differ[f.name] = (f.default, getattr(ours, f.name))
            elif f.name in hints and f.default_factory is not dataclasses.MISSING:
                if f.default_factory() != getattr(ours, f.name):
                    differ[f.name] = (f.default_factory(), getattr(ours, f.name))
    assert set(differ) <= set(DIFFERENT_DEFAULTS), {k: v for k, v in differ.items() if k not in DIFFERENT_DEFAULTS}


def test_flags_with_no_effect_are_accepted_and_each_says_why(base, capsys):
    for flag, reason in compat.NO_EFFECT.items():
        load_config(None, {**base, flag: "1"})
        assert f"--{flag} has no effect here: {reason}" in capsys.readouterr().err


def test_flags_at_their_default_are_accepted_and_otherwise_refused_with_the_reason(base, capsys):
    for flag, (accepted, why) in compat.AT_DEFAULT.items():
        for value in accepted:
            load_config(None, {**base, flag: list(value) if isinstance(value, tuple) else value})
        with pytest.raises(ConfigError, match=re.escape(why)) as err:
            load_config(None, {**base, flag: "something-else"})
        assert f"--{flag}" in str(err.value)
    assert capsys.readouterr().err == ""  # accepted at the default: nothing to say
    with pytest.raises(ConfigError) as err:
        load_config(None, {**base, "token": "hf_secret"})
    assert "hf_secret" not in str(err.value) and "HF_TOKEN" in str(err.value)


def test_older_and_other_names_convert(base, tmp_path):
    assert load_config(None, {**base, "evaluation_strategy": "no"}).eval_strategy == "no"
    assert load_config(None, {**base, "use_cpu": True}).use_gpu is False
    assert load_config(None, {**base, "no_cuda": "true"}).use_gpu is False
    assert load_config(None, {**base, "no_cuda": "false"}).use_gpu is None  # auto
    with_eval = {**base, "eval_data": make_beir_subset(str(tmp_path / "eval"), n_queries=4, n_extra_docs=10)}
    assert load_config(None, {**with_eval, "load_best_model_at_end": "true"}).final_model == "best"
    assert load_config(None, {**with_eval, "load_best_model_at_end": False}).final_model == "last"
    with pytest.raises(ConfigError, match="use_cpu must be true or false"):
        load_config(None, {**base, "use_cpu": "maybe"})


def test_encoder_only_base_script_parses_unchanged(tiny_model, tmp_path, capsys):
    cfg = load_config(None, encoder_base_args(tiny_model, str(tmp_path / "out"), str(tmp_path / "cache")))
    assert capsys.readouterr().err == ""  # every flag is a bge-ray field or at the value bge-ray runs as
    assert (cfg.fp16, cfg.use_gpu, cfg.cache_dir) == (True, None, str(tmp_path / "cache"))
    assert (cfg.train_group_size, cfg.query_max_len, cfg.pad_to_multiple_of, cfg.warmup_ratio) == (8, 512, 8, 0.1)
    assert cfg.negatives_cross_device and cfg.gradient_checkpointing and cfg.overwrite_output_dir
    assert len(cfg.train_data) == 4 and cfg.zero_stage == 0 and cfg.logging_steps == 1
    # fp16 decides nothing until the cluster's devices are known (use_gpu: auto)
    assert cfg.with_devices(True).use_gpu is True
    with pytest.raises(ConfigError, match="fp16 needs GPUs"):
        cfg.with_devices(False)


def test_m3_flags_work(tiny_model, tmp_path):
    m3 = encoder_base_args(tiny_model, str(tmp_path / "out"), str(tmp_path / "cache"))
    m3 += shlex.split("--kd_loss_type m3_kd_loss --unified_finetuning True --use_self_distill True "
                      "--fix_encoder False --self_distill_start_step 0 --colbert_dim 64")
    cfg = load_config(None, m3)
    assert (cfg.unified_finetuning, cfg.use_self_distill, cfg.fix_encoder) == (True, True, False)
    assert (cfg.self_distill_start_step, cfg.colbert_dim, cfg.kd_loss_type) == (0, 64, "m3_kd_loss")
    # M3's settings without unified fine-tuning would do nothing in FlagEmbedding: refused, not ignored
    with pytest.raises(ConfigError, match="use_self_distill, colbert_dim: BGE-M3 settings without unified_finetuning"):
        load_config(None, m3 + ["--unified_finetuning", "False", "--self_distill_start_step", "-1"])
    off = load_config(None, m3[:-10] + shlex.split("--unified_finetuning False --use_self_distill False "
                                                   "--fix_encoder False --self_distill_start_step -1"))
    assert off.kd_loss_type == "m3_kd_loss" and not off.unified_finetuning


def test_decoder_instruction_format_is_unescaped_and_m3_kd_loss_needs_no_distillation(tiny_model, tmp_path):
    args = decoder_base_args(tiny_model, str(tmp_path / "out"), str(tmp_path / "cache"), lora=False)
    assert "<instruct>{}\\n<query>{}" in args  # the shell hands over a backslash and an n
    cfg = load_config(None, args)
    assert cfg.query_instruction_format == "<instruct>{}\n<query>{}"  # FlagEmbedding's newline
    assert cfg.kd_loss_type == "m3_kd_loss" and cfg.knowledge_distillation is False
    assert cfg.sentence_pooling_method == "last_token"


def test_hn_mine_and_add_reranker_score_invocations_parse_unchanged(tiny_model, tmp_path, capsys):
    mined = str(tmp_path / "toy_finetune_data_minedHN.jsonl")
    cfg = load_config(None, shlex.split(
        f"--input_file {FE_EXAMPLES} --output_file {mined} --range_for_sampling 2-200 --negative_number 15 "
        f"--use_gpu_for_searching --embedder_name_or_path {tiny_model} --batch_size 64"), cls=MineConfig)
    assert (cfg.output_file, cfg.output_dir, cfg.embedder_batch_size) == (mined, mined + ".shards", 64)
    assert "--use_gpu_for_searching has no effect here" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="in-context examples"):
        load_config(None, ["--input_file", FE_EXAMPLES, "--output_file", mined, "--embedder_name_or_path",
                           tiny_model, "--examples_for_task", "ex.json"], cls=MineConfig)
    scored = str(tmp_path / "toy_finetune_data_score.jsonl")
    score = shlex.split(f"--input_file {FE_EXAMPLES} --output_file {scored} --reranker_name_or_path {tiny_model} "
                        "--reranker_batch_size 32")
    cfg = load_config(None, score, cls=ScoreConfig)
    assert (cfg.output_file, cfg.batch_size) == (scored, 32)
    with pytest.raises(ConfigError, match="bge-ray score loads no adapters: give the merged model"):
        load_config(None, score + ["--reranker_peft_path", "adapter"], cls=ScoreConfig)
    cfg = load_config(None, score + ["--normalize", "True", "--reranker_query_max_length", "64",
                                     "--query_instruction_format_for_rerank", "<{}>{}"], cls=ScoreConfig)
    assert (cfg.normalize, cfg.reranker_query_max_length, cfg.query_instruction_format_for_rerank) == (True, 64, "<{}>{}")
    with pytest.raises(ConfigError, match="reranker_query_max_length must be between 1 and reranker_max_length"):
        load_config(None, score + ["--reranker_query_max_length", "600"], cls=ScoreConfig)
    (tmp_path / "toy_finetune_data_score.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        load_config(None, score, cls=ScoreConfig)
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, score + ["--overwrite", "--output_dir", str(tmp_path / "shards")], cls=ScoreConfig)


def test_relative_outputs_are_refused_inside_a_job_with_a_working_dir(base, monkeypatch):
    check_survives_job("runs/out", "output_dir")  # outside a job: a relative path is the user's folder
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}))
    with pytest.raises(ConfigError, match="Ray deletes when the job ends"):
        check_survives_job("runs/out", "output_dir")
    check_survives_job("~/bge-ray-output/out", "output_dir")
    check_survives_job("s3://bucket/out", "output_dir")
    with pytest.raises(ConfigError, match="output_file 'mined.jsonl' is relative"):
        load_config(None, ["--input_file", FE_EXAMPLES, "--output_file", "mined.jsonl", "--embedder_name_or_path",
                           base["model_name_or_path"]], cls=MineConfig)


def test_eval_takes_flagembedding_names_a_config_file_and_a_cluster_address(tmp_path):
    args = eval_args(shlex.split("--embedder_name_or_path m1 m2 --dataset_dir beir/scifact --splits dev "
                                 "--k_values 10 100 --eval_output_path out --pooling_method mean "
                                 "--query_instruction_for_retrieval 'q: ' --embedder_query_max_length 48 "
                                 "--embedder_batch_size 16 --ray_address 10.0.0.1:6379"))
    assert (args.model, args.data, args.split, args.k, args.output) == (["m1", "m2"], "beir/scifact", "dev",
                                                                         ["10", "100"], "out")
    assert (args.pooling, args.query_instruction, args.query_max_len, args.batch_size, args.ray_address) == (
        "mean", "q: ", 48, 16, "10.0.0.1:6379")
    config = tmp_path / "eval.yaml"
    config.write_text("model: [m1]\ndata: beir/scifact\nk: 10\nuse_gpu: true\n")
    args = eval_args(["--config", str(config), "--model", "m2"])  # the command line adds to / wins over the file
    assert (args.model, args.data, args.k, args.use_gpu) == (["m1", "m2"], "beir/scifact", [10], True)
    config.write_text("model: [m1]\ndata: d\nmodels: [x]\n")
    with pytest.raises(ConfigError, match="unknown eval option"):
        eval_args(["--config", str(config)])
