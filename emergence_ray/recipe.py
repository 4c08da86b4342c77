"""The training recipe's switches, each from a well-kept library: MixUp / CutMix
(`torchvision.transforms.v2`), an EMA of the weights (`torch.optim.swa_utils.AveragedModel`),
SyncBatchNorm, channels_last and `torch.compile` (torch). Plain torch; the worker wires them in.

    mix = build_mix(cfg.data.augment, num_classes)   # None when both are off
    ema = build_ema(bare_model, cfg.train.ema)       # None when off
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from emergence_ray.config import AugmentConfig, TrainConfig


def build_mix(aug: AugmentConfig, num_classes: int) -> Callable | None:
    """(images, int labels) -> (mixed images, soft labels); with both on, one of the two per batch."""
    if not aug.mixup and not aug.cutmix:
        return None
    from torchvision.transforms import v2

    chosen = []
    if aug.mixup:
        chosen.append(v2.MixUp(alpha=aug.mixup, num_classes=num_classes))
    if aug.cutmix:
        chosen.append(v2.CutMix(alpha=aug.cutmix, num_classes=num_classes))
    return chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen)


def build_ema(model: nn.Module, decay: float | None) -> torch.optim.swa_utils.AveragedModel | None:
    """ema <- decay * ema + (1 - decay) * weights after every optimizer step, starting from the
    initial weights. Batch-norm statistics are copied from the model (use_buffers=False): averaging
    the integer step counters is not defined."""
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    ema.update_parameters(model)  # the first update copies: the average starts at the initial weights
    return ema


def ema_state(ema: torch.optim.swa_utils.AveragedModel) -> dict:
    return {"ema": ema.module.state_dict(), "ema_updates": int(ema.n_averaged)}


def load_ema(ema: torch.optim.swa_utils.AveragedModel, state: dict) -> None:
    ema.module.load_state_dict(state["ema"])
    ema.n_averaged.fill_(state["ema_updates"])


def channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"


def sync_batchnorm(model: nn.Module, cfg: TrainConfig, device: torch.device, world: int) -> nn.Module:
    """Batch statistics over every GPU's batch (small per-GPU batches otherwise give noisy ones).
    Only on CUDA: torch's SyncBatchNorm has no CPU kernel."""
    if cfg.sync_bn and world > 1 and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
