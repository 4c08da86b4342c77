"""Searchers and schedulers, by name (`tune.search`, `tune.scheduler.name`).

- random: `num_samples` configurations drawn here with a numpy generator seeded by `tune.seed`
  (reproducible, and a repeat is the very same configuration), each run `repeats` times.
- grid: every combination of the grid lists, each run `repeats` times.
  Both hand Tune an explicit list of points (`BasicVariantGenerator(points_to_evaluate=...)`), so
  the trial's config always holds its values, its `repeat` and nothing Tune re-samples.
- optuna: TPE (`OptunaSearch`, seeded), `max_concurrent_trials` at a time; optional extra.
- asha: stops bad trials early; pbt: the bottom trials continue from a top trial's checkpoint
  with its lr / weight decay perturbed (`bridge` and `exploit` carry the weights across);
  none: every trial runs every epoch.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from ray import tune

from emergence_ray.config import JobConfig
from emergence_ray.errors import UserError
from emergence_ray.sweep.space import TuneSection, default_point, searched

REPEAT = "repeat"
SEARCHER = "searcher"  # which searcher proposed a trial's configuration (for the figure)
PBT_KEYS = ("optim.lr", "optim.weight_decay")


def _random_points(section: TuneSection) -> list[dict]:
    rng = np.random.default_rng(section.seed)
    return [{k: s.sample(rng) for k, s in searched(section).items()} for _ in range(section.num_samples)]


def _grid_points(section: TuneSection) -> list[dict]:
    keys = searched(section)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(s.grid for s in keys.values()))]


def _with_repeats(points: list[dict], section: TuneSection, default: dict | None) -> list[dict]:
    tagged = [{**p, SEARCHER: section.search} for p in points]
    if default is not None:  # replaces the first drawn point (random) or comes first (grid)
        tagged = [{**default, SEARCHER: "default"}] + (tagged[1:] if section.search == "random" else tagged)
    # repeat-major: every configuration runs once before any runs twice
    return [{**p, REPEAT: r} for r in range(section.repeats) for p in tagged]


def points(cfg: JobConfig, section: TuneSection) -> list[dict]:
    """Random / grid search: every trial's config (searched keys, repeat, searcher), in order."""
    default = default_point(cfg, section) if section.include_default else None
    drawn = _grid_points(section) if section.search == "grid" else _random_points(section)
    return _with_repeats(drawn, section, default)


def _point_search(cfg: JobConfig, section: TuneSection, concurrent: int) -> tuple[dict, Any, int]:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trials = points(cfg, section)
    space = {k: s.domain() if s.kind != "grid" else tune.choice(s.grid) for k, s in searched(section).items()}
    space.update({REPEAT: 0, SEARCHER: section.search})
    return space, BasicVariantGenerator(points_to_evaluate=trials, max_concurrent=concurrent,
                                        random_state=section.seed), len(trials)


def check_installed(section: TuneSection) -> None:
    """Before anything starts: the optional packages the chosen searcher needs."""
    if section.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise UserError("tune.search: optuna needs the optuna package; install it with "
                            "pip install -e '.[optuna]' (or pip install optuna), or use search: random") from None


def _optuna(cfg: JobConfig, section: TuneSection, concurrent: int) -> tuple[dict, Any, int]:
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    default = [default_point(cfg, section)] if section.include_default else None
    space = {k: s.domain() for k, s in searched(section).items()}
    sampler = optuna.samplers.TPESampler(seed=section.seed, n_startup_trials=section.optuna_startup_trials)
    searcher = OptunaSearch(metric=section.metric, mode=section.mode, sampler=sampler, points_to_evaluate=default)
    # the searcher's own keys stay out of Optuna's space: constants in the param space
    return ({**space, REPEAT: 0, SEARCHER: "optuna"}, ConcurrencyLimiter(searcher, max_concurrent=concurrent),
            section.num_samples)


SEARCHERS = {"random": _point_search, "grid": _point_search, "optuna": _optuna}


def _asha(cfg: JobConfig, section: TuneSection) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=section.scheduler.grace_period,
                         reduction_factor=section.scheduler.reduction_factor)


def _pbt(cfg: JobConfig, section: TuneSection) -> Any:
    from ray.tune.schedulers import PopulationBasedTraining

    space = section.keys
    return PopulationBasedTraining(
        time_attr="epoch", perturbation_interval=section.scheduler.perturbation_interval,
        quantile_fraction=section.scheduler.quantile_fraction,
        resample_probability=section.scheduler.resample_probability,
        hyperparam_mutations={k: space[k].domain() for k in PBT_KEYS})


def _none(cfg: JobConfig, section: TuneSection) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


SCHEDULERS = {"asha": _asha, "pbt": _pbt, "none": _none}


def tune_setup(cfg: JobConfig, section: TuneSection, concurrent: int) -> tuple[dict, tune.TuneConfig]:
    """-> (param_space, TuneConfig) for a new sweep."""
    space, search_alg, num_samples = SEARCHERS[section.search](cfg, section, concurrent)
    return space, tune.TuneConfig(metric=section.metric, mode=section.mode, num_samples=num_samples,
                                  max_concurrent_trials=concurrent, search_alg=search_alg,
                                  scheduler=SCHEDULERS[section.scheduler.name](cfg, section))


def trial_values(config: dict) -> dict:
    """The job keys a trial's Tune config sets (dotted keys only; not repeat / searcher)."""
    return {k: v for k, v in config.items() if "." in k}
