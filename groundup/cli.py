"""``groundup ...``: every stage from the command line.

Each command builds its settings one way (:func:`stage_settings`: a profile plus ``--set key=value``
overrides, into the same pydantic models the Prefect flows take), prepares the environment (Prefect's
local API, MLflow on SQLite under the output directory) and runs the stage's flow. Heavy imports happen inside the
commands, so ``groundup --help`` is instant.

Errors: a :class:`groundup.errors.GroundupError` (bad input, an absent accelerator, an unreachable source)
is printed as one ``groundup: ...`` line and exits with its class's code; anything else is a bug and keeps
its traceback. ``--debug`` shows the traceback of every error.

This module is over 350 lines because it is the whole command line: the parser and every verb, each a few
lines that build settings and call a flow.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from groundup import __version__
from groundup.errors import GroundupError, InputDataError, ModelError


def stage_settings(args: argparse.Namespace, sections: dict, extra: list[str] | None = None) -> list:
    """The settings of a command: one model per profile section, in the order of ``sections``.

    ``sections`` maps a profile section (``"finetune"``) to its settings model; the key ``None`` means the
    whole profile (``PipelineConfig``, or a model made of sections such as ``PretrainConfig``). An override
    (``extra`` first, then ``--set``) goes to the section its first key names, prefix removed, else to the
    first section as given: ``--set lr=1e-4`` and ``--set finetune.lr=1e-4`` both set the finetuning rate.
    """
    from groundup.config import load_config

    routed: dict = {name: [] for name in sections}
    first = next(iter(sections))
    for item in [*(extra or []), *args.set]:
        head, dot, _ = item.split("=", 1)[0].partition(".")
        if dot and head in sections:
            routed[head].append(item.split(".", 1)[1])
        else:
            routed[first].append(item)
    return [load_config(model, args.profile, routed[name], section=name) for name, model in sections.items()]


def input_file(path: str, what: str) -> str:
    """A file the command reads, checked before any stage starts: a missing one is the user's to fix."""
    if not Path(path).is_file():
        problem = "is a directory" if Path(path).is_dir() else "does not exist"
        raise InputDataError(f"{what} {path!r} {problem}", fix="give the path of a file")
    return path


def _prepare(args: argparse.Namespace) -> Path:
    from groundup import environment

    return environment.prepare(args.output_dir, prefect_server=True)


def _print(result) -> None:
    if hasattr(result, "as_dict"):  # a flow's typed result (tasks.common.StageResult)
        result = result.as_dict()
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
    (config,) = stage_settings(args, {"data": DataConfig}, extra)
    out = _prepare(args)
    from groundup.flows.data import prepare_data

    result = prepare_data(config=config, output_dir=str(out))
    print(f"{result.tokens.parquet}\t{result.tokens.tokens} tokens")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from groundup.config import PretrainConfig

    (config,) = stage_settings(args, {None: PretrainConfig})
    out = _prepare(args)
    from groundup.flows.pretrain import pretrain

    _print(pretrain(config=config, output_dir=str(out)))
    return 0


def model_directory(ref: str, output_dir: str | Path) -> Path:
    """A model directory as given, else a registered model (``name``, ``name/3``, ``name@alias``)."""
    path = Path(ref)
    if path.is_dir():
        return path
    from groundup import environment

    environment.prepare(output_dir)
    from groundup import tracking

    try:
        return tracking.model_directory(ref)
    except ModelError as exc:
        raise ModelError(
            f"model {ref!r} is neither a checkpoint directory nor a registered model in "
            f"{tracking.default_tracking_uri(output_dir)} ({exc.message})",
            fix=exc.fix,
        ) from None


def cmd_generate(args: argparse.Namespace) -> int:
    """Load a model, generate from ``args.prompt`` and write the text to stdout (token by token)."""
    import codecs

    from groundup import devices
    from groundup.model.generate import stream, until_blank_lines
    from groundup.model.io import tokenizer_name
    from groundup.model.loading import load_model, use_registry
    from groundup.text.tokenizers import get_tokenizer, text_to_token_ids

    directory = model_directory(args.model, args.output_dir)
    device = devices.torch_device(args.accelerator, setting="--accelerator")
    use_registry(lambda ref: model_directory(ref, args.output_dir))  # an adapter's base, if only registered
    model = load_model(directory, device)
    tokenizer = get_tokenizer(tokenizer_name(directory))
    idx = text_to_token_ids(args.prompt, tokenizer).to(device)
    tokens = stream(
        model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        eos_id=tokenizer.eot_token, use_cache=not args.no_kv_cache, seed=args.seed, lookahead=args.lookahead,
    )  # fmt: skip
    # A BPE token can end inside a multi-byte character: decode bytes incrementally.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(args.prompt)
    pieces = []
    for text in until_blank_lines(decoder.decode(tokenizer.decode_single_token_bytes(int(t[0, 0]))) for t in tokens):
        if args.no_stream:
            pieces.append(text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
    sys.stdout.write("".join(pieces) + decoder.decode(b"", final=True) + "\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from groundup.config import PipelineConfig, local_sources

    extra = local_sources(args.sources_dir) if args.sources_dir else []
    if args.output_dir:
        extra.append(f"output_dir={args.output_dir}")
    (config,) = stage_settings(args, {None: PipelineConfig}, extra)
    from groundup import environment

    environment.prepare(config.output_dir, prefect_server=True)
    from groundup.flows.pipeline import pipeline
    from groundup.report import summary

    print(summary(pipeline(config=config), config, config.output_dir, args.sources_dir))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from groundup import serving

    if args.stop:
        stopped = serving.stop_ui(args.output_dir)
        for server in stopped:
            print(f"stopped the {server.name} server (pid {server.pid}, {server.url})")
        if not stopped:
            print(f"no groundup ui servers running for {Path(args.output_dir).resolve()}")
        return 0
    if len(serving.running_servers(args.output_dir)) < 2:
        print("starting the Prefect and MLflow servers ...", flush=True)
    servers = serving.start_ui(args.output_dir)
    for server in servers.values():
        print(f"{server.name:8} {server.url}   pid {server.pid}, log {server.log}")
    from groundup.report import command

    stop = f"{command()} ui --stop --output-dir {args.output_dir}"
    print(f"runs with --output-dir {args.output_dir} now report to these servers; stop them: {stop}")
    return 0


def _deployments(args: argparse.Namespace, pool: bool = False):
    """Prepare the environment (servers of `groundup ui` included) and build the declared deployments."""
    import os

    from groundup import serving
    from groundup.config import local_sources
    from groundup.report import command

    overrides = [*(local_sources(args.sources_dir) if args.sources_dir else []), *args.set]
    if "PREFECT_API_URL" not in os.environ and "prefect" not in serving.running_servers(args.output_dir):
        print("no Prefect server yet: starting `groundup ui` ...", flush=True)
        for server in serving.start_ui(args.output_dir).values():
            print(f"{server.name:8} {server.url}   (stop: {command()} ui --stop --output-dir {args.output_dir})")
    _prepare(args)
    from groundup.flows.deployments import build_all

    return build_all(args.file, args.profile, overrides, pool, output_dir=args.output_dir)


def cmd_serve(args: argparse.Namespace) -> int:
    deployments = _deployments(args)
    from groundup.flows.deployments import serve_all

    serve_all(deployments, limit=args.limit)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    deployments = [] if args.stages_only else _deployments(args, pool=True)
    if args.stages_only:
        _prepare(args)
    from groundup.flows.deployments import deploy_all

    deploy_all(deployments, args.pool)
    for deployment in deployments:
        print(f"registered {deployment.flow_name}/{deployment.name} for work pool {args.pool}")
    print(f"registered groundup-stage/{args.pool}: pipeline stages placed on {args.pool} (pipeline.placement)")
    from groundup.report import command

    print(f"start a worker to run them: {command('prefect')} worker start --pool {args.pool}")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from groundup import cluster

    if args.action == "down":
        stopped = cluster.down(args.dir, remove_data=args.remove_data)
        for server in stopped:
            print(f"stopped {server.name} (pid {server.pid})")
        if not stopped:
            print(f"nothing running for {Path(args.dir).resolve()}")
        return 0
    if args.action == "restart-worker":
        worker = cluster.restart_worker(args.dir, args.pool, args.workdir)
        print(f"{worker.name} polling again: pid {worker.pid}, log {worker.log}")
        return 0
    print("starting PostgreSQL, the S3 store, Prefect, MLflow and two workers (a few minutes) ...", flush=True)
    state = cluster.up(args.dir, bucket=args.bucket)
    for name, server in state["servers"].items():
        print(f"{name:20} pid {server['pid']:<7} {server['url'] or ''}   log {server['log']}")
    print("\nclients and workers of this cluster use:")
    print("\n".join(f"  export {key}={value}" for key, value in cluster.client_environment(state).items()))
    print("then, with that environment: groundup deploy --pool groundup-cpu --output-dir DIR; "
          "groundup deploy --pool groundup-gpu --stages-only")
    print(f"stop: groundup cluster down --dir {args.dir}")
    return 0


def cmd_instruct_split(args: argparse.Namespace) -> int:
    from groundup.config import InstructDataConfig

    extra = [f"source={args.source}"] if args.source else []
    if args.shuffle:
        extra.append("shuffle=true")
    if args.seed is not None:
        extra.append(f"seed={args.seed}")
    (config,) = stage_settings(args, {"instruct": InstructDataConfig}, extra)
    out = _prepare(args)
    from groundup.flows.finetune import split_instructions

    result = split_instructions(data=config, output_dir=str(out))
    if args.out:
        import dataclasses

        from groundup.instruct.data import copy_split

        result = dataclasses.replace(result, **copy_split(result.as_dict(), args.out))
    _print(result)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from groundup.config import FinetuneConfig, InstructDataConfig, WeightsConfig

    extra = [f"base={args.base}"] if args.base else []
    if args.engine:
        extra.append(f"engine={args.engine}")
    # weights: where the groundup engine gets GPT-2 from when the base is a GPT-2 size (weights.from_dir=DIR).
    config, data, weights = stage_settings(
        args, {"finetune": FinetuneConfig, "instruct": InstructDataConfig, "weights": WeightsConfig}, extra
    )
    out = _prepare(args)
    from groundup.flows.finetune import finetune

    result = finetune(config=config, data=data, output_dir=str(out), weights=weights)
    _print(result.finetune)
    return 0


def cmd_gpt2(args: argparse.Namespace) -> int:
    from groundup.config import WeightsConfig

    extra = [f"{key}={value}" for key, value in (("size", args.size), ("source", args.source)) if value]
    if args.from_dir:
        extra.append(f"from_dir={Path(args.from_dir).resolve()}")
    (config,) = stage_settings(args, {"weights": WeightsConfig}, extra)
    out = _prepare(args)
    from groundup.flows.weights import load_gpt2

    result = load_gpt2(config=config, output_dir=str(out), out_dir=str(Path(args.out).resolve()) if args.out else None)
    print(result.checkpoint)
    return 0


def cmd_respond(args: argparse.Namespace) -> int:
    from groundup.config import GenerationConfig

    (config,) = stage_settings(args, {"generation": GenerationConfig})
    input_file(args.test_data, "test data")
    out = _prepare(args)
    from groundup.flows.evaluate import respond

    _print(respond(config, args.test_data, args.base, args.finetuned, output_dir=str(out)))
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    from groundup.config import JudgeConfig

    (config,) = stage_settings(args, {"judge": JudgeConfig})
    input_file(args.responses, "responses file")
    out = _prepare(args)
    from groundup.flows.evaluate import judge

    _print(judge(config, args.responses, args.finetuned_ref, output_dir=str(out)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from groundup.config import EvaluateConfig

    (config,) = stage_settings(args, {None: EvaluateConfig})
    input_file(args.test_data, "test data")
    out = _prepare(args)
    from groundup.flows.evaluate import evaluate

    result = evaluate(
        config=config, test_data=args.test_data, base_model=args.base, finetuned_model=args.finetuned,
        finetuned_ref=args.finetuned_ref, base_ref=args.base_ref, output_dir=str(out),
    )
    _print(result)
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from groundup import environment, serving, tracking

    environment.prepare(args.output_dir)  # MLflow only: no Prefect server needed

    tree = tracking.lineage(args.ref)  # a ModelError names the ref and how to find the registered ones
    serving.link_flow_runs(tree, args.output_dir)
    print(json.dumps(tree, indent=2) if args.json else tracking.format_lineage(tree))
    return 0


# ---------------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------------


def _common(
    parser: argparse.ArgumentParser, profile_default: str | None = "quickstart", output_aliases: tuple[str, ...] = ()
) -> None:
    parser.add_argument("--profile", default=profile_default, help="profile name or YAML path (default: %(default)s)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, e.g. train.lr=1e-4"
    )
    parser.add_argument(
        "--output-dir", *output_aliases, default="artifacts", help="root for all outputs (default: %(default)s)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="groundup", description="Building LLMs from the ground up, as an orchestrated, tracked pipeline."
    )
    parser.add_argument("--version", action="version", version=f"groundup {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error")
    # Every verb takes --debug too, after its name; SUPPRESS keeps the top-level value when it is not given.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="download a text and tokenize it into Parquet", parents=[debug])
    p.add_argument("--source", help="URL or path of the text (default: the workshop's the-verdict.txt)")
    p.add_argument("--sha256", help="expected sha256 of the source")
    _common(p, output_aliases=("--out",))
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("pretrain", help="pretrain the from-scratch GPT on the prepared tokens", parents=[debug])
    _common(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("generate", help="generate text from a checkpoint directory or a registered model", parents=[debug])
    p.add_argument("model", help="checkpoint directory, or a registered model (name, name/3, name@alias)")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole context every token")
    p.add_argument(
        "--lookahead", type=int, default=0,
        help="greedy only: draft up to N tokens a pass by prompt lookup (the same text, fewer passes when it repeats)",
    )  # fmt: skip
    p.add_argument("--no-stream", action="store_true", help="print the text at the end, not token by token")
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--output-dir", default="artifacts")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("run", help="run the whole pipeline in this process (embedded Prefect API and MLflow)", parents=[debug])
    _common(p)
    p.set_defaults(output_dir=None)  # the profile's output_dir unless given
    p.add_argument("--sources-dir", metavar="DIR", help="offline: read every source from DIR (see README)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ui", help="start (or --stop) a Prefect server and an MLflow server on 127.0.0.1", parents=[debug])
    p.add_argument("--stop", action="store_true", help="stop the servers this command started")
    p.add_argument("--output-dir", default="artifacts", help="where runs, logs and pids live (default: %(default)s)")
    p.set_defaults(func=cmd_ui)

    for name, helptext, func in (
        ("serve", "serve every deployment of deployments/prefect.yaml from this process (schedules active)", cmd_serve),
        ("deploy", "register every deployment of deployments/prefect.yaml for the workers of a work pool", cmd_deploy),
    ):
        p = sub.add_parser(name, help=helptext, parents=[debug])
        _common(p)
        p.add_argument("--sources-dir", metavar="DIR", help="default every deployment's sources to files in DIR")
        p.add_argument("--file", default=None, help="deployments file (default: deployments/prefect.yaml)")
        if name == "serve":
            p.add_argument("--limit", type=int, help="at most this many concurrent flow runs")
        else:
            p.add_argument("--pool", required=True, help="work pool name (created as a process pool if missing)")
            p.add_argument("--stages-only", action="store_true", help="register only groundup-stage/POOL (placement)")
        p.set_defaults(func=func)

    p = sub.add_parser(
        "cluster", parents=[debug],
        help="start (up) or stop (down) a local rehearsal of a multi-machine setup, or start a worker again",
    )  # fmt: skip
    p.add_argument("action", choices=["up", "down", "restart-worker"])
    p.add_argument("--dir", default="cluster", help="where pids, ports, logs and data live (default: %(default)s)")
    p.add_argument("--bucket", default="groundup", help="the S3 bucket of the artifact store (default: %(default)s)")
    p.add_argument("--remove-data", action="store_true", help="down: also delete the PostgreSQL data")
    p.add_argument("--pool", default="groundup-gpu", help="restart-worker: whose worker (default: %(default)s)")
    p.add_argument(
        "--workdir", help="restart-worker: its working directory (default: the old one; a new one is a fresh machine)"
    )
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("instruct", help="instruction data", parents=[debug])
    instruct = p.add_subparsers(dest="instruct_command", required=True)
    p = instruct.add_parser("split", help="fetch, validate and split the instruction data into train/test", parents=[debug])
    p.add_argument("--source", help="URL or path of a JSON / JSON Lines file (default: the workshop's data)")
    p.add_argument("--out", metavar="DIR", help="also copy train.json and test.json into DIR")
    p.add_argument("--shuffle", action="store_true", help="shuffle (with --seed) before splitting")
    p.add_argument("--seed", type=int, help="shuffle seed (default: the profile's instruct.seed)")
    _common(p)
    p.set_defaults(func=cmd_instruct_split)

    p = sub.add_parser("finetune", help="split the instruction data and LoRA-finetune a base model", parents=[debug])
    p.add_argument("--base", metavar="ID_OR_DIR", help="hub id or checkpoint dir (default: the profile's)")
    p.add_argument("--engine", help="groundup, litgpt or another registered engine (default: the profile's)")
    _common(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("gpt2", help="fetch pretrained GPT-2 weights, convert them; prints the checkpoint path", parents=[debug])
    p.add_argument("--size", help="124M, 355M, 774M or 1558M (default: the profile's weights.size)")
    p.add_argument("--source", help="openai or huggingface (default: the profile's weights.source)")
    p.add_argument("--from", dest="from_dir", metavar="DIR", help="a local OpenAI or Hugging Face checkpoint dir")
    p.add_argument("--out", metavar="DIR", help="where the converted checkpoint goes (default: under --output-dir)")
    _common(p)
    p.set_defaults(func=cmd_gpt2)

    model_help = "LitGPT checkpoint dir or hub id, groundup checkpoint dir, or LoRA adapter dir"
    p = sub.add_parser("respond", help="test-set responses of a base and a finetuned model (JSON Lines)", parents=[debug])
    p.add_argument("test_data", help="JSON / JSON Lines test entries (instruction, input, output)")
    p.add_argument("base", help=model_help)
    p.add_argument("finetuned", help=model_help)
    _common(p)
    p.set_defaults(func=cmd_respond)

    p = sub.add_parser("judge", help="score a responses file with an LLM judge (settings: judge.*)", parents=[debug])
    p.add_argument("responses", help="responses file written by `groundup respond`")
    p.add_argument("--finetuned-ref", help="registered finetuned model (name/version) to record the scores on")
    _common(p)
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("evaluate", help="responses, judge and multiple-choice evaluation in one flow", parents=[debug])
    p.add_argument("test_data", help="JSON / JSON Lines test entries (instruction, input, output)")
    p.add_argument("base", help=model_help)
    p.add_argument("finetuned", help=model_help)
    p.add_argument("--finetuned-ref", help="registered finetuned model (name/version) to record evaluations on")
    p.add_argument("--base-ref", help="registered base model (name/version) to record its benchmark on")
    _common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("lineage", help="print the lineage of a registered model version as a tree", parents=[debug])
    p.add_argument("ref", help="name, name/version or name@alias")
    p.add_argument("--json", action="store_true")
    p.add_argument("--output-dir", default="artifacts")
    p.set_defaults(func=cmd_lineage)

    return parser


def user_error(exc: BaseException) -> GroundupError | None:
    """The :class:`GroundupError` behind ``exc`` (itself, or what it was raised from), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, GroundupError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug
    if not debug:
        from groundup.logs import quiet_expected_failures

        quiet_expected_failures()
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Our own errors (bad input, failed download, absent device) carry a complete message; anything
        # else is a bug and keeps its traceback.
        error = user_error(exc)
        if error is None or debug:
            raise
        # The whole message: its first line says what is wrong; lines after it list the details (every
        # problem in a data file, the end of a subprocess's output).
        print(f"groundup: {str(error).strip() or type(error).__name__}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
