"""Side-by-side comparison of finished sweeps (same job, other searchers / schedulers): a
Markdown table (trials, epochs spent, best validation metric, wall time) and a figure of every
trial's best metric over the epochs the sweep had spent, one color per sweep, with each sweep's
best-so-far line.

    python -m emergence_ray.sweep.compare OUT_DIR LABEL=SWEEP_DIR [LABEL=SWEEP_DIR ...]
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path


def load(sweep_dir: Path) -> dict:
    with open(sweep_dir / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    best = json.loads((sweep_dir / "best.json").read_text())
    summary = json.loads((sweep_dir / "summary.json").read_text())
    return {"rows": rows, "best": best, "summary": summary}


def table(sweeps: dict[str, dict]) -> str:
    lines = ["| search | trials | epochs spent | stopped early | best val metric | test accuracy (best) "
             "| wall s (last driver run) |",
             "|---|---|---|---|---|---|---|"]
    for label, s in sweeps.items():
        rows = s["rows"]
        lines.append(f"| {label} | {len(rows)} | {sum(int(r['epochs_run']) for r in rows)} | "
                     f"{sum(r['stopped_early'] == 'True' for r in rows)} | {s['best']['value']:.4f} | "
                     f"{s['best']['test_accuracy']:.4f} | {s['summary']['wall_s']:.0f} |")
    return "\n".join(lines)


def figure(sweeps: dict[str, dict], metric: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, s) in enumerate(sweeps.items()):
        # in the order the trials started; x: epochs the sweep had spent once the trial ended
        rows = sorted((r for r in s["rows"] if r["best_val_metric"] and r["start_s"]),
                      key=lambda r: float(r["start_s"]))
        spent = [sum(int(r["epochs_run"]) for r in rows[: k + 1]) for k in range(len(rows))]
        values = [float(r["best_val_metric"]) for r in rows]
        color = f"C{i}"
        ax.scatter(spent, values, color=color, s=40, label=label)
        ax.step(spent, [max(values[: k + 1]) for k in range(len(values))], where="post", color=color, alpha=0.6)
    ax.set(xlabel="epochs spent by the sweep (trials in start order)", ylabel=f"best {metric} of the trial",
           title="trials by searcher; lines: best so far")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    sweeps = {label: load(Path(path)) for label, path in (a.split("=", 1) for a in argv[1:])}
    out.mkdir(parents=True, exist_ok=True)
    metric = next(iter(sweeps.values()))["best"]["metric"]
    (out / "comparison.md").write_text(table(sweeps).replace("best val metric", f"best {metric}") + "\n")
    (out / "comparison.png").write_bytes(figure(sweeps, metric))
    print(table(sweeps))


if __name__ == "__main__":
    main(sys.argv[1:])
