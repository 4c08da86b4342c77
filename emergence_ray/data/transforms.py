"""Per-batch image transforms in plain numpy/PIL: decode, convert to the model's channels,
resize, normalize. Ray Data runs them in `map_batches`; they import nothing from Ray, so they are
tested and reused anywhere (evaluation, prediction, benchmarks). Train-only augmentation runs in
the training workers, in torch: `emergence_ray.augment`.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from emergence_ray.errors import DataError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff")


@dataclass
class DataSpec:
    """What the model sees; resolved from the data once and saved with every checkpoint so that
    evaluation and prediction preprocess exactly like training."""

    channels: int
    image_size: int
    class_names: list[str]
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataSpec:
        return cls(**d)


def _to_pil(value: object, ident: str) -> Image.Image:
    """One stored image (encoded bytes, HF-style {bytes, path} struct, or uint8 array) -> PIL."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(value)))
        img.load()  # decode now: truncated files fail here, not later
        return img
    if isinstance(value, np.ndarray):
        arr = value
        if arr.dtype != np.uint8:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)  # CHW -> HWC
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        return Image.fromarray(arr)
    raise DataError(f"image {ident}: unsupported value of type {type(value).__name__}; "
                    "expected encoded image bytes, a {bytes, path} struct or a uint8 array")


def is_grayscale(img: Image.Image) -> bool:
    return img.mode in ("1", "L", "LA", "I", "I;16", "F")


def decode(value: object, ident: str, channels: int, size: int) -> np.ndarray:
    """-> uint8 array (channels, size, size). Raises DataError for unreadable images."""
    try:
        img = _to_pil(value, ident)
        if img.mode in ("I", "I;16", "F"):
            img = Image.fromarray(np.clip(np.asarray(img) / 256.0 if img.mode != "F" else np.asarray(img), 0, 255)
                                  .astype(np.uint8))
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"image {ident}: cannot decode ({err}); fix or remove the file, "
                        "or set data.on_bad_image=skip to skip and count such files") from None
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def image_stats(value: object, ident: str) -> tuple[bool, tuple[int, int]]:
    """(grayscale?, (height, width)) of one stored image, for resolving a DataSpec."""
    img = _to_pil(value, ident)
    return is_grayscale(img), (img.height, img.width)


class Preprocess:
    """map_batches callable: raw rows -> {image: float32 (N,C,H,W) normalized, label[, id][, ok]}.

    Unreadable images raise (data.on_bad_image=fail) or come out with ok=False (skip: only then is
    there an `ok` column), so the driver can count and drop them. Training drops `id` here, so
    the materialized result holds exactly what workers read and no per-epoch projection runs."""

    def __init__(self, spec: DataSpec, on_bad_image: str = "fail", keep_ids: bool = True):
        self.spec = spec
        self.skip = on_bad_image == "skip"
        self.keep_ids = keep_ids
        self.mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
        self.inv_std = 1.0 / np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        ids = batch["id"] if "id" in batch else np.arange(len(images)).astype(str)
        n, c, s = len(images), self.spec.channels, self.spec.image_size
        out = np.zeros((n, c, s, s), np.uint8)
        ok = np.ones(n, bool)
        for i in range(n):
            try:
                out[i] = decode(images[i], str(ids[i]), c, s)
            except DataError:
                if not self.skip:
                    raise
                ok[i] = False
        x = (out.astype(np.float32) * (1.0 / 255.0) - self.mean) * self.inv_std
        result = {"image": x}
        if "label" in batch:
            result["label"] = np.asarray(batch["label"]).astype(np.int64)
        if self.keep_ids:
            result["id"] = np.asarray(ids).astype(str)
        if self.skip:
            result["ok"] = ok
        return result


def channel_stats(images_uint8: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of a (N, C, H, W) uint8 sample."""
    x = images_uint8.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 2, 3))
    std = np.maximum(x.std(axis=(0, 2, 3)), 1e-3)
    return [float(m) for m in mean], [float(s) for s in std]
