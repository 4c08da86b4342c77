"""Typed job configuration: YAML file + dotted `--set` overrides, validated at load time.

A typo fails on the laptop, not on the cluster: unknown keys and bad values raise
`ConfigError` naming the dotted key (`optim.lr: must be > 0`).

    cfg = load_config("jobs/digits.yaml", ["optim.lr=3e-4", "train.epochs=5"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from emergence_ray.errors import ConfigError

# Model names, checked here without importing torch, so that a bad config fails in a fraction of a
# second. SMALL_MODELS are ours (`emergence_ray.models.small`); TORCHVISION_MODELS is
# `torchvision.models.list_models(module=torchvision.models)` (tests/test_models.py keeps both in step).
SMALL_MODELS = ("cnn", "mlp", "resnet18_small")
TORCHVISION_MODELS = (
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny", "densenet121",
    "densenet161", "densenet169", "densenet201", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
    "efficientnet_b3", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
    "efficientnet_v2_l", "efficientnet_v2_m", "efficientnet_v2_s", "googlenet", "inception_v3", "maxvit_t",
    "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3", "mobilenet_v2", "mobilenet_v3_large",
    "mobilenet_v3_small", "regnet_x_16gf", "regnet_x_1_6gf", "regnet_x_32gf", "regnet_x_3_2gf",
    "regnet_x_400mf", "regnet_x_800mf", "regnet_x_8gf", "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf",
    "regnet_y_32gf", "regnet_y_3_2gf", "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf", "resnet101",
    "resnet152", "resnet18", "resnet34", "resnet50", "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "squeezenet1_0",
    "squeezenet1_1", "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s", "swin_v2_t", "vgg11", "vgg11_bn",
    "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "vit_b_16", "vit_b_32", "vit_h_14",
    "vit_l_16", "vit_l_32", "wide_resnet101_2", "wide_resnet50_2",
)
MODEL_NAMES = SMALL_MODELS + TORCHVISION_MODELS
MAX_SEED = 2**32 - 1  # numpy seeds must fit 32 bits; the worker adds rank and epoch offsets to it
MAX_WORKERS = 4096  # far beyond any cluster this runs on; catches typos such as 1e9


class _Section(BaseModel):
    # extra="forbid": an unknown key is an error, never silently ignored. allow_inf_nan=False: NaN and
    # inf (YAML .nan / .inf) are refused for every float key; the bounds below exclude absurd values.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class AugmentConfig(_Section):
    policy: Literal["small", "imagenet"] = Field(
        "small", description="small: pad-and-crop at native size (digits, MNIST, CIFAR-like); imagenet: "
                             "RandomResizedCrop + flip for training, shorter-side resize + centre crop for "
                             "evaluation (photos)")
    crop_padding: int = Field(1, ge=0, le=64, description="small: random crop after black padding, in pixels; 0 = off")
    flip: bool | None = Field(None, description="random horizontal flip; None = the policy's default (small: off, "
                                                "digits are not mirror-symmetric; imagenet: on)")
    scale: tuple[float, float] = Field((0.08, 1.0), description="imagenet: RandomResizedCrop area fraction range")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="imagenet: RandomResizedCrop aspect range")
    crop_fraction: float = Field(0.875, gt=0.1, le=1.0, description="imagenet: evaluation crop / resized shorter "
                                                                    "side (224 of 256)")

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError("data.augment.scale must be [lo, hi] with 0 < lo <= hi <= 1")
        if not (0 < self.ratio[0] <= self.ratio[1] < 100):
            raise ValueError("data.augment.ratio must be [lo, hi] with 0 < lo <= hi")
        return self
    mixup: float = Field(0.0, ge=0, le=100, description="MixUp alpha (torchvision.transforms.v2.MixUp) on each train "
                                                "batch; 0 = off (0.2 is a common choice)")
    cutmix: float = Field(0.0, ge=0, le=100, description="CutMix alpha (torchvision.transforms.v2.CutMix); 0 = off; "
                                                 "with mixup too, each batch gets one of the two at random")


class DataConfig(_Section):
    source: Literal["digits", "imagefolder", "parquet", "idx"] = "digits"
    path: str | None = Field(None, description="folder, file or URI (s3://, gs://); unused for digits")
    image_column: str = "image"
    label_column: str = "label"
    image_size: int | None = Field(None, ge=4, le=1024, description="square side in pixels; None = native size")
    channels: Literal[1, 3] | None = Field(None, description="1 or 3; None = from the data")
    class_names: list[str] | None = Field(None, description="names for integer labels (idx, parquet)")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="carved from train when no val split exists")
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="for single-tree sources only")
    split_seed: int = Field(0, ge=0, le=MAX_SEED)
    on_bad_image: Literal["fail", "skip"] = "fail"
    limit: int | None = Field(None, gt=0, le=10**10, description="use at most this many training images (smoke runs)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    ingest: Literal["auto", "cache", "stream"] = Field(
        "auto", description="cache: each worker holds its shard in memory (uint8) after one read (epochs cost "
                            "Ray Data nothing); stream: Ray Data reads, decodes and streams it every epoch, "
                            "nothing materialized (any size); auto: cache when it fits")
    decode_niceness: int | None = Field(
        15, ge=0, le=19, description="nice value of the streamed ImageFolder's decode actors' threads (Ray's own "
                                     "for its workers): below the training workers (scaling.worker_niceness), so a "
                                     "worker never waits for a CPU behind a decode that is ahead of it, and each "
                                     "actor decodes two batches at once for the cycles the workers leave; null "
                                     "keeps the nice value Ray started them with, one decode at a time")
    cache_gb_per_worker: float = Field(4.0, gt=0, le=4096, description="auto caches when a worker's train + val shard, "
                                                               "as decoded uint8 images, is at most this many GiB")

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source != "digits" and not self.path:
            raise ValueError(f"data.path is required for data.source={self.source}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("data.val_fraction + data.test_fraction must be < 1")
        return self


def closest_models(name: str, n: int = 3) -> list[str]:
    import difflib

    return difflib.get_close_matches(name.lower(), MODEL_NAMES, n=n, cutoff=0.5)


class ModelConfig(_Section):
    name: str = Field("cnn", description="one of SMALL_MODELS or any torchvision classification model "
                                         "(`emergence-ray models` lists them)")
    width: int = Field(32, gt=0, le=4096, description="channels of the first conv layer / hidden units of the mlp "
                                             "(small models only)")
    depth: int = Field(2, gt=0, le=64, description="hidden layers of the mlp")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="before the classifier head (small models)")
    pretrained: str | None = Field(
        None, description="start from: a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), a state_dict "
                          "file (local path, s3://, gs://), or a checkpoint directory of an emergence-ray run")
    freeze: Literal["none", "backbone"] | int = Field(
        "none", description="backbone: train only the classifier head; N: freeze the stem and the first N "
                            "blocks (`emergence-ray models --blocks NAME` lists them)")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in MODEL_NAMES:
            close = closest_models(v)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ValueError(f"unknown model {v!r}; {hint}`emergence-ray models` lists all {len(MODEL_NAMES)}")
        return v

    @field_validator("freeze")
    @classmethod
    def _freeze(cls, v: str | int) -> str | int:
        if isinstance(v, int) and not 0 <= v <= 1000:  # the deepest torchvision model has far fewer blocks
            raise ValueError("must be none, backbone or a number of blocks in 0..1000")
        return v

    @model_validator(mode="after")
    def _weights_fit(self) -> ModelConfig:
        if self.pretrained and self.name in SMALL_MODELS and is_weights_name(self.pretrained):
            raise ValueError(f"model.pretrained={self.pretrained}: torchvision weights exist only for "
                             f"torchvision models, not {self.name!r}; pass a state_dict file or a checkpoint")
        return self


def is_weights_name(pretrained: str) -> bool:
    """`IMAGENET1K_V2`, `DEFAULT`: a torchvision weights enum member, not a path."""
    return pretrained.replace("_", "").isalnum() and pretrained.upper() == pretrained


class OptimConfig(_Section):
    name: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(3e-3, gt=0, le=10, description="peak learning rate, per batch of train.batch_size x workers")
    weight_decay: float = Field(5e-4, ge=0, le=10, description="decoupled; only tensors with dim >= 2")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    betas: tuple[float, float] = Field((0.9, 0.999), description="adamw moment decay rates, each in [0, 1)")
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0, le=10_000)
    backbone_lr_mult: float = Field(1.0, gt=0, le=1.0, description="lr of every layer but the classifier head, "
                                                                   "as a fraction of optim.lr (fine-tuning: 0.1)")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"{list(v)}: each beta must be in [0, 1), e.g. [0.9, 0.999]")
        return v


class TrainConfig(_Section):
    epochs: int = Field(10, gt=0, le=100_000)
    batch_size: int = Field(64, gt=0, le=65_536, description="per worker")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    evaluate: Literal["best", "last"] = Field("best", description="checkpoint evaluated on the test split")
    keep_checkpoints: int = Field(2, gt=0, le=10_000)
    bf16: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU)")
    log_every_s: float = Field(10.0, gt=0, le=86_400)
    ema: float | None = Field(None, gt=0, lt=1, description="decay of an exponential moving average of the "
                              "weights (e.g. 0.999 per optimizer step), validated and checkpointed; null = off")
    grad_accum_steps: int = Field(1, ge=1, le=4096,
                                  description="batches per optimizer step (DDP syncs only on the last)")
    grad_clip: float | None = Field(None, gt=0, le=1e6, description="clip the global gradient norm to this; null = off")
    compile: bool = Field(False, description="torch.compile the model (slow first steps; pays off on long GPU runs)")
    channels_last: bool | None = Field(None, description="channels_last memory format; null = on GPU only")
    sync_bn: bool = Field(True, description="SyncBatchNorm when training on more than one GPU")


class ScalingConfig(_Section):
    num_workers: int | tuple[int, int] = Field(2, description="workers, or [min, max] for elastic training")
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(
        None, gt=0, le=1024, description="None = fit the workers so that some node keeps a whole CPU for Ray Data")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="placement group strategy for the workers (SPREAD: across nodes)")
    autoscaling: bool = Field(False, description="the cluster grows on demand: skip the fail-fast check "
                                                 "against its current size")
    worker_niceness: int | None = Field(
        0, ge=-20, le=19, description="nice value of the training worker processes (Ray starts workers at 15, "
                                      "below its own daemons); null keeps Ray's")
    keep_freed_memory: bool | None = Field(
        None, description="training workers, predict's model replicas and the driver's evaluation on a CPU use "
                          "glibc's allocator keeping large freed blocks for reuse "
                          "(cluster.TRAIN_WORKER_MALLOC); null = on for CPU workers whose batch of float images "
                          "reaches 8 MiB (e.g. 64 images at 100 px), where it makes a step up to 1.8x faster")

    @field_validator("num_workers")
    @classmethod
    def _positive(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        lo, hi = (v, v) if isinstance(v, int) else v
        if lo < 1 or hi < lo or hi > MAX_WORKERS:
            raise ValueError(f"must be in 1..{MAX_WORKERS}, or [min, max] with 1 <= min <= max <= {MAX_WORKERS}")
        return v

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]


class RunConfig(_Section):
    name: str | None = Field(None, description="re-running with the same name resumes; None = new timestamped name")
    storage_path: str = Field("~/emergence-ray-runs", description="local path, NFS, or s3:// / gs:// URI")
    max_failures: int = Field(0, ge=-1, le=10_000, description="worker-group restarts; -1 = unlimited")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v.startswith(".")):
            raise ValueError(f"run.name {v!r} must be a plain folder name (no '/', not starting with '.')")
        return v


class TrackingConfig(_Section):
    """Experiment tracking (emergence_ray/tracking.py): TensorBoard event files in every run directory,
    and MLflow when a tracking URI is given here or in MLFLOW_TRACKING_URI."""

    tensorboard: bool = Field(True, description="rank 0 writes TensorBoard event files to <run dir>/tensorboard")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (http://host:5000, sqlite:///...); "
                                                     "None = $MLFLOW_TRACKING_URI, else no MLflow")
    experiment: str = Field("emergence-ray", min_length=1, description="MLflow experiment name")
    on_error: Literal["warn", "fail"] = Field(
        "warn", description="MLflow unreachable: warn = train untracked, with a warning; fail = stop before training")
    log_model: bool = Field(True, description="log the evaluated checkpoint as an MLflow model (mlflow.pytorch)")


class JobConfig(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tune: dict[str, Any] | None = Field(None, description="sweep section, validated by emergence_ray.tune")


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = raw
    for i, key in enumerate(parents):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parents[: i + 1])}: is a value, not a section; cannot set {dotted}")
        node = child
    node[leaf] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`optim.lr=3e-4` -> ("optim.lr", 3e-4); values are YAML ("null", "[1, 2]", "true")."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set optim.lr=3e-4")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: value {text!r} is not valid YAML ({err})") from None
    return key, value


_RANGE_ERRORS = {"finite_number", "greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _num(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def _allowed_range(loc: tuple) -> str | None:
    """The bounds of the key at `loc` as text (`0 < x <= 10`), read from the Field constraints."""
    model, field = JobConfig, None
    for part in loc:
        if not isinstance(part, str) or model is None or part not in model.model_fields:
            break
        field = model.model_fields[part]
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if field is None:
        return None
    low = high = None
    for m in field.metadata:
        for attr, sign in (("gt", "<"), ("ge", "<=")):
            if getattr(m, attr, None) is not None:
                low = f"{_num(getattr(m, attr))} {sign} "
        for attr, sign in (("lt", "<"), ("le", "<=")):
            if getattr(m, attr, None) is not None:
                high = f" {sign} {_num(getattr(m, attr))}"
    if low is None and high is None:
        return "a finite number"
    return f"{low or ''}{'.'.join(str(p) for p in loc)}{high or ''}"


def validate(raw: dict) -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "config"
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; see emergence_ray/config.py for the keys)"
            elif (allowed := _allowed_range(e["loc"])) and e["type"] in _RANGE_ERRORS:
                msg = f"{msg}; allowed: {allowed} (got {e.get('input')!r})"
            lines.append(f"{key}: {msg}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def load_raw(path: str | Path | None, overrides: list[str] = ()) -> dict:
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing YAML file to --config")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (data:, model:, ...)")
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> JobConfig:
    return validate(load_raw(path, overrides))


def to_dict(cfg: JobConfig) -> dict:
    return cfg.model_dump(mode="json")
