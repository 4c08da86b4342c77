"""The model zoo and the training recipe: torchvision families, pretrained weights (torchvision's
cache, state_dict files, our checkpoints), freezing, the backbone lr, EMA, gradient accumulation,
MixUp / CutMix, and the fine-tuning job through the real CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CLI, ROOT, cli_env, digits_arrays, png_bytes
from emergence_ray import checkpoint, recipe
from emergence_ray.config import (MODEL_NAMES, SMALL_MODELS, TORCHVISION_MODELS, AugmentConfig, ModelConfig,
                                  OptimConfig, load_config)
from emergence_ray.engine import evaluate, train_epoch
from emergence_ray.errors import CheckpointError, ConfigError
from emergence_ray.models import MODELS, build_for_job, build_model, freeze, legacy_name, pretrained
from emergence_ray.models.zoo import FAMILIES, MIN_SIZE, SMALLEST, blocks, family, input_size_problem
from emergence_ray.optim import build_optimizer

CPU = torch.device("cpu")


def test_config_lists_exactly_torchvisions_classifiers():
    """config.py keeps a static copy (no torch import to validate a name): it must match torchvision."""
    import torchvision

    assert TORCHVISION_MODELS == tuple(torchvision.models.list_models(module=torchvision.models))
    assert sorted(MODELS) == sorted(MODEL_NAMES) and set(SMALL_MODELS) <= set(MODELS)


def test_unknown_model_fails_fast_with_the_closest_names_and_without_torch():
    code = ("import sys\nfrom emergence_ray.config import load_config\ntry:\n"
            "    load_config(None, ['model.name=resnet500'])\nexcept Exception as e:\n    print(e)\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(),
                         check=True).stdout
    assert "unknown model 'resnet500'; did you mean resnet50" in out
    assert out.strip().endswith("False")  # validated without importing torch


def test_every_torchvision_model_has_a_family_and_each_family_a_smallest_model():
    assert {family(n) for n in TORCHVISION_MODELS} == set(FAMILIES) == set(SMALLEST)
    assert all(family(SMALLEST[f]) == f for f in FAMILIES)


def _size(name: str) -> int:
    return 32 if name in SMALL_MODELS else next(s for s in (32, 64, 75, 224) if input_size_problem(name, s) is None)


def _one_step(name: str, channels: int) -> None:
    size = _size(name)
    torch.manual_seed(0)
    model = build_model(name, channels, 5, size, width=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.0))
    batch = {"image": torch.randn(2, channels, size, size), "label": torch.tensor([0, 4])}
    t = train_epoch(model, [batch], opt, None, CPU)
    assert t.count == 2 and np.isfinite(t.loss)
    head = model.er_head
    assert not torch.equal(before[f"{head}.weight"], model.get_parameter(f"{head}.weight"))
    with torch.no_grad():
        assert model.eval()(batch["image"]).shape == (2, 5)


SAMPLE = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1"]


@pytest.mark.parametrize("name", SAMPLE)
def test_a_sample_of_families_trains_one_step_on_grayscale(name):
    """1-channel input into a 3-channel stem, head for 5 classes; every family: the slow test."""
    _one_step(name, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALLEST.values()))
def test_every_family_trains_one_step(name):
    _one_step(name, 3)
    _one_step(name, 1)


def test_input_sizes_each_family_cannot_take_are_refused_with_the_fix():
    assert input_size_problem("resnet18", 16) is None
    assert "at least 63 px" in input_size_problem("alexnet", 32)
    assert "multiple of 224" in input_size_problem("maxvit_t", 448 - 32)
    assert "data.image_size=64" in input_size_problem("vit_b_32", 70)
    assert MIN_SIZE["inception"] == 75 and input_size_problem("inception_v3", 75) is None
    with pytest.raises(ConfigError, match="data.image_size"):
        pretrained.check_input_size("vgg11", 16)


def _save_torchvision(tmp_path: Path, name: str = "resnet18", num_classes: int = 10, seed: int = 0):
    import torchvision

    torch.manual_seed(seed)
    tv = torchvision.models.get_model(name, num_classes=num_classes).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so a wrong load shows
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"{name}.pth"
    torch.save(tv.state_dict(), path)
    return tv, path


def test_torchvision_state_dict_loads_and_the_first_evaluation_matches_the_model(tmp_path):
    tv, path = _save_torchvision(tmp_path)
    m = ModelConfig(name="resnet18", pretrained=str(path))
    ours = build_for_job(m, 3, 10, 32)
    # ImageNet normalization, as torchvision's weights expect; the images normalized that way
    mean, std = pretrained.normalization(m, 3)
    assert mean == pretrained.IMAGENET_MEAN and std == pretrained.IMAGENET_STD
    raw = torch.rand(16, 3, 32, 32)
    x = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    batches = [{"image": x[:8], "label": torch.arange(8) % 10}, {"image": x[8:], "label": torch.arange(8) % 10}]
    ev = evaluate(ours, batches, CPU, collect=True)
    with torch.no_grad():
        expected = tv(x)
    torch.testing.assert_close(torch.cat(ev.probabilities), expected.softmax(1), rtol=1e-5, atol=1e-6)
    assert ev.loss == pytest.approx(float(torch.nn.functional.cross_entropy(expected, batches[0]["label"].repeat(2))),
                                    rel=1e-5)


def test_grayscale_into_a_pretrained_rgb_stem_is_the_weight_sum(tmp_path):
    """A 1-channel model with the summed stem answers as the RGB model does on the gray image in R, G and B."""
    tv, path = _save_torchvision(tmp_path, num_classes=4)
    ours = build_for_job(ModelConfig(name="resnet18", pretrained=str(path)), 1, 4, 32).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)
    assert pretrained.normalization(ModelConfig(name="resnet18", pretrained=str(path)), 1) == \
        ([sum(pretrained.IMAGENET_MEAN) / 3], [sum(pretrained.IMAGENET_STD) / 3])


def test_other_classes_replace_the_head_and_other_mismatches_are_listed(tmp_path):
    tv, path = _save_torchvision(tmp_path, num_classes=1000)
    ours = build_model("resnet18", 3, 7, 32)
    fresh_head = ours.fc.weight.detach().clone()
    kept = pretrained.load_into(ours, str(path), "resnet18")
    assert kept == ["fc.weight", "fc.bias"] and torch.equal(ours.fc.weight, fresh_head)
    assert torch.equal(ours.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    _, other = _save_torchvision(tmp_path, "resnet34")
    listed = r"do not fit ResNet \(96 tensors.*\n    layer1.2.conv1.weight: not in the model"
    with pytest.raises(CheckpointError, match=listed):
        pretrained.load_into(build_model("resnet18", 3, 7, 32), str(other), "resnet18")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        pretrained.load_into(build_model("resnet18", 3, 7, 32), str(tmp_path / "junk.pth"), "resnet18")


@pytest.mark.slow
def test_vit_position_embeddings_follow_the_image_size(tmp_path):
    tv, path = _save_torchvision(tmp_path, "vit_b_32", num_classes=3)  # 224 px: 7x7 patches
    ours = build_for_job(ModelConfig(name="vit_b_32", pretrained=str(path)), 3, 3, 64)  # 2x2 patches
    assert ours.encoder.pos_embedding.shape == (1, 5, 768)
    assert torch.equal(ours.conv_proj.weight, tv.conv_proj.weight)


def _our_checkpoint(directory: Path, num_classes: int = 10) -> tuple[torch.nn.Module, Path]:
    """A checkpoint exactly as worker.py writes one: cnn on 1x8x8 digits-like data."""
    torch.manual_seed(1)
    model = build_model("cnn", 1, num_classes, 8, width=8)
    cfg = load_config(None, ["model.width=8"])
    spec = {"channels": 1, "image_size": 8, "class_names": [str(i) for i in range(num_classes)],
            "mean": [0.3], "std": [0.4]}
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint.save(directory, {"model": model.state_dict(), "epoch": 3, "history": [], "spec": spec,
                                "config": cfg.model_dump(mode="json")})
    return model, directory


def test_a_checkpoint_of_our_run_starts_a_job_with_other_classes(tmp_path):
    source, ckpt = _our_checkpoint(tmp_path / "run" / "checkpoint_000002")
    m = ModelConfig(name="cnn", width=8, pretrained=str(ckpt))
    ours = build_for_job(m, 1, 3, 8)
    head = ours.er_head
    for name, p in ours.state_dict().items():
        if name.startswith(head + "."):
            assert p.shape[0] == 3
        else:
            assert torch.equal(p, source.state_dict()[name]), name
    assert pretrained.normalization(m, 1) == ([0.3], [0.4])  # the source run's normalization


def test_a_head_trained_on_other_classes_is_not_kept_even_when_the_count_matches(tmp_path):
    source, ckpt = _our_checkpoint(tmp_path / "c")  # classes "0".."9"
    m = ModelConfig(name="cnn", width=8, pretrained=str(ckpt))
    torch.manual_seed(5)
    fresh = build_model("cnn", 1, 10, 8, width=8).state_dict()["16.weight"]
    same = build_for_job(m, 1, 10, 8, class_names=[str(i) for i in range(10)])
    torch.manual_seed(5)
    other = build_for_job(m, 1, 10, 8, class_names=[f"item{i}" for i in range(10)])
    assert torch.equal(same.state_dict()["16.weight"], source.state_dict()["16.weight"])
    assert torch.equal(other.state_dict()["16.weight"], fresh)  # as initialized: a new head
    assert torch.equal(other.state_dict()["0.weight"], source.state_dict()["0.weight"])


def test_uris_load_like_local_paths(tmp_path):
    """s3:// and gs:// go through pyarrow's filesystems, as file:// does here: a state_dict file
    (DDP's `module.` names, inside {"state_dict": ...}) and a checkpoint directory."""
    source, ckpt = _our_checkpoint(tmp_path / "c")
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pt")
    for uri in (f"file://{tmp_path / 'w.pt'}", f"file://{ckpt}"):
        ours = build_for_job(ModelConfig(name="cnn", width=8, pretrained=uri), 1, 10, 8)
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in ours.state_dict().items()), uri
    assert pretrained.normalization(ModelConfig(name="cnn", pretrained=f"file://{ckpt}"), 1) == ([0.3], [0.4])
    assert pretrained.normalization(ModelConfig(name="cnn", pretrained=str(tmp_path / "w.pt")), 1) is None
    with pytest.raises(CheckpointError, match="no such file"):
        pretrained.ensure_available(ModelConfig(name="cnn", pretrained=f"file://{tmp_path}/nope.pt"))


def test_frozen_parameters_and_statistics_do_not_change():
    torch.manual_seed(0)
    model = build_model("resnet18", 1, 4, 16)
    frozen = freeze(model, "backbone")
    assert frozen and not any(n.startswith("fc.") for n in frozen)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.1))
    assert sum(len(g["params"]) for g in opt.param_groups) == 2  # fc.weight, fc.bias: all the optimizer sees
    batches = [{"image": torch.randn(4, 1, 16, 16), "label": torch.arange(4) % 4} for _ in range(2)]
    train_epoch(model, batches, opt, None, CPU)
    for k, v in model.state_dict().items():
        same = torch.equal(v, state[k])
        assert same != k.startswith("fc."), k  # everything but the head as it was (batch-norm statistics too)

    model = build_model("resnet18", 1, 4, 16)
    assert [label for label, _ in blocks(model, "fc")] == ["conv1 .. maxpool", "layer1", "layer2", "layer3", "layer4"]
    freeze(model, 2)  # stem and layer1
    state = {k: v.clone() for k, v in model.state_dict().items()}
    train_epoch(model, batches, build_optimizer(model, OptimConfig(lr=0.1)), None, CPU)
    for k, v in model.state_dict().items():
        if k.startswith(("conv1.", "bn1.", "layer1.")):
            assert torch.equal(v, state[k]), k
    assert not torch.equal(model.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    with pytest.raises(ConfigError, match="has 5 blocks"):
        freeze(build_model("resnet18", 1, 4, 16), 6)


def test_backbone_lr_is_a_fraction_of_the_heads():
    model = build_model("resnet18", 3, 4, 32)
    for name in ("sgd", "adamw"):
        opt = build_optimizer(model, OptimConfig(name=name, lr=0.5, backbone_lr_mult=0.1))
        head = {id(model.fc.weight), id(model.fc.bias)}
        for g in opt.param_groups:
            in_head = {id(p) in head for p in g["params"]}
            assert len(in_head) == 1
            assert g["lr"] == pytest.approx(0.5 if in_head.pop() else 0.05)


def _toy():
    torch.manual_seed(0)
    model = build_model("mlp", 1, 3, 4, width=6)  # no batch norm: micro-batches and a whole batch agree
    batches = [{"image": torch.randn(4, 1, 4, 4), "label": torch.tensor([0, 1, 2, 0])} for _ in range(3)]
    return model, batches


def test_ema_is_its_definition_over_two_steps():
    model, batches = _toy()
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = recipe.build_ema(model, 0.9)
    seen = []
    train_epoch(model, batches[:2], opt, None, CPU, on_step=lambda s: seen.append(
        [p.detach().clone() for p in model.parameters()]), after_update=lambda: ema.update_parameters(model))
    w1, w2 = seen
    for a, p0, p1, p2 in zip(ema.module.parameters(), w0, w1, w2):
        expected = 0.9 * (0.9 * p0 + 0.1 * p1) + 0.1 * p2  # ema_k = d ema_(k-1) + (1 - d) w_k, ema_0 = w_0
        torch.testing.assert_close(a, expected)
        assert not torch.equal(p2, expected)


def test_gradient_accumulation_is_one_step_on_the_whole_batch():
    model, batches = _toy()
    ref, _ = _toy()
    train_epoch(model, batches[:2], torch.optim.SGD(model.parameters(), lr=0.5), None, CPU, grad_accum_steps=2)
    whole = {k: torch.cat([b[k] for b in batches[:2]]) for k in ("image", "label")}
    train_epoch(ref, [whole], torch.optim.SGD(ref.parameters(), lr=0.5), None, CPU)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
    # three batches, groups of two: the short last group is a step on its own mean
    model, batches = _toy()
    ref, _ = _toy()
    train_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.5), None, CPU, grad_accum_steps=2)
    train_epoch(ref, [whole, batches[2]], torch.optim.SGD(ref.parameters(), lr=0.5), None, CPU)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


def test_accumulating_steps_skip_the_gradient_all_reduce():
    """DDP's `no_sync` on every batch of a group but the last (a one-process gloo group)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        class Counting(DistributedDataParallel):
            entered = 0

            def no_sync(self):
                Counting.entered += 1
                return super().no_sync()

        model, batches = _toy()
        ddp = Counting(model)
        train_epoch(ddp, batches * 2, torch.optim.SGD(ddp.parameters(), lr=0.1), None, CPU, grad_accum_steps=3)
        assert Counting.entered == 4  # 6 batches in groups of 3: two silent batches per group
    finally:
        dist.destroy_process_group()


def test_grad_clip_bounds_the_update():
    model, batches = _toy()
    before = [p.detach().clone() for p in model.parameters()]
    train_epoch(model, batches[:1], torch.optim.SGD(model.parameters(), lr=1.0), None, CPU, grad_clip=1e-3)
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert float(moved) == pytest.approx(1e-3, rel=1e-3)


def test_mixup_and_cutmix_give_soft_labels_the_loss_takes():
    mix = recipe.build_mix(AugmentConfig(mixup=0.2, cutmix=1.0), num_classes=3)
    x, y = torch.randn(8, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mx, soft = mix(x, y)
    assert soft.shape == (8, 3) and torch.allclose(soft.sum(1), torch.ones(8))
    assert recipe.build_mix(AugmentConfig(), 3) is None
    model, batches = _toy()
    t = train_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), None, CPU, mix=mix,
                    label_smoothing=0.1)
    assert t.count == 12 and np.isfinite(t.loss)


def test_sync_batchnorm_and_channels_last_only_where_they_apply():
    from emergence_ray.config import TrainConfig

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    model = build_model("resnet18", 3, 4, 32)
    converted = recipe.sync_batchnorm(model, TrainConfig(), cuda, world=2)  # conversion needs no GPU itself
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    for device, world, cfg in ((cuda, 1, TrainConfig()), (cpu, 2, TrainConfig()),
                               (cuda, 2, TrainConfig(sync_bn=False))):
        kept = recipe.sync_batchnorm(build_model("resnet18", 3, 4, 32), cfg, device, world)
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in kept.modules())
    assert recipe.channels_last(TrainConfig(), cuda) and not recipe.channels_last(TrainConfig(), cpu)
    assert recipe.channels_last(TrainConfig(channels_last=True), cpu)


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one():
    """train.compile: torch.compile (inductor, C++ on a CPU) gives the eager step's weights."""
    model, batches = _toy()
    ref, _ = _toy()
    compiled = torch.compile(model)
    train_epoch(compiled, batches, torch.optim.SGD(model.parameters(), lr=0.5), None, CPU, grad_accum_steps=2)
    train_epoch(ref, batches, torch.optim.SGD(ref.parameters(), lr=0.5), None, CPU, grad_accum_steps=2)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_finetune_recipe_steps_on_a_gpu(tmp_path):
    """Pretrained ResNet-18, channels_last, bf16 autocast, torch.compile, EMA, MixUp, clipping."""
    from emergence_ray.config import TrainConfig

    cuda = torch.device("cuda")
    _, path = _save_torchvision(tmp_path, num_classes=1000)
    model = build_for_job(ModelConfig(name="resnet18", pretrained=str(path)), 3, 10, 64).to(cuda)
    model = model.to(memory_format=torch.channels_last) if recipe.channels_last(TrainConfig(), cuda) else model
    ema = recipe.build_ema(model, 0.99)
    opt = build_optimizer(model, OptimConfig(backbone_lr_mult=0.1))
    batches = [{"image": torch.randn(32, 3, 64, 64, device=cuda), "label": torch.randint(0, 10, (32,), device=cuda)}
               for _ in range(4)]
    t = train_epoch(torch.compile(model), batches, opt, None, cuda, bf16=True, grad_accum_steps=2, grad_clip=1.0,
                    mix=recipe.build_mix(AugmentConfig(mixup=0.2, cutmix=1.0), 10),
                    after_update=lambda: ema.update_parameters(model))
    assert t.count == 128 and np.isfinite(t.loss) and int(ema.n_averaged) == 3


def test_evaluation_uses_the_ema_weights_and_old_resnet18_checkpoints_still_load(tmp_path):
    from emergence_ray.report import model_from_state

    source, ckpt = _our_checkpoint(tmp_path / "c")
    state = checkpoint.load(ckpt)
    averaged = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    checkpoint.save(ckpt, {**state, "ema": averaged, "ema_updates": 5})  # weights_only=True still loads it
    model, _ = model_from_state(checkpoint.load(ckpt))
    assert torch.equal(model.state_dict()["0.weight"], averaged["0.weight"])
    old = build_model("resnet18_small", 1, 3, 8).state_dict()
    assert legacy_name("resnet18", old) == "resnet18_small"
    assert legacy_name("resnet18", build_model("resnet18", 1, 3, 8).state_dict()) == "resnet18"


def test_torchvision_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch):
    """No internet here: a missing file is an error naming it; placed in $TORCH_HOME, it is used."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    m = ModelConfig(name="resnet18", pretrained="IMAGENET1K_V1")
    target = tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(CheckpointError, match=f"pre-fetch that file to {target}"):
        pretrained.ensure_available(m)
    tv, path = _save_torchvision(tmp_path, num_classes=1000)
    target.parent.mkdir(parents=True, exist_ok=True)  # torch made the folder for its failed download
    shutil.copy(path, target)
    pretrained.ensure_available(m)
    ours = build_for_job(m, 3, 5, 32)
    assert torch.equal(ours.layer1[0].conv1.weight, tv.layer1[0].conv1.weight)
    with pytest.raises(CheckpointError, match="choose one of IMAGENET1K_V1, DEFAULT"):
        pretrained.weights_enum("resnet18", "IMAGENET1K_V9")


def test_models_command_lists_every_model_and_blocks():
    proc = subprocess.run([*CLI, "models"], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert {line.split()[0] for line in lines[1:-1]} == set(MODEL_NAMES)
    assert any(line.startswith("resnet50 ") and "IMAGENET1K_V2" in line for line in lines)
    proc = subprocess.run([*CLI, "models", "--blocks", "resnet5"], capture_output=True, text=True, env=cli_env(),
                          timeout=120)
    assert proc.returncode == 2 and "did you mean resnet50" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def three_digit_classes(tmp_path_factory) -> Path:
    """An ImageFolder of the digits 0, 1 and 2 only: another number of classes than ImageNet's or the digits'."""
    root = tmp_path_factory.mktemp("three_digits")
    images, labels = digits_arrays()
    for i, (img, y) in enumerate(zip(images, labels)):
        if y < 3:
            (root / f"digit_{y}").mkdir(exist_ok=True)
            (root / f"digit_{y}" / f"{i:05d}.png").write_bytes(png_bytes(img))
    return root


@pytest.mark.slow  # multi-minute: deselected by default (README: -m slow)
def test_finetune_job_runs_from_the_torch_hub_cache(tmp_path, three_digit_classes):
    """jobs/finetune_imagefolder.yaml through the real CLI on an embedded Ray, made small (one CPU
    worker, 200 images of 16 px, one epoch): without the weights file, exit 2 naming it before Ray starts; with
    it in $TORCH_HOME, the run trains (EMA, MixUp/CutMix, clipping on) and evaluates."""
    home = tmp_path / "torch_home"
    args = [*CLI, "train", "--config", str(ROOT / "jobs" / "finetune_imagefolder.yaml"),
            "--set", f"data.path={three_digit_classes}", "--set", "data.image_size=16", "--set", "train.epochs=1",
            "--set", "data.limit=200",
            "--set", "scaling.use_gpu=false", "--set", "scaling.num_workers=1", "--set", "train.batch_size=32",
            "--set", f"run.storage_path={tmp_path / 'runs'}", "--set", "run.name=finetune"]
    env = cli_env(TORCH_HOME=str(home), HOME=str(tmp_path))
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "resnet18-f37072fd.pth" in proc.stderr and str(home / "hub" / "checkpoints") in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
    _, path = _save_torchvision(tmp_path, num_classes=1000)
    (home / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(path, home / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    state = checkpoint.load(summary["checkpoint"])
    assert state["spec"]["mean"] == pretrained.IMAGENET_MEAN and len(state["spec"]["class_names"]) == 3
    assert state["ema_updates"] > 1 and state["ema"]["fc.weight"].shape == (3, 512)
    assert summary["images"]["test"] > 0 and 0.0 <= summary["test_accuracy"] <= 1.0
