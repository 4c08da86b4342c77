"""Per-batch image transforms in plain numpy/PIL: decode, convert to the model's channels,
resize, normalize. Ray Data runs them in `map_batches`; they import nothing from Ray, so they are
tested and reused anywhere (evaluation, prediction, benchmarks). Train-only augmentation runs in
the training workers, in torch: `emergence_ray.data.augment`.
"""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from emergence_ray.errors import DataError
from emergence_ray.priority import yield_this_thread

log = logging.getLogger("emergence_ray")

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
    policy: str = "small"  # data.augment.policy: how images are sized on the wire and cropped
    load_size: int | None = None  # imagenet policy: the square side decoded (shorter side, centre crop)

    @property
    def wire_size(self) -> int:
        """Side of the uint8 squares Ray Data ships: the model's size, or (imagenet policy) the
        larger square that RandomResizedCrop / the centre crop cut the model's size from."""
        return self.load_size or self.image_size

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


def channel_planes(img: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
    """An L or RGB image -> uint8 (C, H, W), written into `out` if given. PIL unpacks each channel
    plane in C; numpy's transposing copy of the (H, W, C) array steps through it a byte at a time:
    with it a 256 px JPEG cost a decode actor 0.557 ms instead of 0.447, decode included
    (benchmarks/DECODE.md, 1.21x)."""
    w, h = img.size
    bands = img.getbands()
    if out is None:
        out = np.empty((len(bands), h, w), np.uint8)
    if len(bands) == 1:
        out[0] = np.asarray(img, dtype=np.uint8)
        return out
    for c, band in enumerate(bands):
        out[c] = np.frombuffer(img.tobytes("raw", band), np.uint8).reshape(h, w)
    return out


def decode(value: object, ident: str, channels: int, size: int, policy: str = "small",
           out: np.ndarray | None = None) -> np.ndarray:
    """-> uint8 array (channels, size, size), written into `out` if given. small: resized to the
    square (aspect not kept, as today's small-image path); imagenet: shorter side resized to
    `size`, then the centre square (aspect kept, the torchvision/timm convention). Raises
    DataError for unreadable images."""
    try:
        img = _to_pil(value, ident)
        if img.mode in ("I", "I;16", "F"):
            img = Image.fromarray(np.clip(np.asarray(img) / 256.0 if img.mode != "F" else np.asarray(img), 0, 255)
                                  .astype(np.uint8))
        mode = "L" if channels == 1 else "RGB"
        if img.mode != mode:  # convert copies even an image already in the mode
            img = img.convert(mode)
        if policy == "imagenet" and img.size != (size, size):
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
        elif img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"image {ident}: cannot decode ({err}); fix or remove the file, "
                        "or set data.on_bad_image=skip to skip and count such files") from None
    return channel_planes(img, out)


def image_stats(value: object, ident: str) -> tuple[bool, tuple[int, int]]:
    """(grayscale?, (height, width)) of one stored image, for resolving a DataSpec."""
    img = _to_pil(value, ident)
    return is_grayscale(img), (img.height, img.width)


class Decode:
    """map_batches callable: raw rows -> {image: uint8 (N, C, L, L), label[, id][, ok]}, L being
    `spec.wire_size`. Images stay uint8 on the wire (a quarter of float32's bytes in the object
    store and on the way to the device); the training worker converts and normalizes them
    (`emergence_ray.data.augment.DeviceTransform`).

    Unreadable images raise (data.on_bad_image=fail) or come out with ok=False (skip: only then is
    there an `ok` column), so they can be counted and dropped (`keep_ok`)."""

    def __init__(self, spec: DataSpec, on_bad_image: str = "fail", keep_ids: bool = True):
        self.spec = spec
        self.skip = on_bad_image == "skip"
        self.keep_ids = keep_ids

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        ids = batch["id"] if "id" in batch else np.arange(len(images)).astype(str)
        c, s = self.spec.channels, self.spec.wire_size
        out = _fast_path(images, c, s)
        ok = np.ones(len(images), bool)
        if out is None:
            out = np.zeros((len(images), c, s, s), np.uint8)
            for i in range(len(images)):
                try:
                    decode(images[i], str(ids[i]), c, s, self.spec.policy, out=out[i])
                except DataError as err:
                    if not self.skip:
                        raise
                    log.warning("skipping %s", err)
                    ok[i] = False
        result = {"image": out}
        if "label" in batch:
            result["label"] = np.asarray(batch["label"]).astype(np.int64)
        if self.keep_ids:
            result["id"] = np.asarray(ids).astype(str)
        if self.skip:
            result["ok"] = ok
        return result


class DecodeFiles:
    """map_batches callable for long-lived actors: rows of (path, label, id) -> `Decode`'s output,
    reading each file from `fs` (a pyarrow filesystem: local, S3, GCS) and decoding it in the same
    call. An actor is sent its next batches while it decodes the current one, so its CPU does not
    wait between batches as a read task's slot does (benchmarks/STREAM.md).

    Safe to call from several threads (`pipeline.decode_actors` runs a few calls at once): files
    are read concurrently, but at most `decoders` batches are decoded at a time (PIL's decoder and
    resize let go of the GIL), while the other calls read files or hand their output to the object
    store. One: an actor decodes on one CPU, as Ray accounts for it; more only where its threads
    sit below the training workers (`pipeline.actor_decodes`).

    `nice`: each calling thread first moves itself to this nice value (`data.decode_niceness`),
    below the training worker it feeds (`priority.yield_this_thread`). The actor's process is
    its own, so nothing else runs on those threads."""

    def __init__(self, fs, spec: DataSpec, on_bad_image: str = "fail", keep_ids: bool = True,
                 nice: int | None = None, decoders: int = 1):
        if decoders < 1:
            raise ValueError(f"decoders must be at least 1, got {decoders}")
        self.fs, self.decode = fs, Decode(spec, on_bad_image, keep_ids)
        self.decoding = threading.BoundedSemaphore(decoders)
        self.nice, self.niced = nice, threading.local()

    def read(self, path: str) -> bytes:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except OSError as err:
            if not self.decode.skip:
                raise DataError(f"{path}: cannot be read ({err}); remove it or set data.on_bad_image=skip") from err
            log.warning("skipping %s: cannot be read (%s)", path, err)
            return b""  # decodes as unreadable: dropped with ok=False

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"]
        images = np.empty(len(ids), dtype=object)
        if self.nice is not None and not getattr(self.niced, "done", False):
            yield_this_thread(self.nice)
            self.niced.done = True
        images[:] = [self.read(str(p)) for p in ids]
        with self.decoding:
            return self.decode({"image": images, "label": batch["label"], "id": ids})


def at_wire_size(images: object, spec: DataSpec) -> bool:
    """In-memory uint8 images that need no decode or resize for `spec` (digits, IDX at their own size)."""
    return isinstance(images, np.ndarray) and _fast_path(images[:1], spec.channels, spec.wire_size) is not None


def _fast_path(images: object, channels: int, size: int) -> np.ndarray | None:
    """A batch of uint8 arrays already at the wire size (IDX, digits at native size): no PIL."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        return None
    if images.ndim == 3 and channels == 1 and images.shape[1:] == (size, size):
        return images[:, None].copy()
    if images.ndim == 4 and images.shape[1:] == (channels, size, size):
        return images.copy()
    return None


def keep_ok(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the rows of images that could not be read, and the `ok` column itself."""
    mask = batch["ok"]
    return {k: v[mask] for k, v in batch.items() if k != "ok"}


def channel_stats(images_uint8: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of a (N, C, H, W) uint8 sample."""
    x = images_uint8.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 2, 3))
    std = np.maximum(x.std(axis=(0, 2, 3)), 1e-3)
    return [float(m) for m in mean], [float(s) for s in std]
