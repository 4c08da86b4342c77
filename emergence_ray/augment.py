"""Train-only augmentation on a batch tensor, in plain torch: random crop after padding, random
horizontal flip. It runs inside the training worker on the device the batch lives on (free on a
GPU, a gather per batch on a CPU), after the shard has been read, so augmenting costs Ray Data
no work and a cached shard still sees fresh crops every epoch.

    aug = BatchAugment.from_config(cfg.data.augment, spec)   # None when augmentation is off
    x = aug(x, generator)                                    # (N, C, H, W) normalized images
"""

from __future__ import annotations

import torch

from emergence_ray.config import AugmentConfig
from emergence_ray.data.transforms import DataSpec


class BatchAugment:
    """Like torchvision's RandomCrop(padding=p) + RandomHorizontalFlip, batched. The padding is
    black, which is -mean/std after normalization: padding with 0 would paint grey borders that
    validation images never have. Random draws come from a CPU `torch.Generator`, so a seeded
    epoch gives the same crops on any device and after a resume."""

    def __init__(self, padding: int, flip: bool, fill: list[float]):
        self.padding, self.flip = padding, flip
        self.fill = torch.tensor(fill, dtype=torch.float32).view(1, -1, 1, 1)

    @classmethod
    def from_config(cls, aug: AugmentConfig, spec: DataSpec) -> BatchAugment | None:
        if not aug.crop_padding and not aug.flip:
            return None
        return cls(aug.crop_padding, aug.flip, [-m / s for m, s in zip(spec.mean, spec.std)])

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.padding:
            p = self.padding
            padded = self.fill.to(x.device, x.dtype).expand(n, c, h + 2 * p, w + 2 * p).clone()
            padded[:, :, p:p + h, p:p + w] = x
            dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
            rows = dy.view(n, 1) + torch.arange(h, device=x.device)  # (n, h): source row of each output row
            cols = dx.view(n, 1) + torch.arange(w, device=x.device)
            x = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * p))
            x = x.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))
        if self.flip:
            mirror = (torch.rand(n, generator=generator) < 0.5).to(x.device)
            x = torch.where(mirror.view(n, 1, 1, 1), x.flip(3), x)
        return x
