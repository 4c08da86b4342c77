"""`emergence-ray evaluate`: the test evaluation alone, for any checkpoint and data source.

By default the job is the checkpoint's own (same data, same split); `--config` and `--set`
point it elsewhere (e.g. `--set data.source=idx --set data.path=...`). Reports go to a new
folder and never overwrite an existing report.
"""

from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path

import torch

from emergence_ray import checkpoint, cluster, interrupt, storage
from emergence_ray.config import JobConfig, load_raw, set_dotted, parse_override, validate
from emergence_ray.data.pipeline import prepare_test
from emergence_ray.data.transforms import DataSpec
from emergence_ray.errors import CheckpointError, RunExistsError, UserError
from emergence_ray.report import evaluate_checkpoint


def job_for(state: dict, explicit_config: str | None, overrides: list[str]) -> JobConfig:
    if explicit_config:
        raw = load_raw(explicit_config)
    else:
        raw = copy.deepcopy(state["config"])  # never edit the checkpoint's own record
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    return validate(raw)


def evaluate_command(ckpt_dir: str, output: str | None, address: str | None,
                     explicit_config: str | None = None, overrides: list[str] = ()) -> str:
    ckpt_dir = storage.resolve(ckpt_dir)
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"--checkpoint {ckpt_dir}: no such directory; pass a checkpoint directory "
                              "(e.g. <run dir>/checkpoint_...)")
    state = checkpoint.load(ckpt_dir)
    cfg = job_for(state, explicit_config, list(overrides))
    spec = DataSpec.from_dict(state["spec"])
    checkpoint.check_compatible(state, state["config"]["model"]["name"], spec.num_classes, spec.channels)
    out = storage.resolve(output) if output else str(
        Path(ckpt_dir).parent / f"eval-{cfg.data.source}-{datetime.now():%Y%m%d-%H%M%S}")
    if not storage.is_uri(out) and Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--output {out} is a file; give a folder for the report files")
    if storage.exists(storage.join(out, "report.json")):
        raise RunExistsError(f"{out} already holds a report.json; choose another --output")
    cluster.connect(address)
    interrupt.install()  # after ray.init, whose core worker put a crash-dump handler on SIGTERM
    test, _listed = prepare_test(cfg.data, spec)  # streamed: decoded as it is evaluated
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    report = evaluate_checkpoint(ckpt_dir, test, out, device, cfg.scaling.keep_freed_memory)
    print(report["classification_report_text"])
    print(f"test accuracy {report['test_accuracy']:.4f} on {report['num_images']} images")
    return out
