"""What happens to a batch on the training worker's device, in plain torch: uint8 (N, C, L, L)
from the wire -> float, normalized with the DataSpec's mean/std, augmented (training) or centre
cropped (evaluation). It runs where the batch lives (free on a GPU, a gather per batch on a CPU),
after the shard has been read, so augmenting costs Ray Data no work and a cached shard still sees
fresh crops every epoch.

Two policies (`data.augment.policy`):
- small (default): random crop after padding + optional flip (`BatchAugment`), for small images
  at native size (digits, MNIST, CIFAR-like): nothing is cut away.
- imagenet: RandomResizedCrop (`data.augment.scale`, `.ratio`) + flip for training; evaluation
  takes the centre `image_size` square of images whose shorter side was resized to
  `image_size / crop_fraction` (the torchvision / timm convention), for photos.

    to_model = DeviceTransform(spec, cfg.data.augment, train=True)
    x = to_model(batch["image"], generator)                  # float32 (N, C, S, S), normalized
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

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
        flip = bool(aug.flip)
        if not aug.crop_padding and not flip:
            return None
        return cls(aug.crop_padding, flip, [-m / s for m, s in zip(spec.mean, spec.std)])

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


def random_resized_crop_boxes(n: int, side: int, scale: tuple[float, float], ratio: tuple[float, float],
                              generator: torch.Generator | None) -> torch.Tensor:
    """torchvision's RandomResizedCrop box sampling for n images of side x side, vectorized:
    ten tries per image of an area fraction in `scale` and a log-uniform aspect in `ratio`; an
    image with no fitting try gets the centre crop at the clamped ratio. -> (n, 4) x0, y0, w, h."""
    tries = 10
    area = side * side * torch.empty(n, tries).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).round()
    h = torch.sqrt(area / r).round()
    fits = (w > 0) & (h > 0) & (w <= side) & (h <= side)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    w = torch.where(first >= 0, w[rows, first.clamp(min=0)], torch.full((n,), float(side)))
    h = torch.where(first >= 0, h[rows, first.clamp(min=0)], torch.full((n,), float(side)))
    u = torch.rand(n, 2, generator=generator)
    x0 = torch.floor(u[:, 0] * (side - w + 1))
    y0 = torch.floor(u[:, 1] * (side - h + 1))
    return torch.stack([x0, y0, w, h], 1)


class DeviceTransform:
    """uint8 wire batch -> normalized float batch for the model, on the batch's device."""

    def __init__(self, spec: DataSpec, aug: AugmentConfig | None = None, train: bool = False):
        self.spec, self.train = spec, train
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        aug = aug or AugmentConfig()
        self.imagenet = spec.policy == "imagenet"
        self.scale, self.ratio = tuple(aug.scale), tuple(aug.ratio)
        self.flip = aug.flip if aug.flip is not None else self.imagenet
        self.small_aug = BatchAugment.from_config(aug, spec) if train and not self.imagenet else None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x.float() * (1.0 / 255.0) - mean) / std

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dtype != torch.uint8:  # already float (a caller that normalized itself)
            return x
        size, side = self.spec.image_size, x.shape[-1]
        if not self.imagenet:
            x = self.normalize(x)
            return self.small_aug(x, generator) if self.small_aug is not None else x
        if not self.train:
            top = (side - size) // 2
            return self.normalize(x[:, :, top:top + size, top:top + size])
        n = len(x)
        boxes = random_resized_crop_boxes(n, side, self.scale, self.ratio, generator).to(x.device)
        x0, y0, w, h = boxes.unbind(1)
        sign = torch.ones(n, device=x.device)
        if self.flip:
            sign = torch.where((torch.rand(n, generator=generator) < 0.5).to(x.device), -sign, sign)
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0] = sign * w / side  # a negative x scale mirrors the crop
        theta[:, 0, 2] = (2 * x0 + w) / side - 1
        theta[:, 1, 1] = h / side
        theta[:, 1, 2] = (2 * y0 + h) / side - 1
        grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
        out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return self.normalize(out)  # per-channel affine: commutes with the bilinear resampling
