"""bge_ray/config/: YAML + command-line overrides, types, and errors that say what to change."""

from __future__ import annotations

import json

import pytest

from bge_ray.config import FinetuneConfig, load_config
from bge_ray.config.deepspeed import build_deepspeed_config, fill_model_sizes
from bge_ray.config.parse import parse_overrides
from bge_ray.errors import ConfigError
from tests.helpers import FE_EXAMPLES


@pytest.fixture
def base(tmp_path, tiny_model):
    return ["--model_name_or_path", tiny_model, "--train_data", FE_EXAMPLES, "--output_dir", str(tmp_path / "out")]


def test_flagembedding_defaults():
    cfg = FinetuneConfig()
    assert (cfg.query_max_len, cfg.passage_max_len, cfg.train_group_size) == (32, 128, 8)
    assert cfg.temperature == 0.02 and cfg.query_instruction_format == "{}{}"
    assert cfg.normalize_embeddings is True and cfg.trust_remote_code is False
    assert cfg.kd_loss_type == "kl_div" and cfg.sentence_pooling_method == "cls"


def test_both_override_forms_bare_flags_and_lists(base, tmp_path):
    second = tmp_path / "more.jsonl"
    second.write_text('{"query": "q", "pos": ["p"], "neg": ["n"]}\n')
    cfg = load_config(None, base + ["--temperature=0.05", "--query_max_len", "64", "--negatives_cross_device",
                                    "--fp16", "False", "--train_data", FE_EXAMPLES, str(second),
                                    "--resources_per_worker", '{"CPU": 2}'])
    assert cfg.temperature == 0.05 and cfg.query_max_len == 64
    assert cfg.negatives_cross_device is True and cfg.fp16 is False
    assert cfg.train_data == [FE_EXAMPLES, str(second)]
    assert cfg.resources_per_worker == {"CPU": 2.0}


def test_flagembedding_command_moves_over(base):
    # flags a torchrun FlagEmbedding command carries that mean nothing here are accepted
    cfg = load_config(None, base + ["--overwrite_output_dir", "--dataloader_drop_last", "True",
                                    "--cache_path", "./cache/data", "--sentence_pooling_method", "mean"])
    assert cfg.sentence_pooling_method == "mean"
    # FlagEmbedding's sub_batch_size, here GradCache; its -1 means off, as there
    assert load_config(None, base + ["--sub_batch_size", "16"]).sub_batch_size == 16
    from bge_ray.model.grad_cache import micro_steps

    assert micro_steps(8, 8, load_config(None, base + ["--sub_batch_size", "-1"]).sub_batch_size) == 1
    assert micro_steps(8, 8, 16) == 1 + 4 and micro_steps(8, 8, 64) == 1  # chunks of queries + of passages


def test_yaml_then_command_line_wins(tmp_path, tiny_model):
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  model_name_or_path: {tiny_model}\ntrain_data: {FE_EXAMPLES}\n"
                    f"output_dir: {tmp_path}/o\ntemperature: 0.1\nlearning_rate: 1.0e-5\n")
    cfg = load_config(str(path), ["--temperature", "0.07"])
    assert cfg.temperature == 0.07 and cfg.learning_rate == 1e-5 and cfg.train_data == [FE_EXAMPLES]


def test_config_dir_placeholder(tmp_path, tiny_model):
    (tmp_path / "d.jsonl").write_text('{"query": "q", "pos": ["p"], "neg": ["n"]}\n')
    path = tmp_path / "c.yaml"
    path.write_text(f"model_name_or_path: {tiny_model}\ntrain_data: ['{{config_dir}}/d.jsonl']\noutput_dir: o\n")
    assert load_config(str(path)).train_data == [str(tmp_path / "d.jsonl")]


@pytest.mark.parametrize("argv, match", [
    (["--temprature", "0.1"], "did you mean 'temperature'"),
    (["--train_grup_size", "4"], "did you mean 'train_group_size'"),
])
def test_unknown_key_names_the_closest(base, argv, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, base + argv)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rat: 1.0e-5\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(str(path))


def test_matryoshka_flags_as_flagembedding_and_sentence_transformers_weights(base):
    cfg = load_config(None, base + ["--use_mrl", "--mrl_dims", "32", "16", "8", "--metric_for_best_model", "ndcg@10_dim16"])
    assert cfg.use_mrl and cfg.mrl_dims == [32, 16, 8] and cfg.mrl_weights is None
    assert load_config(None, base + ["--use_mrl", "--mrl_dims", "32,16", "--mrl_weights", "1", "0.5"]).mrl_weights == [1.0, 0.5]
    assert FinetuneConfig().mrl_dims == [] and not FinetuneConfig().use_mrl  # FlagEmbedding's defaults


@pytest.mark.parametrize("argv, match", [
    (["--fp16", "--bf16", "--use_gpu"], "pick one"),
    (["--fp16", "--use_gpu", "false"], "fp16 needs GPUs"),
    (["--train_group_size", "0"], "train_group_size must be >= 1"),
    (["--kd_loss_type", "m4"], "kd_loss_type"),
    (["--sentence_pooling_method", "max"], "cls, mean, last_token"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--temperature", "warm"], "temperature must be float"),
    (["--query_max_len", "1.5"], "query_max_len must be int"),
    (["--negatives_cross_device", "maybe"], "must be bool"),
    (["--deepspeed", "zero9"], "ZeRO stage"),
    (["--query_instruction_format", "{}"], "two {} slots"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be >= 1"),
    (["--warmup_ratio", "1.5"], "warmup_ratio"),
    (["--attention_dropout", "1"], "attention_dropout must be in"),
    (["--train_data", "/no/such/file.jsonl"], "no file or directory matches"),
    (["--resources_per_worker", '{"GPU": 1}', "--use_gpu", "false"], "set use_gpu: true"),
    (["--knowledge_distillation", "--train_group_size", "1"], "train_group_size >= 2"),
    (["--use_mrl"], "use_mrl needs mrl_dims"),
    (["--mrl_dims", "64", "32"], "use_mrl is off"),
    (["--use_mrl", "--mrl_dims", "64", "64"], "distinct positive sizes"),
    (["--use_mrl", "--mrl_dims", "64", "0"], "distinct positive sizes"),
    (["--use_mrl", "--mrl_dims", "64", "3.5"], "mrl_dims must be a list of whole numbers"),
    (["--use_mrl", "--mrl_dims", "64", "32", "--mrl_weights", "1"], "one weight >= 0 per mrl_dims entry"),
    (["--use_mrl", "--mrl_dims", "64", "--metric_for_best_model", "ndcg@10_dim32"], "picks one of mrl_dims"),
    (["--metric_for_best_model", "ndcg@10_dim32"], "use_mrl is off"),
    (["--fix_encoder"], "fix_encoder: BGE-M3 settings without unified_finetuning"),
    (["--metric_for_best_model", "ndcg@10_sparse"], "needs unified_finetuning"),
    (["--unified_finetuning", "--metric_for_best_model", "ndcg@10_lexical"], "_sparse|_colbert|_hybrid"),
    (["--m3_loss_weights", "1", "1", "1"], "m3_loss_weights: BGE-M3 settings without unified_finetuning"),
    (["--unified_finetuning", "--use_mrl", "--mrl_dims", "8"], "FlagEmbedding's M3 model has no Matryoshka loss"),
    (["--unified_finetuning", "--colbert_dim", "0"], "colbert_dim must be a positive size or -1"),
    (["--unified_finetuning", "--self_distill_start_step", "-2"], "self_distill_start_step must be >= -1"),
    (["--unified_finetuning", "--m3_score_weights", "1", "0.3"], "three weights >= 0"),
])
def test_impossible_values_say_what_to_change(base, argv, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, base + argv)


def test_missing_required_fields(tmp_path):
    with pytest.raises(ConfigError, match="model_name_or_path is required"):
        load_config(None, ["--train_data", FE_EXAMPLES, "--output_dir", str(tmp_path)])


def test_user_deepspeed_json(base, tmp_path):
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3}}))
    cfg = load_config(None, base + ["--deepspeed", str(good)])
    assert cfg.zero_stage == 3
    ds = build_deepspeed_config(cfg, world_size=2, total_steps=10)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["train_batch_size"] == 16
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    cfg = load_config(None, base + ["--deepspeed", str(clash)])
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=4"):
        build_deepspeed_config(cfg, world_size=2)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(None, base + ["--deepspeed", str(broken)])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shipped_zero_configs_resolve(base, stage):
    cfg = load_config(None, base + ["--deepspeed", f"zero{stage}", "--gradient_accumulation_steps", "2"])
    ds = fill_model_sizes(build_deepspeed_config(cfg, world_size=4, total_steps=100), hidden_size=64, num_params=10**6)
    assert "auto" not in json.dumps(ds)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 8 * 2 * 4 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is False


def test_bucket_sizes_follow_the_model(base, tiny_model):
    from bge_ray.config.deepspeed import engine_config
    from bge_ray.model.embedder import Embedder

    cfg = load_config(None, base + ["--deepspeed", "zero2"])
    driver = build_deepspeed_config(cfg, world_size=2)  # the driver never loads the model
    assert driver["zero_optimization"]["reduce_bucket_size"] == "auto"
    model = Embedder.from_pretrained(tiny_model)
    params = sum(p.numel() for p in model.parameters())
    hidden = model.model.config.hidden_size
    zero = engine_config(driver, hidden, params)["zero_optimization"]  # what each worker hands DeepSpeed
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == -(-params // 8) * 8 >= params
    # ZeRO 1/2 assert an even allgather bucket: an odd parameter count (BGE-M3's 1-output sparse head) rounds up
    assert fill_model_sizes(driver, None, 22_713_601)["zero_optimization"]["allgather_bucket_size"] == 22_713_608
    # a model bigger than DeepSpeed's default keeps the default; no size known: the default
    assert fill_model_sizes(driver, None, 10**10)["zero_optimization"]["reduce_bucket_size"] == 5e8
    assert fill_model_sizes(driver, None, 0)["zero_optimization"]["allgather_bucket_size"] == 5e8
    cfg3 = load_config(None, base + ["--deepspeed", "zero3"])
    zero3 = engine_config(build_deepspeed_config(cfg3, world_size=2), hidden, params)["zero_optimization"]
    assert zero3["reduce_bucket_size"] == 32 * 32 and zero3["stage3_param_persistence_threshold"] == 320
    # an explicit value is the user's
    user = dict(driver, zero_optimization=dict(driver["zero_optimization"], reduce_bucket_size=12345))
    assert engine_config(user, hidden, params)["zero_optimization"]["reduce_bucket_size"] == 12345


def test_positional_argument_is_rejected(base):
    with pytest.raises(ConfigError, match="unexpected argument 'temperature'"):
        load_config(None, ["temperature", "0.1"] + base)


def test_parse_overrides_rejects_missing_value():
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--learning_rate"])
