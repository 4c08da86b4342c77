"""The `tune:` section of a job: what to search, how, and how it is checked before any trial runs.

    tune:
      space:
        optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
        train.label_smoothing: {uniform: [0.0, 0.2]}
        model.width: {choice: [16, 32]}
      search: optuna        # random | grid | optuna
      repeats: 2            # each configuration twice, seeds train.seed + 0, + 1

`tune.lr` / `tune.weight_decay` are shorthands for `space: {optim.lr: ..., optim.weight_decay: ...}`
and the default space (without `space:`, both are searched; with it, only the ones given). Every
key must be a job key a trial can change (model.*, optim.*, train.* but epochs and seed,
data.augment.*); every bound and listed value is put into the job and
validated here, so a bad space fails with `error: tune.space...` before Ray starts a trial.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from emergence_ray.config import MAX_SEED, MAX_WORKERS, JobConfig, set_dotted, to_dict, validate
from emergence_ray.errors import ConfigError

Value = float | int | str | bool
SPACE_KINDS = {"loguniform", "uniform", "grid", "choice"}
SEARCHABLE = ("model.", "optim.", "train.", "data.augment.")
NOT_SEARCHABLE = {
    "train.epochs": "it is the sweep's budget per trial; set train.epochs",
    "train.seed": "repeats set it (train.seed + repeat); set tune.repeats",
}


class Space(BaseModel):
    """One key's search space: a log-uniform or uniform range, or an explicit grid / choice list.
    Bounds and values are also checked against the job key's own range (`trial_job`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    grid: list[Value] | None = None
    choice: list[Value] | None = None

    @model_validator(mode="after")
    def _one(self) -> Space:
        given = [k for k in ("loguniform", "uniform", "grid", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform: [low, high], uniform: [low, high], grid: [...], "
                             "choice: [...]")
        if self.loguniform and not 0 < self.loguniform[0] < self.loguniform[1]:
            raise ValueError("loguniform needs 0 < low < high")
        if self.uniform and not self.uniform[0] < self.uniform[1]:
            raise ValueError("uniform needs low < high")
        if (self.grid is not None and not self.grid) or (self.choice is not None and not self.choice):
            raise ValueError("needs at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "grid", "choice") if getattr(self, k) is not None)

    @property
    def values(self) -> list[Value]:
        """What validation tries: both bounds of a range, every listed value."""
        return list(getattr(self, self.kind))

    def sample(self, rng) -> Value:
        """One random draw (numpy Generator) for random search."""
        if self.loguniform:
            return float(math.exp(rng.uniform(math.log(self.loguniform[0]), math.log(self.loguniform[1]))))
        if self.uniform:
            return float(rng.uniform(*self.uniform))
        values = self.grid or self.choice
        return values[int(rng.integers(len(values)))]

    def domain(self) -> Any:
        """Ray Tune's domain (Optuna's space, PBT's resampling); a grid is a plain list for PBT."""
        from ray import tune

        if self.loguniform:
            return tune.loguniform(*self.loguniform)
        if self.uniform:
            return tune.uniform(*self.uniform)
        if self.choice is not None:
            return tune.choice(list(self.choice))
        return list(self.grid)


class SchedulerSection(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: Literal["asha", "pbt", "none"] = "asha"
    grace_period: int = Field(1, gt=0, le=100_000, description="asha: epochs before a trial can be stopped")
    reduction_factor: int = Field(2, ge=2, le=100, description="asha")
    perturbation_interval: int = Field(1, gt=0, le=100_000, description="pbt: epochs between exploit / explore steps")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="pbt: bottom fraction that copies the top")
    resample_probability: float = Field(0.25, ge=0, le=1, description="pbt: resample instead of x0.8 / x1.2")


class TuneSection(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    lr: Space = Field(default_factory=lambda: Space(loguniform=(1e-4, 1e-2)), description="= space optim.lr")
    weight_decay: Space = Field(default_factory=lambda: Space(loguniform=(1e-5, 1e-1)),
                                description="= space optim.weight_decay")
    space: dict[str, Space] = Field(default_factory=dict, description="dotted job key -> its space")
    num_samples: int = Field(8, gt=0, le=100_000, description="configurations drawn (random, optuna); grid: unused")
    repeats: int = Field(1, gt=0, le=1000, description="runs of each configuration, seeds train.seed + 0, 1, ...")
    max_concurrent_trials: int = Field(2, gt=0, le=10_000)
    num_workers: int | None = Field(None, gt=0, le=MAX_WORKERS,
                                    description="workers per trial; default scaling.num_workers")
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    search: Literal["random", "grid", "optuna"] = "random"
    optuna_startup_trials: int = Field(10, gt=0, le=100_000,
                                       description="optuna: random trials before TPE models the results")
    include_default: bool = Field(False, description="also run the job's own values of the searched keys first")
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @field_validator("space", mode="before")
    @classmethod
    def _flatten(cls, value: Any) -> Any:
        """`--set tune.space.train.label_smoothing.uniform=[0, 0.2]` nests the dotted key; flatten it."""
        if not isinstance(value, dict):
            return value
        flat: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict) and node and not set(node) & SPACE_KINDS:
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                flat[prefix] = node

        walk("", value)
        return flat

    @property
    def keys(self) -> dict[str, Space]:
        """The whole search space, dotted key -> Space: `space`, plus the shorthands tune.lr /
        tune.weight_decay where given (with no `space` at all, they are the default space)."""
        shorthands = {"optim.lr": ("lr", self.lr), "optim.weight_decay": ("weight_decay", self.weight_decay)}
        return {**{k: s for k, (field, s) in shorthands.items() if field in self.model_fields_set or not self.space},
                **self.space}

    @model_validator(mode="after")
    def _consistent(self) -> TuneSection:
        if (self.metric == "val_loss") != (self.mode == "min"):
            raise ValueError(f"metric {self.metric} needs mode {'min' if self.metric == 'val_loss' else 'max'}")
        for key in self.space:
            why = NOT_SEARCHABLE.get(key)
            if why or not key.startswith(SEARCHABLE):
                why = why or "searchable keys start with " + ", ".join(SEARCHABLE)
                raise ValueError(f"space.{key}: cannot be searched ({why})")
        kinds = {k: s.kind for k, s in self.keys.items()}
        if self.search == "grid":
            if not any(kind == "grid" for kind in kinds.values()):
                raise ValueError("search: grid needs at least one grid: [...] list (tune.lr.grid, tune.space.KEY.grid)")
            ranged = [k for k, kind in kinds.items() if kind != "grid" and k in self.space]
            if ranged:
                raise ValueError(f"search: grid runs grid lists only; give {ranged} a grid: [...] (or search: random)")
            if "num_samples" in self.model_fields_set and self.num_samples != 1:
                raise ValueError("search: grid runs every grid point once; for repeats set tune.repeats, "
                                 "not num_samples")
        else:
            grids = [k for k, kind in kinds.items() if kind == "grid"]
            if grids:
                raise ValueError(f"search: {self.search} samples; {grids} have grid: [...] (use choice: [...], "
                                 "or search: grid)")
        if self.search == "optuna" and self.repeats != 1:
            raise ValueError("search: optuna learns from every trial; set tune.repeats: 1 and raise num_samples")
        if self.scheduler.name == "pbt" and not {"optim.lr", "optim.weight_decay"} <= set(self.keys):
            raise ValueError("scheduler pbt perturbs optim.lr and optim.weight_decay; search both (tune.lr, "
                             "tune.weight_decay)")
        if self.scheduler.name == "pbt" and self.search == "optuna":
            raise ValueError("scheduler pbt picks its own configurations; use search: random or grid with it")
        return self

    def grid_keys(self) -> dict[str, Space]:
        """Under search: grid, the keys that are swept (a shorthand left at its default range is not)."""
        return {k: s for k, s in self.keys.items() if s.kind == "grid" or k in self.space}


def tune_section(cfg: JobConfig) -> TuneSection:
    try:
        section = TuneSection.model_validate(cfg.tune or {})
    except ValidationError as err:
        lines = [f"{'.'.join(['tune', *(str(p) for p in e['loc'])])}: {e['msg'].removeprefix('Value error, ')}"
                 for e in err.errors()]
        raise ConfigError("invalid tune section:\n  " + "\n  ".join(lines)) from None
    check_space(cfg, section)
    return section


def searched(section: TuneSection) -> dict[str, Space]:
    """The keys this sweep varies (under grid search, only the ones with grid lists)."""
    return section.grid_keys() if section.search == "grid" else section.keys


def check_space(cfg: JobConfig, section: TuneSection) -> None:
    """Put every bound / listed value of every searched key into the job and validate it."""
    for key, space in searched(section).items():
        for value in space.values:
            try:
                trial_job(cfg, {key: value})
            except ConfigError as err:
                detail = str(err).split("\n", 1)[-1].strip()
                raise ConfigError(f"tune.space.{key}: value {value!r} does not make a valid job ({detail})") from None


def _is_int_field(raw: dict, key: str) -> bool:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return isinstance(node, int) and not isinstance(node, bool)


def trial_job(cfg: JobConfig, values: dict[str, Value], seed_offset: int = 0, num_workers: int | None = None,
              cpus_per_worker: float | None = None) -> JobConfig:
    """The job one trial runs: `values` (dotted keys) set, train.seed + seed_offset, no tune section."""
    raw = to_dict(cfg)
    for key, value in values.items():
        if _is_int_field(raw, key) and isinstance(value, float):
            value = round(value)  # uniform over an integer key (model.width) draws whole numbers
        set_dotted(raw, key, value)
    raw["train"]["seed"] = cfg.train.seed + seed_offset
    if num_workers is not None:
        raw["scaling"]["num_workers"] = num_workers
    if cpus_per_worker is not None:
        raw["scaling"]["cpus_per_worker"] = cpus_per_worker
    raw["tune"] = None
    return validate(raw)


def default_point(cfg: JobConfig, section: TuneSection) -> dict[str, Value]:
    """The job's own values of the searched keys (`include_default`)."""
    raw = to_dict(cfg)
    point = {}
    for key in searched(section):
        node: Any = raw
        for part in key.split("."):
            node = node[part]
        point[key] = node
    return point
