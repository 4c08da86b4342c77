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

# values per image (a 128 px RGB image) from which a CPU normalizes image by image: 1.6-2x faster
# at 128-224 px where the worker keeps freed memory (`scaling.keep_freed_memory`), even without;
# below, the loop's ~9 us per image costs more than the cache saves (benchmarks/README.md)
PER_IMAGE_FROM = 3 * 128 * 128


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
        mean = torch.tensor(spec.mean, dtype=torch.float64).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float64).view(1, -1, 1, 1)
        # (x / 255 - mean) / std as one multiply and one subtract, in place on the float copy:
        # three out-of-place ops allocate three batch-sized temporaries (4x slower on a CPU)
        self.scale = (1.0 / (255.0 * std)).float()
        self.shift = (mean / std).float()
        aug = aug or AugmentConfig()
        self.imagenet = spec.policy == "imagenet"
        self.scale_range, self.ratio = tuple(aug.scale), tuple(aug.ratio)
        self.flip = aug.flip if aug.flip is not None else self.imagenet
        self.small_aug = BatchAugment.from_config(aug, spec) if train and not self.imagenet else None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> float32 (x / 255 - mean) / std in a new tensor (a float x: in place). On a
        CPU, images of `PER_IMAGE_FROM` values and more are converted one at a time, each while
        it is in the cache: the batch at once makes three passes over a batch-sized float tensor in
        memory (64 images at 224 px: 38 MB each pass)."""
        if x.device.type == "cpu" and x.dtype == torch.uint8 and math.prod(x.shape[1:]) >= PER_IMAGE_FROM:
            out = torch.empty(x.shape, dtype=torch.float32)
            scale, shift = self.scale[0], self.shift[0]
            for o, image in zip(out, x):
                o.copy_(image).mul_(scale).sub_(shift)
            return out
        return x.to(torch.float32).mul_(self.scale.to(x.device)).sub_(self.shift.to(x.device))

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
        boxes = random_resized_crop_boxes(n, side, self.scale_range, self.ratio, generator)
        mirror = (torch.rand(n, generator=generator) < 0.5) if self.flip else torch.zeros(n, dtype=torch.bool)
        if x.device.type == "cpu":
            return crop_resize_normalize(x, boxes, mirror, size, self.scale[0], self.shift[0])
        return self.normalize(crop_resize_grid(x.float(), boxes.to(x.device), mirror.to(x.device), size))


def crop_resize_normalize(x: torch.Tensor, boxes: torch.Tensor, mirror: torch.Tensor, size: int,
                          scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each image's box cut out and resized to size x size (bilinear), mirrored where `mirror`,
    then `* scale - shift` as float32: torchvision's resized_crop exactly, one `interpolate` per
    image on uint8, which a CPU runs about 4x faster than a float `grid_sample` of the batch. Each
    crop is copied out contiguous first (the kernel runs ~1.25x faster on it) and normalized
    into the output while it is in the cache. -> float32 (N, C, size, size)."""
    out = torch.empty(len(x), x.shape[1], size, size, dtype=torch.float32)
    for o, (x0, y0, w, h), flip, image in zip(out, boxes.long().tolist(), mirror.tolist(), x):
        crop = image[None, :, y0:y0 + h, x0:x0 + w].contiguous()
        resized = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
        o.copy_(resized.flip(2) if flip else resized).mul_(scale).sub_(shift)
    return out


def crop_resize_grid(x: torch.Tensor, boxes: torch.Tensor, mirror: torch.Tensor, size: int) -> torch.Tensor:
    """The same crops in one batched `grid_sample` (one kernel on a GPU): bilinear at the same
    points as `crop_resize_normalize`, except that a crop's outermost output pixels, where upscaled,
    blend in the image's pixels just outside the box instead of repeating its edge. float in, float out."""
    n, side = len(x), x.shape[-1]
    x0, y0, w, h = boxes.unbind(1)
    sign = torch.where(mirror, -1.0, 1.0).to(x.device)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = sign * w / side  # a negative x scale mirrors the crop
    theta[:, 0, 2] = (2 * x0 + w) / side - 1
    theta[:, 1, 1] = h / side
    theta[:, 1, 2] = (2 * y0 + h) / side - 1
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
