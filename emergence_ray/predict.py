"""`emergence-ray predict`: batch inference of a trained checkpoint with Ray Data.

Images are decoded exactly as in training (the checkpoint's DataSpec) in Ray Data tasks, then a
pool of actors, each loading the model once (`torch.load(weights_only=True)`), normalizes and labels
them with `map_batches`. Nothing is materialized: batches stream from the files to the output
file, which is written as they come. The output (Parquet, or CSV by extension) holds each input's id or path, the
predicted class name and index, and the top-k classes and probabilities; it is written under a
temporary name and renamed when complete, so a failed run leaves nothing behind. With labels
present, the evaluation report is written too (`<output>.report/`).

    emergence-ray predict --checkpoint RUN/checkpoint_... --output preds.parquet \
        --set data.source=imagefolder --set data.path=/data/new-images
"""

from __future__ import annotations

import logging

import os
import posixpath
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
import torch

from emergence_ray import checkpoint, cluster, interrupt, storage
from emergence_ray.config import JobConfig
from emergence_ray.data.augment import DeviceTransform
from emergence_ray.data.pipeline import decoded
from emergence_ray.data.sources import SOURCES, ParquetSplit, filesystem
from emergence_ray.data.transforms import IMAGE_EXTENSIONS, DataSpec, Decode, keep_ok
from emergence_ray.errors import CheckpointError, DataError, RunExistsError, UserError
from emergence_ray.evaluate import job_for
from emergence_ray.report import build_report, model_from_state, write_report

log = logging.getLogger("emergence_ray")

TOP_K = 5


class Predictor:
    """Ray Data actor: loads the checkpoint once, then labels batches."""

    def __init__(self, ckpt_dir: str, top_k: int, use_gpu: bool):
        state = checkpoint.load(ckpt_dir)
        self.model, self.spec = model_from_state(state)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.k = min(top_k, self.spec.num_classes)
        self.names = np.array(self.spec.class_names, dtype=object)
        self.to_model = DeviceTransform(self.spec)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = self.to_model(torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device))
        probs = self.model(x).float().softmax(1).cpu()
        top_p, top_i = probs.topk(self.k, dim=1)
        pred = top_i[:, 0].numpy()
        out = {
            "id": batch["id"],
            "pred_index": pred.astype(np.int64),
            "pred_class": self.names[pred],
            "topk_index": top_i.numpy().astype(np.int64),
            "topk_prob": top_p.numpy().astype(np.float32),
        }
        if "label" in batch:
            out["label"] = batch["label"]
        return out


def _unlabeled_images(cfg: JobConfig) -> ray.data.Dataset:
    """A flat folder of images (no class subfolders), or a Parquet file without a label column."""
    fs, root = filesystem(cfg.data.path)
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.NotFound:
        raise DataError(f"data.path {cfg.data.path!r} does not exist")
    if cfg.data.source == "parquet":
        names = pq.read_schema(root, filesystem=fs).names
        if cfg.data.image_column not in names:
            raise DataError(f"{cfg.data.path}: no column {cfg.data.image_column!r} (columns: {names}); "
                            "set data.image_column")
        return ParquetSplit(fs, [root], cfg.data.image_column, None).dataset()
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
             if i.type == pafs.FileType.File and i.path.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
             and not posixpath.basename(i.path).startswith(".")]
    if not files:
        raise DataError(f"{cfg.data.path}: no image files found")
    ds = ray.data.read_binary_files(sorted(files), filesystem=fs, include_paths=True)
    return ds.map_batches(lambda b: {"image": b["bytes"], "id": b["path"]}, batch_format="numpy")


def _is_unlabeled(cfg: JobConfig) -> bool:
    if cfg.data.source == "parquet":
        fs, root = filesystem(cfg.data.path)
        if fs.get_file_info(root).type == pafs.FileType.File:
            return cfg.data.label_column not in pq.read_schema(root, filesystem=fs).names
        return False
    if cfg.data.source == "imagefolder":
        fs, root = filesystem(cfg.data.path)
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            return False
        infos = fs.get_file_info(pafs.FileSelector(root))
        return bool(infos) and not any(i.type == pafs.FileType.Directory for i in infos)
    return False


def inputs(cfg: JobConfig, split: str, spec: DataSpec) -> ray.data.Dataset:
    """The images to label, decoded (uint8) and streamed: nothing is materialized."""
    if _is_unlabeled(cfg):
        ds = _unlabeled_images(cfg).map_batches(Decode(spec, cfg.data.on_bad_image), batch_format="numpy",
                                                batch_size=256)
        return ds.map_batches(keep_ok, batch_format="numpy") if cfg.data.on_bad_image == "skip" else ds
    raw = SOURCES[cfg.data.source](cfg.data)  # every image: no data.limit
    if raw.class_names != spec.class_names:
        raise DataError(f"the data's classes {raw.class_names} differ from the checkpoint's {spec.class_names}")
    names = ("train", "val", "test") if split == "all" else (split,)
    parts = [decoded(getattr(raw, s), spec, cfg.data) for s in names]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _write(batches, output: str, fmt: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Stream prediction batches into `output` via a temp file; -> (labels, predictions, rows)."""
    out = Path(output)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    labels, preds, rows = [], [], 0
    writer = None
    try:
        for b in batches:
            cols = {"id": pa.array([str(i) for i in b["id"]]), "pred_index": pa.array(b["pred_index"]),
                    "pred_class": pa.array([str(c) for c in b["pred_class"]])}
            if "label" in b:
                cols["label"] = pa.array(b["label"].astype(np.int64))
                labels.append(b["label"])
            for j in range(b["topk_index"].shape[1]):
                cols[f"top{j + 1}_index"] = pa.array(b["topk_index"][:, j])
                cols[f"top{j + 1}_prob"] = pa.array(b["topk_prob"][:, j])
            table = pa.table(cols)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema) if fmt == "parquet" else pacsv.CSVWriter(tmp, table.schema)
            writer.write_table(table)
            preds.append(b["pred_index"])
            rows += len(table)
        if writer is None:
            raise DataError("no images to predict")
        writer.close()
        writer = None
        os.replace(tmp, out)
    finally:
        # stop Ray Data's execution now: interrupted, the generator would live on in the
        # traceback, its executor thread still running past ray.shutdown() and logging the error
        # it then meets (a Ray traceback after the command's "interrupted" line)
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return (np.concatenate(labels) if labels else np.array([])), np.concatenate(preds), rows


ACTOR_CPUS = 0.5  # per model replica on CPU (map_batches num_cpus below)
BATCH = 256  # images per model call


def replica_options(cfg: JobConfig, spec: DataSpec, actors: int) -> dict:
    """`map_batches` options of the model replicas: their resources, and on a CPU, where
    `scaling.keep_freed_memory` says so (by default for batches of float images of 8 MiB and more),
    the training workers' allocator settings (`cluster.train_worker_env`): `predict` labelled 16k
    224 px JPEGs with a cnn 2.0x faster with them (benchmarks/PREDICT.md)."""
    use_gpu = cfg.scaling.use_gpu
    options = {"batch_size": BATCH, "compute": ray.data.ActorPoolStrategy(size=actors),
               "num_gpus": 1 if use_gpu else 0, "num_cpus": 0 if use_gpu else ACTOR_CPUS}
    env = cluster.train_worker_env(cfg.scaling.keep_freed_memory, use_gpu,
                                   BATCH * spec.channels * spec.image_size ** 2 * 4)
    if env:
        options["runtime_env"] = {"env_vars": env}  # merged with the job's own runtime_env by Ray
    return options


def check_actors(actors: int, use_gpu: bool, resources: dict[str, float]) -> None:
    """Fail fast on a pool the cluster can never hold (Ray Data would wait for it forever)."""
    if use_gpu:
        gpus = resources.get("GPU", 0)
        if actors > gpus:
            raise UserError(f"--actors {actors} needs {actors} GPUs (scaling.use_gpu=true); the cluster has "
                            f"{gpus:g}. Give --actors 1..{int(gpus)} or add GPU nodes.")
        return
    cpus = resources.get("CPU", 0)
    most = int((cpus - cluster.DATA_CPU_RESERVE) // ACTOR_CPUS)
    if actors > most:
        raise UserError(f"--actors {actors} needs {actors * ACTOR_CPUS:g} CPUs ({ACTOR_CPUS:g} each) plus "
                        f"{cluster.DATA_CPU_RESERVE:g} to decode images; the cluster has {cpus:g}. "
                        f"Give --actors 1..{max(most, 1)}, or add nodes.")


def predict_command(ckpt_dir: str, output: str, address: str | None, explicit_config: str | None,
                    overrides: list[str], split: str = "all", top_k: int = TOP_K, actors: int = 2) -> str:
    ckpt_dir = storage.resolve(ckpt_dir)
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"--checkpoint {ckpt_dir}: no such directory; pass a checkpoint directory "
                              "(e.g. <run dir>/checkpoint_...)")
    output = storage.resolve(output)
    fmt = {".parquet": "parquet", ".csv": "csv"}.get(Path(output).suffix.lower())
    if fmt is None:
        raise UserError(f"--output {output}: end it in .parquet or .csv")
    if Path(output).exists():
        raise RunExistsError(f"--output {output} already exists and is never overwritten; choose another path")
    if not Path(output).parent.is_dir():
        raise UserError(f"--output {output}: folder {Path(output).parent} does not exist")
    state = checkpoint.load(ckpt_dir)
    cfg = job_for(state, explicit_config, overrides)
    spec = DataSpec.from_dict(state["spec"])
    checkpoint.check_compatible(state, cfg.model.name, spec.num_classes, spec.channels)
    if not 1 <= top_k <= spec.num_classes:
        raise UserError(f"--top-k {top_k}: the checkpoint has {spec.num_classes} classes; give 1..{spec.num_classes}")
    cluster.connect(address)
    interrupt.install()  # after ray.init, whose core worker put a crash-dump handler on SIGTERM
    if not cfg.scaling.autoscaling:
        check_actors(actors, cfg.scaling.use_gpu, ray.cluster_resources())
    prep = inputs(cfg, split, spec)
    options = replica_options(cfg, spec, actors)
    preds = prep.map_batches(
        Predictor, fn_constructor_kwargs={"ckpt_dir": ckpt_dir, "top_k": top_k, "use_gpu": cfg.scaling.use_gpu},
        batch_format="numpy", **options)
    log.info("predicting with %d model replica(s)%s; writing %s as the batches come", actors,
             ", glibc's allocator keeping freed memory" if "runtime_env" in options else "", output)
    labels, predicted, rows = _write(preds.iter_batches(batch_size=1024, batch_format="numpy"), output, fmt)
    if labels.size:
        report = build_report(labels, predicted, spec.class_names, None)
        report_dir = str(Path(output).with_suffix("")) + ".report"
        write_report(report, report_dir, ckpt_dir)
        print(f"accuracy {report['test_accuracy']:.4f} on {rows} labelled images; report in {report_dir}")
    return output
