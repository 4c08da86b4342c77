"""What a finished sweep writes: trials.csv, best.json's configuration and repeat statistics, the
table printed at the end, and sweep.png.

trials.csv has one row per trial: trial_id, searcher (random / grid / optuna / default), repeat,
seed, one column per searched key (dotted), epochs_run, last / best value of the metric, status,
stopped_early, start_s (seconds after the sweep's first trial started), pbt_from (TRIAL@eEPOCH when
the trial's last Train run continued a better trial's checkpoint under PBT), train_run and checkpoint.
Under PBT the searched keys are the trial's last (perturbed) values; seed stays the trial's own.
"""

from __future__ import annotations

import csv
import io
import re
import statistics

import ray.train

from emergence_ray import storage
from emergence_ray.sweep.bridge import EXPLOITED_FROM, SOURCE
from emergence_ray.sweep.search import REPEAT, SEARCHER, trial_values
from emergence_ray.sweep.space import TuneSection
from emergence_ray.trainer import storage_history


def _trial_id_from_path(path: str) -> str:
    match = re.search(r"_([0-9a-f]{5}_\d{5})(_|$)", path.rstrip("/").rsplit("/", 1)[-1])
    return match.group(1) if match else path.rstrip("/").rsplit("/", 1)[-1]


def _donor(run_dir: str) -> str:
    """'TRIAL@eEPOCH' when this Train run continued another trial's checkpoint (PBT), else ''."""
    path = storage.join(run_dir, EXPLOITED_FROM, SOURCE)
    if not storage.exists(path):
        return ""
    source = storage.read_json(path)
    return f"{source['trial_id']}@e{source['epoch']}"


def _best_checkpoint(run_dir: str, metric: str, better) -> str | None:
    try:
        scored = [(m.get(metric), c) for c, m in ray.train.Result.from_path(run_dir).best_checkpoints
                  if m.get(metric) is not None]
    except RuntimeError:
        return None
    return better(scored, key=lambda s: s[0])[1].path if scored else None


def trial_rows(grid, sweep_dir: str, sweep: str, epochs: int, section: TuneSection, seed: int) -> list[dict]:
    """One row per trial of a ResultGrid, best first; `seed` is the job's train.seed."""
    better = max if section.mode == "max" else min
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or _trial_id_from_path(result.path)
        train_run = metrics.get("train_run") or f"{sweep}-{trial_id}"
        run_dir = storage.join(sweep_dir, "trials", train_run)
        try:
            history = storage_history(run_dir)
        except (OSError, FileNotFoundError):
            history = []
        values = [m[section.metric] for m in history]
        df = result.metrics_dataframe
        started = float(df["trial_start"].min()) if df is not None and "trial_start" in df else None
        # the seed of the trial's first report: under PBT its config may since be a donor's copy
        own_seed = int(df["seed"].iloc[0]) if df is not None and "seed" in df and len(df) else \
            seed + result.config.get(REPEAT, 0)
        status = "ERROR" if result.error else "TERMINATED"
        rows.append({
            "trial_id": trial_id,
            "searcher": result.config.get(SEARCHER, section.search),
            "repeat": own_seed - seed,
            "seed": own_seed,
            **trial_values(result.config),
            "epochs_run": len(history),
            "last_val_metric": values[-1] if values else None,
            "best_val_metric": better(values) if values else None,
            "status": status,
            "stopped_early": status == "TERMINATED" and len(history) < epochs,
            "start_s": started,
            "pbt_from": _donor(run_dir),
            "train_run": train_run,
            "checkpoint": _best_checkpoint(run_dir, section.metric, better) if history else None,
        })
    starts = [r["start_s"] for r in rows if r["start_s"] is not None]
    for r in rows:
        r["start_s"] = round(r["start_s"] - min(starts), 1) if r["start_s"] is not None else None
    sign = -1.0 if section.mode == "max" else 1.0  # best first
    return sorted(rows, key=lambda r: (r["best_val_metric"] is None, sign * (r["best_val_metric"] or 0.0)))


def searched_columns(rows: list[dict]) -> list[str]:
    return [k for k in rows[0] if "." in k] if rows else []


def repeat_groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows with a metric, grouped by configuration (the searched keys' values)."""
    keys = searched_columns(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["best_val_metric"] is not None:
            groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def _stats(group: list[dict]) -> dict:
    values = [r["best_val_metric"] for r in group]
    return {"n": len(values), "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1
            else 0.0, "min": min(values), "max": max(values), "values": values, "seeds": [r["seed"] for r in group]}


def best_record(rows: list[dict], best: dict, section: TuneSection) -> dict:
    """best.json's search part: the best trial's configuration, and over repeats (where a
    configuration ran more than once) its mean and spread, plus the configuration with the best mean."""
    keys = searched_columns(rows)
    record = {"trial_id": best["trial_id"], "config": {k: best[k] for k in keys}, "seed": best["seed"],
              "searcher": best["searcher"], "metric": section.metric, "mode": section.mode,
              "value": best["best_val_metric"]}
    groups = repeat_groups(rows)
    if any(len(g) > 1 for g in groups.values()):
        record["repeats"] = _stats(groups[tuple(best[k] for k in keys)])
        sign = 1.0 if section.mode == "max" else -1.0
        top = max(groups.values(), key=lambda g: sign * statistics.fmean(r["best_val_metric"] for r in g))
        record["best_mean"] = {"config": {k: top[0][k] for k in keys}, **_stats(top)}
    return record


def write_trials_csv(rows: list[dict], sweep_dir: str) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(storage.join(sweep_dir, "trials.csv"), buf.getvalue())


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def results_table(rows: list[dict], section: TuneSection) -> str:
    keys = searched_columns(rows)
    short = [k.rsplit(".", 1)[-1][:12] for k in keys]
    head = (f"{'trial':<12} {'searcher':>8} {'seed':>4} " + " ".join(f"{s:>12}" for s in short)
            + f" {'epochs':>6} {'best ' + section.metric:>18} {'status':>10} early")
    lines = [head, "-" * len(head)]
    for r in rows:
        best = f"{r['best_val_metric']:.4f}" if r["best_val_metric"] is not None else "-"
        lines.append(f"{r['trial_id']:<12} {r['searcher']:>8} {r['seed']:>4} "
                     + " ".join(f"{_fmt(r[k]):>12}" for k in keys)
                     + f" {r['epochs_run']:>6} {best:>18} {r['status']:>10} {'yes' if r['stopped_early'] else 'no'}")
    return "\n".join(lines)


COLORS = {"default": "tab:gray", "random": "tab:blue", "grid": "tab:green", "optuna": "tab:orange"}


def sweep_plot(rows: list[dict], grid, metric: str, lr: float, weight_decay: float) -> bytes:
    """Three panels: best metric over lr x weight decay; best metric over each trial's start time,
    colored by the searcher that proposed it (PBT-exploited trials outlined red); learning curves.
    `lr` / `weight_decay`: the job's values, for sweeps that do not search them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, t, b) = plt.subplots(1, 3, figsize=(17, 5))
    done = [r for r in rows if r["best_val_metric"] is not None]
    sc = a.scatter([r.get("optim.lr", lr) for r in done], [max(r.get("optim.weight_decay", weight_decay), 1e-8)
                                                           for r in done],
                   c=[r["best_val_metric"] for r in done], cmap="viridis", s=80, edgecolors="k")
    a.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="weight decay",
          title=f"best {metric} per trial")
    fig.colorbar(sc, ax=a)
    for searcher in sorted({r["searcher"] for r in done}):
        mine = [r for r in done if r["searcher"] == searcher and r["start_s"] is not None]
        t.scatter([r["start_s"] for r in mine], [r["best_val_metric"] for r in mine], s=60, label=searcher,
                  color=COLORS.get(searcher, "tab:purple"),
                  edgecolors=["red" if r["pbt_from"] else "k" for r in mine])
    t.set(xlabel="trial start (s after the first)", ylabel=f"best {metric}", title="the search over time")
    t.legend(fontsize=8)
    for result in grid:
        df = result.metrics_dataframe
        if df is not None and metric in df and "epoch" in df:
            tid = (result.metrics or {}).get("trial_id", "")
            b.plot(df["epoch"], df[metric], marker="o", label=f"{tid} lr={result.config.get('optim.lr', lr):.2g}")
    b.set(xlabel="epoch", ylabel=metric, title="learning curves")
    b.legend(fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
