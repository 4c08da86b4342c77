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

# The names `emergence_ray.models.MODELS` registers, checked here without importing torch, so that a
# bad config fails in a fraction of a second (tests/test_units.py keeps the two in step).
MODEL_NAMES = ("cnn", "mlp", "resnet18")


class _Section(BaseModel):
    # extra="forbid": an unknown key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(_Section):
    crop_padding: int = Field(1, ge=0, description="random crop after zero padding, in pixels; 0 = off")
    flip: bool = Field(False, description="random horizontal flip (off: digits are not mirror-symmetric)")


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
    split_seed: int = 0
    on_bad_image: Literal["fail", "skip"] = "fail"
    limit: int | None = Field(None, gt=0, description="use at most this many training images (smoke runs)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    ingest: Literal["auto", "cache", "stream"] = Field(
        "auto", description="cache: each worker holds its shard in memory after one read (epochs cost Ray Data "
                            "nothing); stream: read it through Ray Data every epoch; auto: cache when it fits")
    cache_gb_per_worker: float = Field(4.0, gt=0, description="auto caches when a worker's train + val shard "
                                                               "is at most this many GiB")

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source != "digits" and not self.path:
            raise ValueError(f"data.path is required for data.source={self.source}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("data.val_fraction + data.test_fraction must be < 1")
        return self


class ModelConfig(_Section):
    name: str = "cnn"
    width: int = Field(32, gt=0, description="channels of the first conv layer / hidden units of the mlp")
    depth: int = Field(2, gt=0, description="hidden layers of the mlp")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in MODEL_NAMES:
            raise ValueError(f"unknown model {v!r}; choose one of {sorted(MODEL_NAMES)}")
        return v


class OptimConfig(_Section):
    name: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(3e-3, gt=0, description="peak learning rate, per batch of train.batch_size x workers")
    weight_decay: float = Field(5e-4, ge=0, description="decoupled; only tensors with dim >= 2")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0)


class TrainConfig(_Section):
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0, description="per worker")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    seed: int = 0
    evaluate: Literal["best", "last"] = Field("best", description="checkpoint evaluated on the test split")
    keep_checkpoints: int = Field(2, gt=0)
    bf16: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU)")
    log_every_s: float = Field(10.0, gt=0)


class ScalingConfig(_Section):
    num_workers: int | tuple[int, int] = Field(2, description="workers, or [min, max] for elastic training")
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(
        None, gt=0, description="None = fit the workers so that some node keeps a whole CPU for Ray Data")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="placement group strategy for the workers (SPREAD: across nodes)")
    autoscaling: bool = Field(False, description="the cluster grows on demand: skip the fail-fast check "
                                                 "against its current size")
    worker_niceness: int | None = Field(
        0, ge=-20, le=19, description="nice value of the training worker processes (Ray starts workers at 15, "
                                      "below its own daemons); null keeps Ray's")

    @field_validator("num_workers")
    @classmethod
    def _positive(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        lo, hi = (v, v) if isinstance(v, int) else v
        if lo < 1 or hi < lo:
            raise ValueError("must be >= 1, or [min, max] with 1 <= min <= max")
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
    max_failures: int = Field(0, ge=-1, description="worker-group restarts; -1 = unlimited")

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
