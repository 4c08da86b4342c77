"""Command line: `emergence-ray train|evaluate|predict|tune|validate|models` (also `python -m emergence_ray`).

    emergence-ray train                                  # built-in digits, 2 workers, embedded Ray
    emergence-ray train --config jobs/fashion_mnist.yaml --set optim.lr=3e-3
    emergence-ray evaluate --checkpoint RUN_DIR/checkpoint_... [--config FILE] [--set ...]

User errors print one clear message and exit 2 (traceback only with --debug). The last line
printed by train, evaluate and tune is the path of the directory holding the results.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from emergence_ray.errors import UserError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="job YAML file (see jobs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emergence-ray", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command")
    train = sub.add_parser("train", help="train a classifier across Ray workers")
    _common(train)
    ev = sub.add_parser("evaluate", help="evaluate a checkpoint on a test split")
    _common(ev)
    ev.add_argument("--checkpoint", required=True, help="checkpoint directory (holds checkpoint.pt)")
    ev.add_argument("--output", help="directory for report files (default: the checkpoint's run directory)")
    pr = sub.add_parser("predict", help="label a dataset with a checkpoint (Ray Data batch inference)")
    _common(pr)
    pr.add_argument("--checkpoint", required=True, help="checkpoint directory (holds checkpoint.pt)")
    pr.add_argument("--output", required=True, help="predictions file: .parquet or .csv (never overwritten)")
    pr.add_argument("--split", choices=["all", "train", "val", "test"], default="all",
                    help="which images of a labelled source (default: all)")
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument("--actors", type=int, default=2, help="model replicas (one per GPU with use_gpu)")
    tune = sub.add_parser("tune", help="sweep learning rate and weight decay with Ray Tune")
    _common(tune)
    val = sub.add_parser("validate", help="validate job files without running them")
    val.add_argument("files", nargs="+")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    val.add_argument("--debug", action="store_true")
    models = sub.add_parser("models", help="list the models model.name accepts, with their pretrained weights")
    models.add_argument("--blocks", metavar="NAME", help="list NAME's blocks, as model.freeze=N counts them")
    models.add_argument("--debug", action="store_true")
    return p


def _user_error(err: BaseException) -> UserError | None:
    """A UserError, possibly wrapped by Ray (task errors, Train/Tune failures)."""
    seen = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        for attr in ("worker_failures", "_worker_failures"):
            failures = getattr(e, attr, None)
            if isinstance(failures, dict):
                stack += list(failures.values())
    # Ray Data re-raises a failing UDF's error as text inside RayTaskError(UserCodeException)
    match = re.search(r"emergence_ray\.errors\.\w+Error: (.+)", str(err))
    return UserError(match.group(1).strip()) if match else None


def _check_address_early(address: str | None) -> None:
    """A bad cluster address fails in seconds, before Ray and torch are even imported (address.py)."""
    from emergence_ray.address import check_address, given_address

    address, source = given_address(address)
    if address and address != "local":
        check_address(address, source)


def run(args: argparse.Namespace) -> str | None:
    from emergence_ray.config import load_config

    if args.command == "validate":
        for f in args.files:
            cfg = load_config(f, args.overrides)
            if cfg.tune is not None:
                from emergence_ray.tune import tune_section

                tune_section(cfg)
            print(f"{f}: ok")
        return None
    if args.command == "models":
        from emergence_ray.models.listing import print_blocks, print_models

        print_blocks(args.blocks) if args.blocks else print_models()
        return None
    _check_address_early(args.address)
    if args.command == "evaluate":  # the job is the checkpoint's own, with --config/--set on top
        from emergence_ray.evaluate import evaluate_command

        return evaluate_command(args.checkpoint, args.output, args.address, args.config, args.overrides)
    if args.command == "predict":
        from emergence_ray.predict import predict_command

        return predict_command(args.checkpoint, args.output, args.address, args.config, args.overrides,
                               args.split, args.top_k, args.actors)
    cfg = load_config(args.config, args.overrides)
    if args.command == "train":
        from emergence_ray.trainer import train

        return train(cfg, args.address)
    if args.command == "tune":
        from emergence_ray.tune import tune_run

        return tune_run(cfg, args.address)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]  # `emergence-ray` alone trains the built-in job
    args = parser().parse_args(argv)
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # before Ray Data configures its loggers
    from emergence_ray.logs import setup_logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    setup_logging()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    try:
        out = run(args)
    except KeyboardInterrupt:
        print("interrupted; re-run the same command with the same run.name to resume", file=sys.stderr)
        return 130
    except BaseException as err:  # noqa: BLE001 - the one place that turns errors into exit codes
        user = _user_error(err)
        if user is None or args.debug:
            raise
        print(f"error: {user}", file=sys.stderr)
        return 2
    _disconnect()  # flush Ray's forwarded worker logs first: the path must be the last line
    if out is not None:
        print(out, flush=True)
    return 0


def _disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
