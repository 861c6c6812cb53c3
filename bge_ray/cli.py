"""``bge-ray``: the command line. Each command is a thin door onto the Python API."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from bge_ray.config import COMPAT_IGNORED, ConfigError, FinetuneConfig, load_config

QUICKSTART_CONFIG = os.path.join(os.path.dirname(__file__), "quickstart", "config.yaml")

USAGE = """usage: bge-ray <command> [options]

commands:
  train   fine-tune an embedder      bge-ray train [--config FILE.yaml] [--key value | --key=value ...]
          with no arguments: the bundled quickstart (all-MiniLM-L6-v2 on a SciFact sample)

run `bge-ray train --help` for every config key.
"""


def _train_help() -> str:
    lines = ["usage: bge-ray train [--config FILE.yaml] [--key value | --key=value | --flag ...]", "",
             "Every key below can be set in the YAML file or overridden on the command line", "(FlagEmbedding's names).", ""]
    for f in dataclasses.fields(FinetuneConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{f.name:<36} default: {default!r}")
    lines += ["", "accepted for FlagEmbedding compatibility, no effect: " + ", ".join(sorted(COMPAT_IGNORED))]
    return "\n".join(lines)


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


def cmd_train(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(_train_help())
        return 0
    path, overrides = split_config_arg(argv)
    if path is None and not overrides:
        path = QUICKSTART_CONFIG
        print(f"[bge-ray] quickstart: {path}", file=sys.stderr)
    cfg = load_config(path, overrides)
    from bge_ray.api import finetune

    result = finetune(cfg)
    summary = {k: result.metrics.get(k) for k in ("step", "train_loss", "loss", "groups_per_s", "tokens_per_s",
                                                   "time_to_first_step_s", "peak_rss_gib_per_worker", "wall_s")}
    print(json.dumps({"model_dir": result.model_dir, **summary}, indent=2))
    print(f"fine-tuned model: {result.model_dir}")
    return 0


COMMANDS = {"train": cmd_train}


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
    except Exception as e:  # noqa: BLE001 - shown readably, then re-raised for the traceback
        from bge_ray.data import DataValidationError

        if isinstance(e, DataValidationError):
            print(f"bge-ray: data error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
