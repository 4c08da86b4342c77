"""Plain-torch pieces: models, optimizer groups, schedules, checkpoints, transforms. No Ray."""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from emergence_ray import checkpoint
from emergence_ray.config import MODEL_NAMES, SMALL_MODELS, OptimConfig
from emergence_ray.data.transforms import DataSpec, Decode, decode
from emergence_ray.engine import evaluate, train_epoch
from emergence_ray.errors import CheckpointError, DataError
from emergence_ray.models import MODELS, build_model
from emergence_ray.optim import build_optimizer, build_scheduler, lr_factor, param_groups


@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
@pytest.mark.parametrize("channels, size", [(1, 8), (3, 32)])
def test_every_small_model_runs_forward_and_backward(name, channels, size):
    """Ours, at 8 px too; torchvision's families: tests/test_models.py."""
    model = build_model(name, channels, 7, size, width=8)
    x = torch.randn(4, channels, size, size)
    out = model(x)
    assert out.shape == (4, 7)
    out.sum().backward()


def test_config_knows_exactly_the_registered_models():
    assert sorted(MODEL_NAMES) == sorted(MODELS)


def test_resnet18_small_is_adapted_to_small_images():
    model = build_model("resnet18_small", 1, 10, 28, width=8)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)


def test_mlp_uses_sigmoid_units():
    model = build_model("mlp", 1, 10, 8, width=16, depth=2)
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in model.modules()) == 2


def test_weight_decay_only_on_matrices_and_kernels():
    model = build_model("cnn", 1, 10, 8, width=8)
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) > 0


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_decay_is_decoupled_from_lr(name):
    """With zero gradients, one step shrinks weights by lr/peak*wd (SGD) or lr*wd (AdamW); biases stay."""
    model = torch.nn.Linear(4, 2)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    opt = build_optimizer(model, OptimConfig(name=name, lr=0.1, weight_decay=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    shrink = 0.5 if name == "sgd" else 1 - 0.1 * 0.5
    assert torch.allclose(model.weight, w0 * shrink)
    assert torch.equal(model.bias, b0)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "constant"])
def test_schedules_warm_up_and_stay_bounded(schedule):
    f = [lr_factor(s, 100, 10, schedule) for s in range(100)]
    assert f[0] < f[9] and max(f) <= 1.0 + 1e-9 and min(f) >= 0.0
    if schedule != "constant":
        assert f[-1] < 0.1


def test_scheduler_steps_per_batch():
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, OptimConfig(lr=1.0, warmup_epochs=0))
    sched = build_scheduler(opt, OptimConfig(lr=1.0, warmup_epochs=0), steps_per_epoch=10, epochs=2)
    for _ in range(20):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-6)


def test_engine_learns_a_separable_problem():
    torch.manual_seed(0)
    x = torch.randn(512, 1, 4, 4)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    batches = [{"image": x[i:i + 64], "label": y[i:i + 64]} for i in range(0, 512, 64)]
    model = build_model("mlp", 1, 2, 4, width=32)
    opt = build_optimizer(model, OptimConfig(lr=0.01, weight_decay=0.0))
    for _ in range(20):
        t = train_epoch(model, batches, opt, None, torch.device("cpu"))
    assert t.count == 512
    assert evaluate(model, batches, torch.device("cpu")).accuracy > 0.95


def test_checkpoint_roundtrip_is_weights_only(tmp_path):
    model = build_model("cnn", 1, 3, 8, width=4)
    opt = build_optimizer(model, OptimConfig(name="sgd"))
    random.seed(3)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 2, "history": [{"epoch": 1}],
             "rng": checkpoint.rng_state(), "spec": DataSpec(1, 8, ["a", "b", "c"], [0.5], [0.2]).to_dict(),
             "config": {"model": {"name": "cnn"}}}
    checkpoint.save(tmp_path, state)
    assert not list(tmp_path.glob("*.tmp"))
    loaded = checkpoint.load(tmp_path)  # torch.load(weights_only=True) inside
    assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["0.weight"], model.state_dict()["0.weight"])
    expected = random.random()
    random.seed(99)
    checkpoint.set_rng_state(loaded["rng"])
    assert random.random() == expected
    checkpoint.check_compatible(loaded, "cnn", 3, 1)
    with pytest.raises(CheckpointError, match="model 'cnn'"):
        checkpoint.check_compatible(loaded, "resnet18", 3, 1)
    with pytest.raises(CheckpointError, match="3 classes"):
        checkpoint.check_compatible(loaded, "cnn", 10, 1)


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"format": 1, "payload": Evil()}, tmp_path / checkpoint.FILENAME)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        checkpoint.load(tmp_path)


def _png(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_converts_modes_and_sizes():
    rgb = np.random.randint(0, 255, (10, 12, 3), np.uint8)
    out = decode(_png(rgb), "x", channels=1, size=8)
    assert out.shape == (1, 8, 8) and out.dtype == np.uint8
    gray = np.random.randint(0, 255, (8, 8), np.uint8)
    assert decode({"bytes": _png(gray), "path": "p"}, "x", 3, 8).shape == (3, 8, 8)
    assert np.array_equal(decode(gray, "x", 1, 8)[0], gray)


def test_decode_writes_each_channel_plane_in_place():
    """Channel planes come from PIL band by band (not a transposing copy): each plane must be its
    own channel, in RGB order, for RGB, RGBA and palette sources, at native size and resized."""
    rgb = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    expected = rgb.transpose(2, 0, 1)
    for source in (_png(rgb), _png(np.dstack([rgb, np.full((10, 12), 200, np.uint8)]))):
        batch = np.zeros((2, 3, 10, 10), np.uint8)
        assert np.shares_memory(decode(source, "x", 3, 10, "imagenet", out=batch[1]), batch)
        assert np.array_equal(batch[1], expected[:, :10, 1:11]) and not batch[0].any()  # the centre 10 x 10
    resized = np.asarray(Image.fromarray(rgb).resize((6, 6), Image.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(decode(_png(rgb), "x", 3, 6), resized)
    palette = Image.fromarray(rgb).quantize(16)
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    assert np.array_equal(decode(buf.getvalue(), "x", 3, 8), np.asarray(palette.convert("RGB").resize(
        (8, 8), Image.BILINEAR)).transpose(2, 0, 1))


def test_decode_names_the_bad_file():
    with pytest.raises(DataError, match="broken.png"):
        decode(b"not an image", "broken.png", 1, 8)
    truncated = _png(np.zeros((32, 32), np.uint8))[:40]
    with pytest.raises(DataError, match="cannot decode"):
        decode(truncated, "t.png", 1, 8)


def test_decode_keeps_uint8_and_skips_bad_images():
    """Decoded images travel as uint8; the worker's device transform normalizes them."""
    import torch

    from emergence_ray.data.augment import DeviceTransform

    spec = DataSpec(1, 4, ["a", "b"], mean=[0.5], std=[0.25])
    batch = {"image": np.array([_png(np.full((4, 4), 255, np.uint8)), b"junk"], dtype=object),
             "label": np.array([1, 0]), "id": np.array(["ok.png", "junk.png"])}
    with pytest.raises(DataError, match="junk.png"):
        Decode(spec, "fail")(dict(batch))
    out = Decode(spec, "skip")(dict(batch))
    assert out["ok"].tolist() == [True, False]
    assert out["image"].dtype == np.uint8 and out["image"].shape == (2, 1, 4, 4) and out["image"][0].min() == 255
    x = DeviceTransform(spec)(torch.from_numpy(out["image"][:1]))
    assert x.dtype == torch.float32 and torch.allclose(x, torch.full_like(x, (1.0 - 0.5) / 0.25))


def test_training_workers_keep_freed_memory_where_a_batch_of_images_is_large(monkeypatch):
    """glibc's allocator keeps large freed blocks in CPU workers whose batch of float images
    reaches 8 MiB (224 px JPEGs: 1.86x faster epochs), not for small images (where the one arena
    costs) nor on a GPU, unless scaling.keep_freed_memory says otherwise; a value set in the
    driver's environment is the one the workers get."""
    from emergence_ray.cluster import TRAIN_WORKER_MALLOC, train_worker_env

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    imagenet_batch, fashion_batch = 64 * 3 * 224 * 224 * 4, 128 * 1 * 28 * 28 * 4
    assert train_worker_env(None, False, imagenet_batch) == TRAIN_WORKER_MALLOC
    assert train_worker_env(None, False, fashion_batch) == {}
    assert train_worker_env(None, False, 8 * 2**20 - 1) == {} and train_worker_env(None, False, 8 * 2**20)
    assert train_worker_env(None, True, imagenet_batch) == {}  # a GPU worker's batches live on the GPU
    assert train_worker_env(True, True, fashion_batch) == TRAIN_WORKER_MALLOC
    assert train_worker_env(False, False, imagenet_batch) == {}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert train_worker_env(None, False, imagenet_batch)["MALLOC_ARENA_MAX"] == "4"


def test_a_running_process_keeps_freed_memory_from_then_on():
    """`keep_freed_in_this_process` (the driver's evaluation) sets the workers' settings with
    mallopt: in a fresh process, a freed 38 MB tensor's pages are then reused by the next one
    instead of coming back from the kernel, faulted in again (~9,700 minor faults each). Not where
    the rule says no. (glibc's defaults are no control here: under pytest such blocks were
    sometimes reused after a few allocations even so.)"""
    import subprocess
    import sys

    probe = """
import resource, sys, torch
from emergence_ray.cluster import keep_freed_in_this_process
def faults():  # the median over 8 allocations of 38 MB
    each = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(38 * 2**20 // 4); t.fill_(1.0); del t
        each.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(each, file=sys.stderr)
    return sorted(each)[4]
first = faults()
kept = keep_freed_in_this_process({"on": True, "rule": None}[sys.argv[1]], False, 28 * 28 * 4)
print(kept, first, faults())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def run(how: str) -> tuple[str, float, float, str]:
        out = subprocess.run([sys.executable, "-c", probe, how], capture_output=True, text=True, timeout=120,
                             env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        kept, first, then = out.stdout.split()
        return kept, float(first), float(then), out.stderr

    kept, _, then, log = run("on")
    assert kept == "True" and then < 1000, log
    assert run("rule")[0] == "False"  # 28 px images: the rule says no
    from emergence_ray.cluster import keep_freed_in_this_process

    assert keep_freed_in_this_process(False, False, 2**30) is False  # off: returns before touching anything


def test_plan_sizes_workers_and_fails_fast():
    from emergence_ray.cluster import plan
    from emergence_ray.config import ScalingConfig
    from emergence_ray.errors import ResourceError

    assert plan(ScalingConfig(num_workers=2), {"CPU": 2}).cpus_per_worker == 0.5  # one CPU left for Ray Data
    assert plan(ScalingConfig(num_workers=2), {"CPU": 16}).cpus_per_worker == 1.0
    assert plan(ScalingConfig(num_workers=(1, 2)), {"CPU": 2}).num_workers == (1, 2)
    with pytest.raises(ResourceError, match="needs 4 GPUs; the cluster has 1"):
        plan(ScalingConfig(num_workers=4, use_gpu=True), {"CPU": 8, "GPU": 1})
    with pytest.raises(ResourceError, match="scaling.num_workers=8"):
        plan(ScalingConfig(num_workers=8), {"CPU": 2})
    with pytest.raises(ResourceError, match="needs 6 CPUs"):
        plan(ScalingConfig(num_workers=3, cpus_per_worker=2), {"CPU": 4})
    assert plan(ScalingConfig(num_workers=4, use_gpu=True, autoscaling=True), {"CPU": 2}).gpus_per_worker == 1.0


def test_plan_keeps_a_whole_cpu_on_one_node_for_ray_data():
    """A spare CPU split across nodes runs no Ray Data task: sizing counts per node."""
    from emergence_ray.cluster import data_cpu_left, plan
    from emergence_ray.config import ScalingConfig, load_config
    from emergence_ray.tune import TuneSection, plan_trials

    assert data_cpu_left([2], 2, 0.5) and not data_cpu_left([2], 2, 1.0)
    # 4 x 0.75 CPU on two 2-CPU nodes: 1.5 + 1.5 leaves half a CPU on each node and no task runs
    assert not data_cpu_left([2, 2], 4, 0.75) and data_cpu_left([2, 2], 4, 0.5)
    assert data_cpu_left([2, 2], 2, 1.0)  # both on one node: the other is free; split: 1 free on each
    assert data_cpu_left([0.5, 4], 3, 1.0) and not data_cpu_left([0.5, 4], 4, 1.0)  # a half-CPU node never helps
    # one job: the 3 CPUs spare in total would give 4 workers 0.75 each; per node they get 0.5
    assert plan(ScalingConfig(num_workers=4), {"CPU": 4}).cpus_per_worker == 0.75
    assert plan(ScalingConfig(num_workers=4), {"CPU": 4}, nodes=[2, 2]).cpus_per_worker == 0.5
    # a sweep of 2 trials x 2 workers on two 2-CPU nodes: 0.25 each, not the 0.5 the total allows
    cfg = load_config(None, [])
    assert plan_trials(cfg, TuneSection(num_workers=2), {"CPU": 4}) == (2, 2, 0.5)
    assert plan_trials(cfg, TuneSection(num_workers=2), {"CPU": 4}, nodes=[2, 2]) == (2, 2, 0.25)
    assert plan_trials(cfg, TuneSection(num_workers=1, max_concurrent_trials=1), {"CPU": 4}, [2, 2]) == (1, 1, 1.0)


def test_crash_while_writing_leaves_the_previous_checkpoint_usable(tmp_path):
    """A save that dies mid-write leaves only a partial temp file; the last good checkpoint loads."""
    good = {"model": {"w": torch.ones(3)}, "epoch": 1}
    checkpoint.save(tmp_path, good)
    partial = tmp_path / (checkpoint.FILENAME + ".tmp")
    buf = io.BytesIO()
    torch.save({"format": 1, "model": {"w": torch.zeros(3)}, "epoch": 2}, buf)
    partial.write_bytes(buf.getvalue()[:50])  # what a crash during torch.save leaves behind
    loaded = checkpoint.load(tmp_path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["model"]["w"], torch.ones(3))
    (tmp_path / checkpoint.FILENAME).write_bytes(buf.getvalue()[:50])  # a torn file in place is refused
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        checkpoint.load(tmp_path)


def test_preemption_watcher_off_only_on_a_fixed_single_node(monkeypatch):
    """Train's preemption watcher is one more process for nothing where the only node going takes
    the job with it; on several nodes, or autoscaling, or when the user chose, it is left alone."""
    from emergence_ray.cluster import PREEMPTION_WATCHER, skip_preemption_watcher
    from emergence_ray.config import ScalingConfig

    monkeypatch.delenv(PREEMPTION_WATCHER, raising=False)
    fixed, growing = ScalingConfig(num_workers=2), ScalingConfig(num_workers=2, autoscaling=True)
    assert skip_preemption_watcher(fixed, nodes=[2.0])
    assert os.environ[PREEMPTION_WATCHER].lower() == "false"  # what Train's controller reads, as off
    assert not skip_preemption_watcher(fixed, nodes=[2.0, 2.0])  # a later run in the same process
    assert PREEMPTION_WATCHER not in os.environ  # back to Train's default (on)
    assert not skip_preemption_watcher(growing, nodes=[2.0])
    monkeypatch.setenv(PREEMPTION_WATCHER, "1")
    assert not skip_preemption_watcher(fixed, nodes=[2.0]) and os.environ[PREEMPTION_WATCHER] == "1"
    monkeypatch.setenv(PREEMPTION_WATCHER, "0")
    assert not skip_preemption_watcher(fixed, nodes=[2.0, 2.0]) and os.environ[PREEMPTION_WATCHER] == "0"


_NICENESS_PROBE = """
import json, os, sys, threading
os.nice(int(sys.argv[1]))  # start where Ray starts its workers
stop = threading.Event()
early = threading.Thread(target=stop.wait)  # started before, as gloo's threads are
early.start()
from emergence_ray.priority import set_niceness
got = set_niceness(int(sys.argv[2]))
nices = sorted(os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task"))
stop.set()
early.join()
print(json.dumps({"got": got, "threads": nices}))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="threads are listed from Linux /proc")
@pytest.mark.parametrize("start,target", [(15, 0), (0, 7)])
def test_set_niceness_moves_every_thread(start, target):
    import json
    import subprocess
    import sys

    from conftest import can_lower_niceness

    out = subprocess.run([sys.executable, "-c", _NICENESS_PROBE, str(start), str(target)], capture_output=True,
                         text=True, check=True).stdout
    result = json.loads(out)
    reached = target if target >= start or can_lower_niceness() else start  # raising nice is always allowed
    assert result == {"got": reached, "threads": [reached, reached]}, result
