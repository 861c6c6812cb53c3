"""``bge-ray``: the command line. Each command is a thin door onto the Python API.

A command's module (and with it torch, Ray Train and DeepSpeed) is loaded when the command runs
(:func:`command_module`), so ``--help`` and config errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import textwrap
from types import ModuleType
from typing import Any

from bge_ray.config.fields import field_docs
from bge_ray.config.finetune import (
    EMBEDDER_ONLY,
    RERANKER_ONLY,
    FinetuneConfig,
    RerankerConfig,
    check_local_models,
    check_survives_job,
    job_working_dir,
)
from bge_ray.config.parse import load_yaml, read_config, resolve_config
from bge_ray.errors import ConfigError, DataValidationError
from bge_ray.sweep.space import TuneSettings, load_sweep
from bge_ray.tools.config import MineConfig, ScoreConfig


def command_module(name: str) -> ModuleType:
    """The module that runs a command: ``bge_ray.train.launch``, ``bge_ray.retrieval.evaluate``,
    ``bge_ray.tools.mine``, ``bge_ray.tools.score`` or ``bge_ray.sweep.run``."""
    return importlib.import_module(name)


QUICKSTART_CONFIG = os.path.join(os.path.dirname(__file__), "quickstart", "config.yaml")

USAGE = """usage: bge-ray <command> [options]

commands:
  train   fine-tune an embedder      bge-ray train [--config FILE.yaml] [--key value | --key=value ...]
          with no arguments: the bundled quickstart (all-MiniLM-L6-v2 on a SciFact sample)
  train-reranker  fine-tune a cross-encoder reranker (FlagEmbedding's reranker runner's options)
                             bge-ray train-reranker [--config FILE.yaml] [--key value ...]
  eval    retrieval metrics          bge-ray eval --model DIR_OR_ID [--model ...] --data DIR [options]
  mine    hard negatives             bge-ray mine --input_file DATA --output_dir DIR --embedder_name_or_path MODEL
  score   teacher scores             bge-ray score --input_file DATA --output_dir DIR --reranker_name_or_path MODEL
  tune    hyperparameter sweep       bge-ray tune --config sweep.yaml [--num_samples 8 --key value ...]
  preview the batches, not trained  bge-ray preview [train options] [--steps 8] [--epoch 0] [--preview_file F]

run `bge-ray <command> --help` for every option of a command.
"""


def config_help(cls: type = FinetuneConfig, usage: str | None = None) -> str:
    """Every field of a config class with its default and meaning, for ``--help``."""
    lines = [usage or f"usage: bge-ray {cls.COMMAND} [--config FILE.yaml] [--key value | --key=value | --flag ...]",
             "", "Every key below can be set in the YAML file or on the command line (FlagEmbedding's names).", ""]
    section = None
    for doc in field_docs(cls):
        if doc.section and doc.section != section:
            section = doc.section
            lines.append(f"{section}:")
        lines.append(f"  --{doc.name} {doc.kind} (default: {doc.default})")
        lines += textwrap.wrap(doc.help, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6,
                               break_on_hyphens=False)
    ignored = getattr(cls, "IGNORED", {})
    if ignored:
        lines += ["", "accepted for FlagEmbedding compatibility, without effect here (a line says so when given):"]
        lines += [f"  --{name}: {why}" for name, why in sorted(ignored.items())]
    fixed = _fixed_flags(cls)
    if fixed:
        lines += ["", "FlagEmbedding / HF flags accepted only at the value bge-ray runs as (refused otherwise, with "
                  "the reason):"]
        lines += textwrap.wrap(", ".join(fixed), width=100, initial_indent="  ", subsequent_indent="  ")
    return "\n".join(lines)


def _fixed_flags(cls: type) -> list[str]:
    translator = getattr(cls, "TRANSLATE", None)
    return sorted(translator.at_default) if translator is not None else []


def config_reference() -> str:
    """docs/config.md: every command's keys, generated from the field definitions (a test keeps it current)."""
    out = ["# Config reference", "",
           "Generated from the field definitions by `python scripts/config_reference.py`; `bge-ray <command> --help`",
           "prints the same. Every key can be set in a YAML file (`--config`) or as `--key value`.", ""]
    for title, cls in (("bge-ray train", FinetuneConfig), ("bge-ray mine", MineConfig),
                       ("bge-ray score", ScoreConfig), ("bge-ray tune (the `tune:` section)", TuneSettings)):
        out += [f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        section = None
        for doc in field_docs(cls):
            if doc.section and doc.section != section:
                section = doc.section
                out.append(f"| **{section}** | | | |")
            cell = doc.help.replace("|", "\\|")
            out.append(f"| `{doc.name}` | {doc.kind} | {doc.default.replace('|', '/')} | {cell} |")
        ignored = getattr(cls, "IGNORED", {})
        if ignored:
            out += ["", "Accepted for FlagEmbedding compatibility, without effect (a line says so when given): "
                    + "; ".join(f"`{name}` ({why})" for name, why in sorted(ignored.items())) + "."]
        if _fixed_flags(cls):
            out += ["", "FlagEmbedding / HF flags accepted only at the value bge-ray runs as, refused with the reason "
                    "otherwise: " + ", ".join(f"`{n}`" for n in _fixed_flags(cls)) + "."]
        out.append("")
    out += ["## bge-ray train-reranker", "",
            "The keys of `bge-ray train` with `task: reranker` (`bge-ray train` takes `task: reranker` too). A reranker "
            "refuses the embedder's own keys at any value but their default: "
            + ", ".join(f"`{n}`" for n in EMBEDDER_ONLY) + "; an embedder refuses "
            + ", ".join(f"`{n}`" for n in RERANKER_ONLY) + ". FlagEmbedding's reranker runner reads `config_name`, "
            "which bge-ray refuses (the model's own config is used).", ""]
    out += ["## bge-ray eval", "", "| option | default | meaning |", "|---|---|---|"]
    for action in eval_parser()._actions:
        if action.option_strings and action.dest != "help":
            default = "required" if action.required else "unset" if action.default is None else action.default
            out.append(f"| `{action.option_strings[0]}` | {str(default).lower()} | {action.help} |")
    return "\n".join(out) + "\n"


def split_config_arg(argv: list[str]) -> tuple[str | None, list[str]]:
    """Pull ``--config PATH`` / ``--config=PATH`` out of the arguments."""
    rest, path = [], None
    i = 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path to a YAML file")
            path = argv[i + 1]
            i += 2
            continue
        if argv[i].startswith("--config="):
            path = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    return path, rest


def cmd_train(argv: list[str], cls: type = FinetuneConfig) -> int:
    if "-h" in argv or "--help" in argv:
        print(config_help(cls))
        return 0
    path, overrides = split_config_arg(argv)
    if path is None and not overrides:
        if cls is not FinetuneConfig:
            raise ConfigError(f"bge-ray {cls.COMMAND} needs a config: --config FILE.yaml and/or --key value options "
                              f"(bge-ray {cls.COMMAND} --help lists them)")
        path = QUICKSTART_CONFIG
        print(f"[bge-ray] quickstart: {path}", file=sys.stderr)
    cfg = resolve_config(read_config(path, overrides, cls), cls)  # a bad config fails before the heavy imports
    result = command_module("bge_ray.train.launch").finetune(cfg)
    print_train_summary(result)
    return 0


def print_train_summary(result: Any) -> None:
    cfg, metrics = result.config, result.metrics
    keys = ["step", "train_loss", "loss", "groups_per_s", "tokens_per_s", "launch_to_first_step_s",
            "peak_rss_gib_per_worker", "peak_gpu_mem_gib_per_worker", "wall_s"]
    metric = cfg.metric_for_best_model
    if cfg.eval_data:
        keys += [f"zero_shot_{metric}", f"eval_{metric}", "best_step", f"best_eval_{metric}"]
    print(json.dumps({"model_dir": result.model_dir, **{k: metrics[k] for k in keys if k in metrics}}, indent=2))
    if cfg.eval_data and f"zero_shot_{metric}" in metrics:
        tuned = metrics.get(f"best_eval_{metric}", metrics.get(f"eval_{metric}"))
        print(f"{metric} on {cfg.eval_data}: zero-shot {metrics[f'zero_shot_{metric}']:.4f} -> fine-tuned {tuned:.4f}")
    print(f"fine-tuned model: {result.model_dir}")


def eval_parser() -> argparse.ArgumentParser:
    """``bge-ray eval``'s options; the second name of each is FlagEmbedding's evaluation runner's."""
    ap = argparse.ArgumentParser(prog="bge-ray eval", description="nDCG/Recall/MRR/MAP/P@k of one or more models "
                                 "on a BEIR or FlagEmbedding evaluation folder (local or cloud URI). --config FILE.yaml "
                                 "gives any of these options as keys.")
    ap.add_argument("--model", "--embedder_name_or_path", dest="model", action="extend", nargs="+", required=True,
                    help="model directories or hub ids; several (or the option repeated) to compare")
    ap.add_argument("--data", "--dataset_dir", dest="data", required=True,
                    help="folder with corpus.jsonl, queries and qrels")
    ap.add_argument("--split", "--splits", dest="split", default="test", help="the split whose queries and qrels are scored")
    ap.add_argument("--k", "--k_values", dest="k", nargs="+", default=["1,3,5,10,100"],
                    help="cut-offs, comma- or space-separated")
    ap.add_argument("--output", "--eval_output_path", dest="output", default=None,
                    help="folder for results.json and results.md (default: ./eval_results/DATA)")
    ap.add_argument("--pooling", "--pooling_method", dest="pooling", choices=["cls", "mean", "last_token"],
                    default=None, help="override the pooling read from the model directory")
    ap.add_argument("--query_instruction", "--query_instruction_for_retrieval", dest="query_instruction",
                    default=None, help="override the query instruction")
    ap.add_argument("--passage_instruction", "--passage_instruction_for_retrieval", dest="passage_instruction",
                    default=None, help="override the passage instruction")
    ap.add_argument("--query_max_len", "--embedder_query_max_length", dest="query_max_len", type=int, default=None,
                    help="query tokens kept (default 64)")
    ap.add_argument("--passage_max_len", "--embedder_passage_max_length", dest="passage_max_len", type=int,
                    default=None, help="passage tokens kept (default 256)")
    ap.add_argument("--batch_size", "--embedder_batch_size", dest="batch_size", type=int, default=None,
                    help="texts per encoder batch (default 64)")
    ap.add_argument("--use_gpu", action="store_true", help="one GPU per encoder actor, bf16/fp16")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="encoder actors (default: one per GPU the cluster can grow to, or per CPU)")
    ap.add_argument("--ignore_identical_ids", action="store_true", help="drop a retrieved doc whose id is the query's")
    ap.add_argument("--truncate_dim", dest="truncate_dim", nargs="+", default=[],
                    help="Matryoshka: also score the embeddings cut to their first d values, one row per d "
                    "(comma- or space-separated)")
    ap.add_argument("--modes", nargs="+", default=None,
                    help="BGE-M3 retrieval modes, one row each: dense, sparse, colbert, hybrid (default: all four "
                    "for a model with colbert_linear.pt and sparse_linear.pt, else dense)")
    ap.add_argument("--weights_for_different_modes", nargs="+", default=None,
                    help="the hybrid's dense, sparse and ColBERT weights (default: those the model's ensemble was "
                    "trained with, else 1 0.3 1)")
    ap.add_argument("--ray_address", default=None, help="cluster to join (default: RAY_ADDRESS, the cluster `ray "
                    "start` made here, or a local Ray)")
    add_rerank_options(ap)
    return ap


def add_rerank_options(ap: argparse.ArgumentParser) -> None:
    """``bge-ray eval``'s reranking options, with FlagEmbedding's evaluation names."""
    ap.add_argument("--reranker", "--reranker_name_or_path", dest="reranker", default=None,
                    help="a cross-encoder that re-scores each model's top --rerank_top_k passages (dense, full size): "
                    "one more row per model, mode rerank")
    ap.add_argument("--rerank_top_k", type=int, default=None, help="passages per query the reranker scores (default "
                    "100)")
    ap.add_argument("--reranker_max_length", type=int, default=None, help="tokens of a (query, passage) pair "
                    "(default 512; a reranker bge-ray trained: its pairs cut as in training)")
    ap.add_argument("--reranker_query_max_length", type=int, default=None,
                    help="query tokens of a pair (default three quarters of --reranker_max_length)")
    ap.add_argument("--reranker_batch_size", type=int, default=None, help="pairs per reranker batch (default 32)")
    for side in ("query", "passage"):
        ap.add_argument(f"--{side}_instruction_for_rerank", default=None,
                        help=f"the reranker's {side} instruction (default: the one it was trained with, if bge-ray "
                        "trained it)")
        ap.add_argument(f"--{side}_instruction_format_for_rerank", default=None,
                        help=f"how instruction and {side} join (default: as trained, else {{}}{{}})")


def eval_args(argv: list[str]) -> argparse.Namespace:
    """``bge-ray eval``'s arguments: ``--config FILE.yaml`` (keys are the options' names) under the command line.

    Raises:
        ConfigError: an unknown key in the file.
    """
    path, rest = split_config_arg(argv)
    parser = eval_parser()
    if path:
        values = load_yaml(path)
        dests = {a.dest: a for a in parser._actions}
        names = {s.lstrip("-"): a.dest for a in parser._actions for s in a.option_strings}
        unknown = sorted(k for k in values if k not in names)
        if unknown:
            raise ConfigError(f"{path}: unknown eval option(s) {', '.join(unknown)}; see bge-ray eval --help")
        defaults = {names[k]: v for k, v in values.items()}
        for dest, value in defaults.items():
            if dests[dest].nargs in ("+", "*") and not isinstance(value, list):
                defaults[dest] = [value]
            if dests[dest].required:
                dests[dest].required = False
        parser.set_defaults(**defaults)
    args = parser.parse_args(rest)
    if not args.model or not args.data:
        raise ConfigError("bge-ray eval needs --model and --data (on the command line or in --config)")
    return args


def list_items(values: list[Any]) -> list[str]:
    """The items of a list option given comma- or space-separated (``--k 1,10 100``)."""
    return [v for part in values for v in str(part).replace(",", " ").split()]


def whole_numbers(values: list[Any], flag: str) -> set[int]:
    """The integers of a list option given comma- or space-separated (``--k 1,10 100``).

    Raises:
        ConfigError: an item that is not an integer.
    """
    try:
        return {int(v) for v in list_items(values)}
    except ValueError:
        raise ConfigError(f"{flag} must be integers, comma- or space-separated, got "
                          f"{' '.join(map(str, values))!r}") from None


def cmd_eval(argv: list[str]) -> int:
    args = eval_args(argv)
    check_local_models(args.model)  # refused before the heavy imports and any cluster work
    ks = tuple(sorted(whole_numbers(args.k, "--k")))
    if not ks or min(ks) < 1:
        raise ConfigError("--k needs at least one cut-off >= 1")
    dims = tuple(sorted(whole_numbers(args.truncate_dim, "--truncate_dim"), reverse=True))
    if dims and min(dims) < 1:
        raise ConfigError("--truncate_dim sizes must be >= 1")
    modes = tuple(list_items(args.modes)) if args.modes else None
    weights = None
    if args.weights_for_different_modes:
        try:
            weights = tuple(float(w) for w in list_items(args.weights_for_different_modes))
        except ValueError:
            raise ConfigError(f"--weights_for_different_modes must be numbers, got {args.weights_for_different_modes}") from None
    output = args.output or default_eval_output(args.data)
    check_survives_job(output, "--output")
    evaluation = command_module("bge_ray.retrieval.evaluate")
    rows = evaluation.evaluate(args.model, args.data, split=args.split, ks=ks, use_gpu=args.use_gpu,
                    concurrency=args.concurrency, ignore_identical_ids=args.ignore_identical_ids, output_dir=output,
                    ray_address=args.ray_address, pooling=args.pooling, query_instruction=args.query_instruction,
                    passage_instruction=args.passage_instruction, query_max_len=args.query_max_len,
                    passage_max_len=args.passage_max_len, batch_size=args.batch_size, truncate_dims=dims,
                    modes=modes, weights=weights, reranker=args.reranker,
                    rerank_top_k=100 if args.rerank_top_k is None else args.rerank_top_k,
                    reranker_options=rerank_options(args))
    print(evaluation.format_table(rows, ks))
    print(f"results: {os.path.join(output, 'results.json')} and results.md")
    return 0


def rerank_options(args: argparse.Namespace) -> dict[str, Any]:
    """The reranker's settings given on the command line, as ``RerankSpec`` fields (None: not given)."""
    if args.reranker is None:
        given = [f"--{k}" for k, v in vars(args).items() if "rerank" in k and v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: reranker settings without --reranker (the cross-encoder to rerank with)")
    return {"max_length": args.reranker_max_length, "query_max_length": args.reranker_query_max_length,
            "batch_size": args.reranker_batch_size, "query_instruction": args.query_instruction_for_rerank,
            "query_instruction_format": args.query_instruction_format_for_rerank,
            "passage_instruction": args.passage_instruction_for_rerank,
            "passage_instruction_format": args.passage_instruction_format_for_rerank}


def default_eval_output(data: str) -> str:
    """``./eval_results/<data set>``; in a ``ray job submit`` job, under the home folder, since the
    job's working directory is a copy Ray deletes."""
    name = os.path.basename(os.path.normpath(data))
    root = os.path.expanduser("~/bge-ray-output/eval_results") if job_working_dir() else "eval_results"
    return os.path.join(root, name)


def _values_from_argv(argv: list[str], cls: type) -> dict[str, Any]:
    path, overrides = split_config_arg(argv)
    return read_config(path, overrides, cls=cls)  # validated once, by the command


def _row_job(argv: list[str], cls: type, module: str, summary: Any) -> int:
    """``bge-ray mine`` / ``bge-ray score``: config + overrides -> run -> a JSON summary."""
    if "-h" in argv or "--help" in argv:
        print(config_help(cls))
        return 0
    cfg = resolve_config(_values_from_argv(argv, cls), cls)  # a bad config fails before the heavy imports
    print(json.dumps(summary(getattr(command_module(module), cls.COMMAND)(cfg)), indent=2))
    return 0


def cmd_mine(argv: list[str]) -> int:
    return _row_job(argv, MineConfig, "bge_ray.tools.mine", lambda r: {
        "output_dir": r.output_dir, "rows": r.num_rows, "bad_rows": r.num_bad_rows, "pool_size": r.pool_size,
        "short_rows": r.short_rows, "removed_positives": r.removed_positives, "pool_embed_s": round(r.pool_embed_s, 1),
        "search_s": round(r.search_s, 1), "queries_per_s": round(r.queries_per_s, 2), "wall_s": round(r.wall_s, 1)})


def cmd_score(argv: list[str]) -> int:
    return _row_job(argv, ScoreConfig, "bge_ray.tools.score", lambda r: {
        "output_dir": r.output_dir, "rows": r.num_rows, "bad_rows": r.num_bad_rows, "teacher": r.teacher,
        "wall_s": round(r.wall_s, 1)})


TUNE_HELP = """usage: bge-ray tune --config sweep.yaml [--key value ...]

A sweep file holds a training config (any `bge-ray train` key, or base_config: FILE.yaml), a
search_space and a tune section:

  base_config: train.yaml
  eval_steps: 50
  search_space:                        # distributions: choice, grid, uniform, loguniform, randint
    temperature: {loguniform: [0.01, 0.1]}
    learning_rate: {loguniform: [1.0e-5, 1.0e-4]}
    sentence_pooling_method: {choice: [cls, mean]}
  tune:
    num_samples: 8

Without search_space: temperature, learning_rate and sentence_pooling_method as above.
Overrides: any training key, any tune setting, or --search_space '{"temperature": {"choice": [0.02, 0.05]}}'.

tune settings:
"""


PREVIEW_HELP = """usage: bge-ray preview [--config FILE.yaml] [train options] [--steps 8] [--epoch 0] [--preview_file F]

Writes, without training, the exact rows every worker would train in the first --steps optimizer steps
of --epoch: one JSON line per worker per micro-batch (step, batch, worker, data set, and each row's
path:line, query, positive and negatives as drawn for that epoch), through the same scan, plan and
Ray Data pipeline as `bge-ray train` with the same options. Then prints how the batches mix the files
beside random permutations of the same rows.

  --steps N            optimizer steps to write (default 8)
  --epoch E            the epoch (default 0)
  --preview_file F     where to write (default batch_preview.jsonl; never overwritten)
"""


def cmd_preview(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(PREVIEW_HELP)
        return 0
    path, rest = split_config_arg(argv)
    options = {"--steps": 8, "--epoch": 0, "--preview_file": "batch_preview.jsonl"}
    overrides, i = [], 0
    while i < len(rest):
        key, _, value = rest[i].partition("=")
        if key in options:
            if not value:
                if i + 1 >= len(rest):
                    raise ConfigError(f"{key} needs a value")
                value, i = rest[i + 1], i + 1
            options[key] = value
        else:
            overrides.append(rest[i])
        i += 1
    try:
        steps, epoch = int(options["--steps"]), int(options["--epoch"])
    except ValueError:
        raise ConfigError("--steps and --epoch take whole numbers") from None
    if steps < 1 or epoch < 0:
        raise ConfigError("--steps must be >= 1 and --epoch >= 0")
    out = str(options["--preview_file"])
    if os.path.exists(out):
        raise ConfigError(f"{out} exists: bge-ray preview does not overwrite it; pass another --preview_file")
    values = read_config(path, overrides)
    command_module("bge_ray.tools.preview").run_preview(values, steps, epoch, out)
    return 0


def cmd_tune(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(TUNE_HELP.rstrip("\n") + "\n" + config_help(TuneSettings).split("\n\n", 2)[2])
        return 0
    path, overrides = split_config_arg(argv)
    if path is None:
        raise ConfigError("bge-ray tune needs --config sweep.yaml (see bge-ray tune --help)")
    sweep = load_sweep(path, overrides)
    result = command_module("bge_ray.sweep.run").tune(sweep)
    print(json.dumps({"model_dir": result.model_dir, "results_dir": result.results_dir,
                      "best_config": result.best_config_path, "best_params": result.best_params,
                      result.metric: result.best_metric, "trials": len(result.trials),
                      "stopped_early": result.num_stopped_early, "wall_s": round(result.wall_s, 1)}, indent=2))
    return 0


def cmd_train_reranker(argv: list[str]) -> int:
    return cmd_train(argv, RerankerConfig)


COMMANDS = {"train": cmd_train, "train-reranker": cmd_train_reranker, "eval": cmd_eval, "mine": cmd_mine, "score": cmd_score, "tune": cmd_tune,
            "preview": cmd_preview}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"bge-ray: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](rest)
    except ConfigError as e:
        print(f"bge-ray: config error: {e}", file=sys.stderr)
        return 2
    except DataValidationError as e:
        print(f"bge-ray: data error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
