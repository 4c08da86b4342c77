"""Batch inference with Ray Data: the same answers as plain single-process torch, reports when
labels exist, and bad input that writes nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import CLI, cli_env


@pytest.fixture(scope="module")
def trained(imagefolder_run) -> Path:
    """The checkpoint of the session's digits ImageFolder run (conftest.imagefolder_run)."""
    return Path(json.loads((imagefolder_run / "summary.json").read_text())["checkpoint"])


def _predict(ray_session, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "predict", *args], capture_output=True, text=True, timeout=600,
                          env=cli_env(RAY_ADDRESS=ray_session))


def _reference(ckpt: Path, paths: list[Path]) -> np.ndarray:
    """Plain torch, one process, no Ray, PIL decoding by hand: softmax probabilities per image."""
    state = torch.load(ckpt / "checkpoint.pt", map_location="cpu", weights_only=True)
    from emergence_ray.models import build_model

    spec, m = state["spec"], state["config"]["model"]
    model = build_model(m["name"], spec["channels"], len(spec["class_names"]), spec["image_size"], m["width"])
    model.load_state_dict(state["model"])
    model.eval()
    x = np.stack([np.asarray(Image.open(p).convert("L"), np.float32) / 255.0 for p in paths])[:, None]
    x = (x - spec["mean"][0]) / spec["std"][0]
    with torch.no_grad():
        return model(torch.from_numpy(x).float()).softmax(1).numpy()


def test_predictions_match_plain_torch(ray_session, trained, digits_imagefolder, tmp_path):
    out = tmp_path / "preds.parquet"
    proc = _predict(ray_session, "--checkpoint", str(trained), "--output", str(out),
                    "--set", f"data.path={digits_imagefolder}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    df = pq.read_table(out).to_pandas().sort_values("id")
    assert len(df) == 1797
    paths = [Path(p) for p in df["id"]]
    probs = _reference(trained, paths)
    np.testing.assert_array_equal(df["pred_index"].to_numpy(), probs.argmax(1))
    top = np.sort(probs, axis=1)[:, ::-1][:, :5]
    got = df[[f"top{j}_prob" for j in range(1, 6)]].to_numpy()
    np.testing.assert_allclose(got, top, atol=1e-5)
    class_names = sorted(p.name for p in digits_imagefolder.iterdir())
    assert list(df["pred_class"]) == [class_names[i] for i in df["pred_index"]]
    report = json.loads((tmp_path / "preds.report" / "report.json").read_text())
    assert report["num_images"] == 1797 and report["test_accuracy"] > 0.8
    assert (tmp_path / "preds.report" / "confusion_matrix.png").is_file()


def test_unlabelled_folder_to_csv(ray_session, trained, digits_imagefolder, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((digits_imagefolder / "class_3").iterdir())[:20]:
        shutil.copy(p, flat / p.name)
    out = tmp_path / "preds.csv"
    proc = _predict(ray_session, "--checkpoint", str(trained), "--output", str(out),
                    "--set", f"data.path={flat}", "--top-k", "3", "--set", "scaling.keep_freed_memory=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model replica(s), glibc's allocator keeping freed memory" in proc.stdout + proc.stderr, proc.stdout
    table = pacsv.read_csv(out)
    assert table.num_rows == 20 and "label" not in table.column_names and "top3_prob" in table.column_names
    assert not (tmp_path / "preds.report").exists()


def test_bad_input_writes_nothing(ray_session, trained, digits_imagefolder, tmp_path):
    out = tmp_path / "p.parquet"
    missing = _predict(ray_session, "--checkpoint", str(tmp_path / "nope"), "--output", str(out))
    assert missing.returncode == 2 and "no such directory" in missing.stderr

    other = _predict(ray_session, "--checkpoint", str(trained), "--output", str(out), "--set", "model.name=resnet18")
    assert other.returncode == 2 and "resnet18" in other.stderr and "Traceback" not in other.stderr

    broken = tmp_path / "broken"
    broken.mkdir()
    for p in sorted((digits_imagefolder / "class_1").iterdir())[:10]:
        shutil.copy(p, broken / p.name)
    (broken / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad = _predict(ray_session, "--checkpoint", str(trained), "--output", str(out),
                   "--set", f"data.path={broken}")
    assert bad.returncode == 2 and "zz_corrupt.png" in bad.stderr, bad.stderr[-2000:]
    assert list(tmp_path.glob("*p.parquet*")) == []  # no output, no temp file


def test_model_replicas_keep_freed_memory_for_large_cpu_batches(ray_session):
    """Predict's model replicas get the training workers' allocator settings by the same rule
    (`scaling.keep_freed_memory`), through `map_batches`' runtime_env, which reaches the actors."""
    import ray.data

    from emergence_ray import predict
    from emergence_ray.cluster import TRAIN_WORKER_MALLOC
    from emergence_ray.config import load_config
    from emergence_ray.data.transforms import DataSpec

    def options(spec, *overrides):
        return predict.replica_options(load_config(None, list(overrides)), spec, 2)

    digits = DataSpec(1, 8, [str(i) for i in range(10)])
    photos = DataSpec(3, 224, ["a", "b"], policy="imagenet", load_size=256)
    assert "runtime_env" not in options(digits)  # 256 x 8 x 8 floats: 64 KiB
    assert options(photos)["runtime_env"] == {"env_vars": TRAIN_WORKER_MALLOC}
    assert options(photos)["num_cpus"] == predict.ACTOR_CPUS and options(photos)["compute"].max_size == 2
    assert "runtime_env" not in options(photos, "scaling.use_gpu=true")  # large tensors live on the GPU
    assert "runtime_env" not in options(photos, "scaling.keep_freed_memory=false")
    forced = options(digits, "scaling.keep_freed_memory=true")
    assert forced["runtime_env"] == {"env_vars": TRAIN_WORKER_MALLOC}

    class Probe:  # a model replica's process, as Ray Data starts it with these options
        def __call__(self, batch):
            import os

            return {"env": np.array([" ".join(f"{k}={os.environ.get(k)}" for k in sorted(TRAIN_WORKER_MALLOC))]
                                    * len(batch["id"]))}

    forced.update(batch_size=2, compute=ray.data.ActorPoolStrategy(size=1))
    seen = set(ray.data.range(4).map_batches(Probe, **forced).to_pandas()["env"])
    assert seen == {" ".join(f"{k}={v}" for k, v in sorted(TRAIN_WORKER_MALLOC.items()))}
