"""``groundup ...``: every stage from the command line.

Each command builds its settings from a profile plus ``--set key=value`` overrides (the same pydantic
models the Prefect flows take), prepares the environment (Prefect's local API, MLflow on SQLite under the
output directory) and runs the stage's flow. Heavy imports happen inside the commands, so ``groundup
--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from groundup import __version__
from groundup.config import ConfigError


def _settings(args: argparse.Namespace, model, section: str | None = None, extra: list[str] | None = None):
    from groundup.config import load_config

    return load_config(model, args.profile, [*(extra or []), *args.set], section=section)


def _prepare(args: argparse.Namespace) -> Path:
    from groundup import environment

    return environment.prepare(args.output_dir)


def _print(result) -> None:
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    else:
        print(result)


# ---------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------


def cmd_data(args: argparse.Namespace) -> int:
    from groundup.config import DataConfig

    extra = []
    if args.source:
        extra.append(f"source={args.source}")
    if args.sha256:
        extra.append(f"sha256={args.sha256}")
    config = _settings(args, DataConfig, section="data", extra=extra)
    out = _prepare(args)
    from groundup.flows.data import prepare_data

    result = prepare_data(config=config, output_dir=str(out))
    print(f"{result['parquet']}\t{result['tokens']} tokens")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from groundup.config import PretrainConfig

    config = _settings(args, PretrainConfig)
    out = _prepare(args)
    from groundup.flows.pretrain import pretrain

    _print(pretrain(config=config, output_dir=str(out)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from groundup.model.generate import generate_cli

    return generate_cli(args)


def cmd_lineage(args: argparse.Namespace) -> int:
    _prepare(args)
    from groundup import tracking

    tree = tracking.lineage(args.ref)
    print(json.dumps(tree, indent=2) if args.json else tracking.format_lineage(tree))
    return 0


# ---------------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, profile_default: str | None = "quickstart") -> None:
    parser.add_argument("--profile", default=profile_default, help="profile name or YAML path (default: %(default)s)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, e.g. train.lr=1e-4"
    )
    parser.add_argument("--output-dir", default="artifacts", help="root for all outputs (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="groundup", description="Building LLMs from the ground up, as an orchestrated, tracked pipeline."
    )
    parser.add_argument("--version", action="version", version=f"groundup {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="download a text and tokenize it into Parquet")
    p.add_argument("--source", help="URL or path of the text (default: the workshop's the-verdict.txt)")
    p.add_argument("--sha256", help="expected sha256 of the source")
    _common(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("pretrain", help="pretrain the from-scratch GPT on the prepared tokens")
    _common(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("generate", help="generate text from a checkpoint directory or a registered model")
    p.add_argument("model", help="checkpoint directory, or a registered model (name, name/3, name@alias)")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole context every token")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end, not token by token")
    p.add_argument("--output-dir", default="artifacts")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("lineage", help="print the lineage of a registered model version as a tree")
    p.add_argument("ref", help="name, name/version or name@alias")
    p.add_argument("--json", action="store_true")
    p.add_argument("--output-dir", default="artifacts")
    p.set_defaults(func=cmd_lineage)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"groundup: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Our own errors (bad input, failed download, unusable checkpoint) carry a complete message;
        # anything else is a bug and keeps its traceback.
        if type(exc).__module__.startswith("groundup"):
            print(f"groundup: {exc}", file=sys.stderr)
            return 1
        raise

if __name__ == "__main__":
    sys.exit(main())
