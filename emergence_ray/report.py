"""Test evaluation of a checkpoint: accuracy, scikit-learn's classification report (text and
dict) and a confusion matrix, written as report.json, classification_report.txt and
confusion_matrix.png into an output directory.
"""

from __future__ import annotations

import io
from typing import Any
from collections.abc import Iterable

import numpy as np
import torch

from emergence_ray import checkpoint, cluster, storage
from emergence_ray.data.augment import DeviceTransform
from emergence_ray.data.transforms import DataSpec
from emergence_ray.engine import Batch, evaluate
from emergence_ray.config import ModelConfig
from emergence_ray.models import build_for_job, legacy_name


def model_from_state(state: dict[str, Any]) -> tuple[torch.nn.Module, DataSpec]:
    spec = DataSpec.from_dict(state["spec"])
    m = ModelConfig.model_validate({**state["config"]["model"],
                                    "name": legacy_name(state["config"]["model"]["name"], state["model"])})
    # the job's architecture and frozen parts, without loading model.pretrained: the checkpoint has it all
    model = build_for_job(m, spec.channels, spec.num_classes, spec.image_size, load_weights=False)
    model.load_state_dict(state.get("ema") or state["model"])  # with train.ema, the average is the model
    return model.eval(), spec


def confusion_png(cm: np.ndarray, class_names: list[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * n + 2), max(4, 0.6 * n + 1.5)))
    im = ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    if n <= 20:
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > threshold else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def build_report(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str], loss: float | None) -> dict:
    # imported here, after training: scikit-learn (with SciPy) is ~1.2 s of CPU before the first step
    from sklearn.metrics import classification_report, confusion_matrix

    labels = list(range(len(class_names)))
    return {
        "test_accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "test_loss": loss,
        "num_images": int(len(y_true)),
        "class_names": class_names,
        "classification_report": classification_report(y_true, y_pred, labels=labels, target_names=class_names,
                                                        output_dict=True, zero_division=0),
        "classification_report_text": classification_report(y_true, y_pred, labels=labels,
                                                             target_names=class_names, digits=4, zero_division=0),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def write_report(report: dict, out_dir: str, checkpoint_path: str) -> None:
    report = {**report, "checkpoint": checkpoint_path}
    storage.write_text(storage.join(out_dir, "classification_report.txt"), report["classification_report_text"])
    storage.write_bytes(storage.join(out_dir, "confusion_matrix.png"),
                        confusion_png(np.array(report["confusion_matrix"]), report["class_names"],
                                      f"test accuracy {report['test_accuracy']:.4f}"))
    storage.write_json(storage.join(out_dir, "report.json"), report)


def evaluate_batches(state: dict[str, Any], batches: Iterable[Batch], device: torch.device) -> dict:
    model, spec = model_from_state(state)
    totals = evaluate(model.to(device), batches, device, collect=True)
    if not totals.labels:
        raise ValueError("the test split has no labelled images")
    y_true = torch.cat(totals.labels).numpy()
    y_pred = torch.cat(totals.predictions).numpy()
    return build_report(y_true, y_pred, spec.class_names, totals.loss)


EVAL_BATCH = 512  # images per model call of the driver's evaluation


def evaluate_checkpoint(ckpt_dir: str, test_ds, out_dir: str, device: torch.device | None = None,
                        keep_freed: bool | None = None) -> dict:
    """Evaluate `ckpt_dir` on a decoded Ray Dataset (columns image as uint8, label) on the driver,
    streaming it: nothing is materialized. On a CPU, this process's allocator keeps freed memory
    where `keep_freed` (`scaling.keep_freed_memory`) or its rule says so, as a training worker's does
    (`cluster.keep_freed_in_this_process`)."""
    state = checkpoint.load(ckpt_dir)
    device = device or torch.device("cpu")
    spec = DataSpec.from_dict(state["spec"])
    if device.type == "cpu":
        cluster.keep_freed_in_this_process(keep_freed, False, EVAL_BATCH * spec.channels * spec.image_size ** 2 * 4)
    to_model = DeviceTransform(spec)  # uint8 -> normalized, centre crop
    batches = test_ds.select_columns(["image", "label"]).iter_torch_batches(batch_size=EVAL_BATCH, device=device)
    report = evaluate_batches(state, ({"image": to_model(b["image"]), "label": b["label"].long()} for b in batches),
                              device)
    write_report(report, out_dir, ckpt_dir)
    return report
