"""On a CUDA GPU (marked `gpu`: skipped, visibly, where there is none): the main job trains on the
GPU through an NCCL process group with bf16 autocast and a channels_last model, its checkpoint
evaluates on a CPU, and the train augmentation draws the same crops on either device."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import CLI, cli_env

pytestmark = pytest.mark.gpu


def test_augmentation_is_the_same_on_gpu_and_cpu():
    from emergence_ray.data.augment import BatchAugment

    x = torch.randn(64, 3, 32, 32)
    aug = BatchAugment(4, True, [-1.0, -0.5, 0.25])
    on_cpu = aug(x, torch.Generator().manual_seed(3))
    on_gpu = aug(x.cuda(), torch.Generator().manual_seed(3))
    assert on_gpu.is_cuda and torch.equal(on_cpu, on_gpu.cpu())


def test_bf16_channels_last_training_learns():
    from emergence_ray.config import OptimConfig
    from emergence_ray.engine import evaluate, train_epoch
    from emergence_ray.models import build_model
    from emergence_ray.optim import build_optimizer

    torch.manual_seed(0)
    device = torch.device("cuda")
    model = build_model("cnn", 3, 10, 32, 32).to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3))
    x, y = torch.randn(256, 3, 32, 32, device=device), torch.randint(0, 10, (256,), device=device)
    batches = [{"image": x[i:i + 64], "label": y[i:i + 64]} for i in range(0, 256, 64)]
    first = train_epoch(model, batches, optimizer, None, device, bf16=True)
    for _ in range(30):
        last = train_epoch(model, batches, optimizer, None, device, bf16=True)
    assert last.loss < first.loss * 0.5, (first.loss, last.loss)  # memorizes 256 random images
    assert evaluate(model, batches, device, bf16=True).accuracy > 0.9
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_main_job_trains_on_the_gpu_and_evaluates_on_cpu(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.run([*CLI, "train", "--set", "scaling.use_gpu=true", "--set", "scaling.num_workers=1",
                           "--set", f"run.storage_path={tmp_path / 'runs'}", "--set", "run.name=gpu"],
                          capture_output=True, text=True, timeout=600, env=cli_env(HOME=str(home)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "gpu"
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"GPU main job: test_accuracy={summary['test_accuracy']:.4f} "
          f"{summary['train_images_per_s']:.0f} img/s wall={summary['wall_s']:.0f}s")
    assert summary["test_accuracy"] >= 0.95, summary
    workers = json.loads((run_dir / "workers.json").read_text())
    assert [(w["device"], w["backend"]) for w in workers] == [("cuda:0", "nccl")], workers

    from emergence_ray import checkpoint

    state = checkpoint.load(summary["checkpoint"])  # weights_only, mapped to the CPU
    assert all(t.device.type == "cpu" for t in state["model"].values())
    ev = subprocess.run([*CLI, "evaluate", "--checkpoint", summary["checkpoint"], "--set", "scaling.use_gpu=false",
                         "--output", str(tmp_path / "on_cpu")],
                        capture_output=True, text=True, timeout=600, env=cli_env(HOME=str(home)), cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads((tmp_path / "on_cpu" / "report.json").read_text())
    assert abs(report["test_accuracy"] - summary["test_accuracy"]) < 0.01, (report["test_accuracy"], summary)
