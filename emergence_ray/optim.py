"""Optimizers and learning-rate schedules (plain torch).

Weight decay is decoupled from the learning rate (AdamW; SGD gets the same treatment by
scaling decay with lr/peak_lr inside torch's `weight_decay` being *coupled*, so we apply it
ourselves) and only touches tensors with dim >= 2: biases and norm gains are not decayed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from emergence_ray.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None,
                 backbone_lr_mult: float = 1.0) -> list[dict]:
    """Decay / no-decay groups; with `backbone_lr_mult` < 1, each split again into the classifier
    head (at `lr`) and the rest (at `lr * backbone_lr_mult`: pretrained layers move less)."""
    from emergence_ray.models import head_parameters

    head = head_parameters(model) if backbone_lr_mult != 1.0 else set()
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:  # frozen parameters never reach the optimizer
            groups.setdefault((name in head or not head, p.dim() >= 2), []).append(p)
    out = []
    for is_head in ((True, False) if head else (True,)):
        for decays in (True, False):
            group = {"params": groups.get((is_head, decays), []), "weight_decay": weight_decay if decays else 0.0}
            if lr is not None:
                group["lr"] = lr if is_head else lr * backbone_lr_mult
            if group["params"] or not head:
                out.append(group)
    return out


class DecoupledSGD(torch.optim.SGD):
    """SGD (momentum, Nesterov) with decoupled weight decay: w <- w - lr/peak_lr * wd * w.

    Decay is a per-step shrink that follows the schedule but not the lr's magnitude, so lr and
    wd tune independently (the same reparametrisation AdamW uses, with lr scaled out)."""

    def __init__(self, params: Iterable, lr: float, momentum: float, nesterov: bool):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0)
        for group in self.param_groups:
            group.setdefault("decoupled_wd", group.pop("weight_decay", 0.0))
            group["weight_decay"] = 0.0
            group["peak_lr"] = group["lr"]  # per group: the backbone's may be lower

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        for group in self.param_groups:
            wd = group["decoupled_wd"]
            if wd:
                shrink = 1.0 - group["lr"] / group["peak_lr"] * wd
                for p in group["params"]:
                    if p.grad is not None:
                        p.mul_(shrink)
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.backbone_lr_mult)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    if cfg.name == "sgd":
        for g in groups:
            g["decoupled_wd"] = g.pop("weight_decay")
        return DecoupledSGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}; choose sgd or adamw")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier on the peak lr at `step` (0-based)."""
    if schedule == "constant":
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if schedule == "onecycle":
        # linear up over the first 25% (at least warmup), linear down to 0: the airbench shape
        peak = max(warmup_steps, total_steps // 4, 1)
        if step < peak:
            return (step + 1) / peak
        return max(0.0, (total_steps - step) / max(1, total_steps - peak))
    # cosine with linear warmup
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    warmup = min(warmup, total - 1) if total > 1 else 0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, cfg.schedule)
    )
