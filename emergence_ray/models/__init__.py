"""Model registry: our small models for tiny images and every torchvision classifier.

    model = build_model("resnet50", in_channels=1, num_classes=10, image_size=64)
    model = build_for_job(cfg.model, spec)              # + pretrained weights and freezing

Input channels, class count and image size come from the data, never from the job file: the
head is sized for the classes, the stem for the channels. Every built model carries the names of
its head (`model.er_head`) and stem (`model.er_stem`), for loading weights, freezing and the
backbone learning rate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from emergence_ray.config import SMALL_MODELS, TORCHVISION_MODELS, ModelConfig, is_weights_name
from emergence_ray.models.small import SMALL
from emergence_ray.models.zoo import blocks, build_torchvision, first_conv, head_name

Builder = Callable[..., nn.Module]
MODELS: dict[str, Builder] = {**SMALL, **{name: build_torchvision for name in TORCHVISION_MODELS}}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, width: int = 32,
                depth: int = 2, dropout: float = 0.0, imagenet_weights: bool = False) -> nn.Module:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; `emergence-ray models` lists them")
    if name in SMALL_MODELS:
        model = MODELS[name](in_channels, num_classes, image_size, width=width, depth=depth, dropout=dropout)
    else:
        model = build_torchvision(name, in_channels, num_classes, image_size, imagenet_weights)
    model.er_head = head_name(model, num_classes)
    model.er_stem = first_conv(model) if name != "mlp" else "1"
    return model


def build_for_job(m: ModelConfig, channels: int, num_classes: int, image_size: int,
                  load_weights: bool = True, class_names: list[str] | None = None) -> nn.Module:
    """The job's model: architecture, then `model.pretrained` weights (when `load_weights`; a
    checkpoint of this run replaces them anyway; the head only if trained on `class_names`),
    then `model.freeze`."""
    from emergence_ray.models import pretrained

    imagenet = bool(m.pretrained) and is_weights_name(m.pretrained)
    model = build_model(m.name, channels, num_classes, image_size, m.width, m.depth, m.dropout, imagenet)
    if m.pretrained and load_weights:
        pretrained.load_into(model, m.pretrained, m.name, class_names)
    freeze(model, m.freeze)
    return model


def legacy_name(name: str, state_dict: dict[str, torch.Tensor]) -> str:
    """Checkpoints written before the zoo called our small ResNet `resnet18` (3x3 stem)."""
    w = state_dict.get("conv1.weight")
    if name == "resnet18" and w is not None and w.shape[-1] == 3:
        return "resnet18_small"
    return name


def _under(name: str, modules: list[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def freeze(model: nn.Module, how: str | int) -> list[str]:
    """Stop training part of the model; -> names of the frozen parameters. `backbone`: all but the
    head; N: the first N blocks (`blocks`), with any parameter outside every block (ViT's class
    token and position embedding). Batch norms inside become torchvision's FrozenBatchNorm2d, so
    their running statistics stay as loaded too."""
    if how == "none" or how == 0:
        return []
    head = model.er_head
    if how == "backbone":
        frozen_modules = [n for n, _ in model.named_children() if not _under(head, [n])]
        frozen_modules += _siblings_of_head(model, head)
    else:
        all_blocks = blocks(model, head)
        if how > len(all_blocks):
            from emergence_ray.errors import ConfigError

            raise ConfigError(f"model.freeze={how}: the model has {len(all_blocks)} blocks; "
                              "`emergence-ray models --blocks NAME` lists them")
        frozen_modules = [n for _, names in all_blocks[:how] for n in names]
        in_blocks = [n for _, names in all_blocks for n in names]
        frozen_modules += [n.rsplit(".", 1)[0] if "." in n else n for n, _ in model.named_parameters()
                           if not _under(n, in_blocks) and not _under(n, [head])]
    names = []
    for n, p in model.named_parameters():
        if _under(n, frozen_modules) and not _under(n, [head]):
            p.requires_grad_(False)
            names.append(n)
    _freeze_batchnorms(model, [m for m in frozen_modules if not _under(m, [head])])
    return names


def _siblings_of_head(model: nn.Module, head: str) -> list[str]:
    """Modules beside the head inside its parents (e.g. `classifier.0` beside `classifier.3`)."""
    out, parts = [], head.split(".")
    for depth in range(1, len(parts)):
        parent = ".".join(parts[:depth])
        on_path = ".".join(parts[:depth + 1])
        out += [f"{parent}.{n}" for n, _ in model.get_submodule(parent).named_children()
                if f"{parent}.{n}" != on_path]
    return out


def _freeze_batchnorms(model: nn.Module, modules: list[str]) -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, m in list(model.named_modules()):
        if isinstance(m, nn.BatchNorm2d) and _under(name, modules):
            frozen = FrozenBatchNorm2d(m.num_features, m.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(m, key).detach())
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, frozen)


def head_parameters(model: nn.Module) -> set[str]:
    head = getattr(model, "er_head", None)
    return {n for n, _ in model.named_parameters() if head is not None and _under(n, [head])}


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def smoke_forward(model: nn.Module, in_channels: int, image_size: int) -> torch.Tensor:
    return model.eval()(torch.zeros(2, in_channels, image_size, image_size))
