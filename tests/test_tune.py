"""Sweeps over the same training job with a real local Ray: an Optuna sweep over a non-optim key
whose trial loses a worker and whose driver is killed resumes without re-running finished trials;
a PBT sweep of two repeats (different seeds, different numbers) moves the worse trial onto the
better one's weights with new hyperparameters, through an interrupted and restored run. (The ASHA
grid sweep job, its early stops and best.json: test_cluster_jobs.py, submitted as jobs/README.md
shows.)"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import CLI, ROOT, actor_classes, cli_env, run_epochs, wait_for
from emergence_ray.config import load_config
from emergence_ray.errors import ConfigError
from emergence_ray.sweep.search import points
from emergence_ray.tune import TuneSection, tune_section


def _rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "trials.csv") as f:
        return list(csv.DictReader(f))


def _saved_terminated(sweep_dir: Path) -> set[str]:
    """Trial ids that Tune's newest saved experiment state records as TERMINATED."""
    states = sorted(sweep_dir.glob("experiment_state-*.json"))
    try:
        data = json.loads(states[-1].read_text())["trial_data"] if states else []
    except (OSError, ValueError, KeyError):  # being written
        return set()
    return {t["trial_id"] for t in (json.loads(entry[0]) for entry in data) if t.get("status") == "TERMINATED"}


def test_tune_section_validation():
    with pytest.raises(ConfigError, match="tune.lr"):
        tune_section(load_config(None, ["tune.lr.loguniform=[0.1, 0.01]"]))
    with pytest.raises(ConfigError, match="tune.bogus"):
        tune_section(load_config(None, ["tune.bogus=1"]))
    assert TuneSection().scheduler.name == "asha"
    # any job key, as a YAML dotted key or nested by --set; checked against the job before any trial
    cfg = load_config(ROOT / "jobs" / "sweep_optuna_digits.yaml", ["tune.space.model.width.choice=[16, 32]"])
    assert list(tune_section(cfg).keys) == ["optim.lr", "train.label_smoothing", "model.width"]
    assert list(tune_section(load_config(None, [])).keys) == ["optim.lr", "optim.weight_decay"]  # the default
    bad = {
        "tune.space.model.name.choice=[cnn, bogus]": "tune.space.model.name: value 'bogus'.*unknown model",
        "tune.space.train.batch_size.uniform=[-4, 64]": "tune.space.train.batch_size: value -4.*greater than 0",
        "tune.space.model.widht.choice=[8]": "tune.space.model.widht: value 8.*unknown key",
        "tune.space.run.name.choice=[a]": "space.run.name: cannot be searched",
        "tune.space.train.seed.choice=[1, 2]": "train.seed: cannot be searched.*tune.repeats",
        "tune.search=grid": "search: grid needs at least one grid",
        "tune.scheduler.name=pbt": None,  # fine: lr and weight decay are the default space
    }
    for override, message in bad.items():
        if message is None:
            tune_section(load_config(None, [override]))
            continue
        with pytest.raises(ConfigError, match=message):
            tune_section(load_config(None, [override]))
    for overrides, message in [
        (["tune.search=optuna", "tune.repeats=2"], "optuna learns from every trial"),
        (["tune.search=grid", "tune.lr.grid=[0.1]", "tune.num_samples=3"], "for repeats set tune.repeats"),
        (["tune.lr.grid=[0.1]"], "search: random samples.*choice"),
        (["tune.scheduler.name=pbt", "tune.space.model.width.choice=[8]"], "pbt perturbs optim.lr and optim.wei"),
    ]:
        with pytest.raises(ConfigError, match=message):
            tune_section(load_config(None, overrides))


def test_bad_space_fails_in_the_cli_before_any_trial(tmp_path):
    out = subprocess.run([*CLI, "tune", "--config", str(ROOT / "jobs" / "sweep_optuna_digits.yaml"), "--set",
                          f"run.storage_path={tmp_path}", "--set", "tune.space.model.dropout.uniform=[0, 1.5]"],
                         capture_output=True, text=True, timeout=120, env=cli_env())
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error:" in out.stderr and "tune.space.model.dropout: value 1.5" in out.stderr
    assert "Traceback" not in out.stderr and not any(tmp_path.iterdir())


def test_optuna_search_without_optuna_says_how_to_install_it(tmp_path):
    """The optional extra: with optuna not importable, a clear error and exit 2 before any trial."""
    blocker = tmp_path / "sitecustomize.py"  # makes `import optuna` fail in the CLI process
    blocker.write_text("import sys\nsys.modules['optuna'] = None\n")
    env = cli_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([*CLI, "tune", "--config", str(ROOT / "jobs" / "sweep_optuna_digits.yaml"), "--set",
                          f"run.storage_path={tmp_path / 'runs'}", "--set", "tune.max_concurrent_trials=100"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "tune.search: optuna needs the optuna package; install it with pip install -e '.[optuna]'" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "runs").exists()


def _configs(overrides: list[str]) -> list[dict]:
    cfg = load_config(None, overrides)
    return points(cfg, tune_section(cfg))


def test_random_and_grid_points_repeat_each_configuration_with_its_own_seed_index():
    """Random search draws its points here (seeded): a repeat is the same configuration, repeat 1."""
    points = _configs(["tune.num_samples=3", "tune.repeats=2", "tune.include_default=true", "tune.seed=5"])
    assert len(points) == 6 and [p["repeat"] for p in points] == [0, 0, 0, 1, 1, 1]
    assert points[0] == {"optim.lr": 0.003, "optim.weight_decay": 0.0005, "searcher": "default", "repeat": 0}
    assert [{**p, "repeat": 1} for p in points[:3]] == points[3:]
    assert points == _configs(["tune.num_samples=3", "tune.repeats=2", "tune.include_default=true", "tune.seed=5"])
    assert points != _configs(["tune.num_samples=3", "tune.repeats=2", "tune.include_default=true", "tune.seed=6"])
    grid = _configs(["tune.search=grid", "tune.lr.grid=[0.1, 0.2]", "tune.space.model.width.grid=[8, 16]"])
    assert {(p["optim.lr"], p["model.width"]) for p in grid} == {(0.1, 8), (0.1, 16), (0.2, 8), (0.2, 16)}
    assert all("optim.weight_decay" not in p for p in grid)  # a shorthand without a grid is not swept


def test_best_json_reports_mean_and_spread_over_repeats():
    from emergence_ray.sweep.results import best_record

    def row(trial, lr, seed, value):
        return {"trial_id": trial, "searcher": "grid", "repeat": seed, "seed": seed, "optim.lr": lr,
                "best_val_metric": value}

    rows = [row("a0", 0.1, 0, 0.80), row("a1", 0.1, 1, 0.90), row("b0", 0.2, 0, 0.86), row("b1", 0.2, 1, 0.88)]
    record = best_record(rows, rows[1], TuneSection(search="grid", lr={"grid": [0.1, 0.2]}))
    assert record["config"] == {"optim.lr": 0.1} and record["seed"] == 1 and record["value"] == 0.90
    assert record["repeats"]["n"] == 2 and record["repeats"]["mean"] == pytest.approx(0.85)
    assert record["repeats"]["std"] == pytest.approx(0.0707, abs=1e-4) and record["repeats"]["seeds"] == [0, 1]
    assert record["best_mean"]["config"] == {"optim.lr": 0.2} and record["best_mean"]["mean"] == pytest.approx(0.87)
    assert "repeats" not in best_record(rows[:1] + rows[2:3], rows[0], TuneSection())  # no configuration repeated


def test_continue_with_keeps_the_donors_state_and_the_trials_hyperparameters():
    """PBT's exploit on the worker: the donor's moments and schedule position, this trial's lr / wd."""
    from emergence_ray.config import OptimConfig
    from emergence_ray.optim import build_optimizer, build_scheduler
    from emergence_ray.sweep.exploit import continue_with

    torch.manual_seed(0)
    for name in ("adamw", "sgd"):
        donor_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        donor_opt = build_optimizer(donor_model, OptimConfig(name=name, lr=0.01, weight_decay=0.1))
        donor_sched = build_scheduler(donor_opt, OptimConfig(name=name, lr=0.01), 5, 4)
        for _ in range(7):
            donor_model(torch.randn(8, 4)).square().mean().backward()
            donor_opt.step()
            donor_sched.step()
            donor_opt.zero_grad()
        state = {"optimizer": donor_opt.state_dict(), "scheduler": donor_sched.state_dict()}
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        model.load_state_dict(donor_model.state_dict())
        new = OptimConfig(name=name, lr=0.002, weight_decay=0.03)
        opt = build_optimizer(model, new)
        sched = build_scheduler(opt, new, 5, 4)
        continue_with(opt, sched, state)
        factor = donor_opt.param_groups[0]["lr"] / 0.01
        assert sched.last_epoch == 7 and opt.param_groups[0]["lr"] == pytest.approx(0.002 * factor)
        wd = "decoupled_wd" if name == "sgd" else "weight_decay"
        assert [g[wd] for g in opt.param_groups] == [0.03, 0.0]
        key = "exp_avg" if name == "adamw" else "momentum_buffer"
        donor_moments = [donor_opt.state[p][key] for p in donor_model.parameters()]
        assert all(torch.equal(opt.state[p][key], m) for p, m in zip(model.parameters(), donor_moments))
        sched.step()  # the schedule goes on from step 7 with the new peak
        assert opt.param_groups[0]["lr"] == pytest.approx(0.002 * sched.lr_lambdas[0](8))


def test_optuna_sweep_over_a_non_optim_key_resumes_a_killed_worker_and_a_killed_driver(ray_session, tmp_path):
    """jobs/sweep_optuna_digits.yaml (TPE over optim.lr and train.label_smoothing), two trials, one at
    a time. The first trial loses its training worker (SIGKILL by pid): Train restarts it from the
    trial's last checkpoint and the trial finishes with every epoch once. Then the sweep's driver
    is killed once Tune's saved state records that trial as finished; the same command restores the
    sweep (and Optuna's state), runs the other trial and does not train the finished one again."""
    cmd = [*CLI, "tune", "--config", str(ROOT / "jobs" / "sweep_optuna_digits.yaml"), "--set",
           f"run.storage_path={tmp_path}", "--set", "run.name=sweep", "--set", "tune.scheduler.name=none",
           "--set", "tune.max_concurrent_trials=1", "--set", "tune.num_samples=2", "--set", "train.epochs=4",
           "--set", "run.max_failures=2"]
    # Tune saves its experiment state every ~10 s by default; every second here.
    env = cli_env(RAY_ADDRESS=ray_session, TUNE_GLOBAL_CHECKPOINT_S="1")
    log = tmp_path / "first.log"
    before = set(actor_classes())
    first = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    trials = tmp_path / "sweep" / "trials"

    def running_trial() -> Path | None:
        return next((d for d in trials.iterdir() if (d / "workers.json").exists() and len(run_epochs(d)) >= 1), None)

    wait_for(lambda: running_trial() is not None, first, 400, "a trial at epoch 1", log)
    victim_dir = running_trial()
    victim = json.loads((victim_dir / "workers.json").read_text())[0]
    os.kill(victim["pid"], signal.SIGKILL)  # from outside, like an OOM kill
    finished: set[str] = set()

    def one_finished() -> bool:
        finished.update(f"sweep-{t}" for t in _saved_terminated(tmp_path / "sweep"))
        return len(finished) >= 1

    wait_for(one_finished, first, 400, "a finished trial in Tune's saved state", log)
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(3)
    assert finished == {victim_dir.name}  # one at a time: the finished trial is the one that lost its worker
    assert run_epochs(victim_dir) == [1, 2, 3, 4]  # resumed, no epoch twice
    assert json.loads((victim_dir / "workers.json").read_text())[0]["pid"] != victim["pid"]
    mtime = (victim_dir / "metrics.jsonl").stat().st_mtime

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert "resuming sweep" in second.stdout + second.stderr
    rows = _rows(tmp_path / "sweep")
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" and r["epochs_run"] == "4" for r in rows), rows
    assert (victim_dir / "metrics.jsonl").stat().st_mtime == mtime  # not trained again
    # one column per searched key; each trial's job got its own label smoothing
    assert {"optim.lr", "train.label_smoothing", "seed", "searcher"} <= set(rows[0]), rows[0]
    assert all(r["searcher"] == "optuna" and r["seed"] == "0" for r in rows)
    smoothing = {float(r["train.label_smoothing"]) for r in rows}
    assert len(smoothing) == 2 and all(0.0 <= v <= 0.2 for v in smoothing)
    for r in rows:
        job = torch.load(Path(r["checkpoint"]) / "checkpoint.pt", weights_only=True)["config"]
        assert job["train"]["label_smoothing"] == pytest.approx(float(r["train.label_smoothing"]))
    best = json.loads((tmp_path / "sweep" / "best.json").read_text())
    assert set(best["config"]) == {"optim.lr", "train.label_smoothing"} and best["searcher"] == "optuna"
    # a sweep's trials keep Train's placement-group cleaner (a `train` run drops it: test_train_e2e)
    started = [cls for actor_id, cls in actor_classes().items() if actor_id not in before]
    assert "PlacementGroupCleaner" in started and "TrainController" in started, started


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~2 Train start-ups per trial plus an exploit restart and a restore: minutes on 2 cores
def test_pbt_sweep_of_two_repeats_exploits_restores_and_completes(ray_session, tmp_path):
    """jobs/sweep_pbt_digits.yaml with one configuration run twice: seeds 0 and 1 give different
    numbers. PBT moves the worse trial onto the better one's checkpoint: a new Train run that
    starts from a copy of the donor's checkpoint (its history up to then is the donor's, its loss
    goes on from there) and trains with the trial's perturbed lr. The sweep's driver is killed once
    that run has trained an epoch; the same command restores the sweep and finishes it."""
    cmd = [*CLI, "tune", "--config", str(ROOT / "jobs" / "sweep_pbt_digits.yaml"), "--set",
           f"run.storage_path={tmp_path}", "--set", "run.name=pbt", "--set", "tune.num_samples=1",
           "--set", "tune.repeats=2"]
    env = cli_env(RAY_ADDRESS=ray_session, TUNE_GLOBAL_CHECKPOINT_S="1")
    log = tmp_path / "first.log"
    first = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    trials = tmp_path / "pbt" / "trials"

    def exploiting_run() -> Path | None:
        return next((d for d in trials.glob("*-from-*") if (d / "metrics.jsonl").exists()
                     and len(run_epochs(d)) > json.loads((d / "exploited_from" / "source.json").read_text())["epoch"]),
                    None)

    wait_for(lambda: exploiting_run() is not None, first, 900, "a trial training on from the other's checkpoint", log)
    time.sleep(1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(3)
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert "resuming sweep" in second.stdout + second.stderr

    rows = _rows(tmp_path / "pbt")
    assert len(rows) == 2 and {r["seed"] for r in rows} == {"0", "1"}, rows
    assert all(r["status"] == "TERMINATED" and r["epochs_run"] == "6" for r in rows), rows
    first_epochs = [_history(trials / f"pbt-{r['trial_id']}")[0] for r in rows]
    assert first_epochs[0]["val_loss"] != first_epochs[1]["val_loss"]  # same configuration, other seed
    assert first_epochs[0]["train_loss"] != first_epochs[1]["train_loss"]

    exploited = [r for r in rows if r["pbt_from"]]
    assert exploited, rows
    row = exploited[0]
    run = trials / row["train_run"]
    source = json.loads((run / "exploited_from" / "source.json").read_text())
    epoch = source["epoch"]
    assert row["pbt_from"] == f"{source['trial_id']}@e{epoch}" and source["trial_id"] != row["trial_id"]
    donor = _history(trials / source["run"])
    history = _history(run)
    assert [m["epoch"] for m in history] == [1, 2, 3, 4, 5, 6]
    assert history[:epoch] == donor[:epoch]  # the donor's checkpoint was loaded (its history is in it)
    # trained on from the donor's weights, not from a fresh model's loss
    assert history[epoch]["train_loss"] < 0.9 * min(m["train_loss"] for m in first_epochs)
    # with this trial's perturbed lr (constant schedule: the reported lr is the config's)
    assert all(m["lr"] == pytest.approx(float(row["optim.lr"])) for m in history[epoch:])
    assert donor[epoch - 1]["lr"] != pytest.approx(float(row["optim.lr"]))
    best = json.loads((tmp_path / "pbt" / "best.json").read_text())
    assert (tmp_path / "pbt" / "sweep.png").stat().st_size > 1000
    # the comparison of finished sweeps (results/sweep_compare_fashion_mnist/) reads them back
    from emergence_ray.sweep import compare

    compare.main([str(tmp_path / "cmp"), f"pbt={tmp_path / 'pbt'}"])
    assert f"| pbt | 2 | 12 | 0 | {best['value']:.4f} |" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000
