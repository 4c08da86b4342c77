"""A job through the CLI of this checkout and of another one (`--compare NAME=DIR`, e.g. a `git
worktree` at the commit before a change), alternated run by run.

- `--job fashion` (default): is the cache path for small data still as fast as it was? The
  Fashion-MNIST job (IDX files, cached in worker memory), `jobs/fashion_mnist.yaml` of each
  checkout, `--limit` training images. Writes CACHE_AB.md.
- `--job jpeg`: a streamed epoch of real-size images on the CPU: stream.py's photo-like 256 px
  JPEG folder (`--images`, made once, shared by both), imagenet policy at 224 px, `cnn` width 8,
  batch 64, 2 workers (the default, as stream.py's first-step runs). Writes JPEG_AB.md.

    git worktree add /tmp/wt-before 0bbbc75    # main before the streaming data path (#16)
    flock /tmp/er-bench.lock python benchmarks/cache_ab.py --compare before=/tmp/wt-before [--rounds 2]
    flock /tmp/er-bench.lock python benchmarks/cache_ab.py --job jpeg --compare before=/tmp/wt-before

Each run: `python -m emergence_ray train` of that checkout (its own code first on PYTHONPATH),
`--epochs` epochs, an embedded Ray. Recorded per run: the loop's images/s from epoch 2 on
(`metrics.jsonl`'s `elapsed_s`: the step, the per-epoch report, checkpoint and validation), the
training step's images/s (`train_images_per_s`), the first step, the whole command's wall time and
the test accuracy. Ratios are to this checkout within the same round. Writes --out/<NAME>.md and
.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402


OUT = {"fashion": "CACHE_AB", "jpeg": "JPEG_AB"}


def job_args(code: Path, args) -> tuple[list[str], list[str]]:
    """(the command's arguments before the overrides, the job's overrides) for `args.job`."""
    if args.job == "fashion":
        return ["--config", str(code / "jobs" / "fashion_mnist.yaml")], [f"data.limit={args.limit}"]
    from benchmarks import stream

    return [], ["data.source=imagefolder", f"data.path={args.folder}", f"data.image_size={stream.SIZE}",
                "data.ingest=stream", "data.augment.policy=imagenet", "data.val_fraction=0.05",
                "data.test_fraction=0.05", "model.name=cnn", "model.width=8", f"train.batch_size={stream.BATCH}"]


def one_run(code: Path, storage: Path, name: str, args) -> dict:
    job, overrides = job_args(code, args)
    overrides += [f"train.epochs={args.epochs}", f"run.storage_path={storage}", f"run.name={name}",
                  "tracking.tensorboard=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [env.get("PYTHONPATH")])])
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "emergence_ray", "train", *job]
    for o in overrides:
        if o.startswith("tracking.") and "tracking" not in (code / "emergence_ray" / "config.py").read_text():
            continue  # a checkout from before tracking existed
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=code, timeout=1800)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{code}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    run_dir = storage / name
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    later = history[1:]
    loop = sum(h["train_images"] for h in later) / (history[-1]["elapsed_s"] - history[0]["elapsed_s"])
    return {"loop_images_per_s": loop, "train_images_per_s": summary["train_images_per_s"], "wall_s": wall,
            "test_accuracy": summary["test_accuracy"], "first_step_s": summary.get("first_step_s")}


def revision(code: Path) -> str:
    """The checkout's commit, short, with `+changes` when its tracked files differ from it."""
    rev = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(code), "diff", "--quiet", "HEAD", "--", "emergence_ray"]).returncode
    return (rev.stdout.strip() or "?") + ("+changes" if dirty else "")


def render(res: dict) -> str:
    m = res["machine"]
    names = list(res["versions"])
    title = {"fashion": "The cache path for small data", "jpeg": "A streamed epoch of 224 px JPEGs on the CPU"}
    job = {"fashion": f"`jobs/fashion_mnist.yaml` of each checkout (IDX files, cached in worker memory, cnn width 16, "
                      f"2 workers, batch 128), {res.get('limit')} training images",
           "jpeg": f"{res.get('images')} photo-like 256 px JPEGs (stream.py's), `data.ingest=stream`, imagenet policy "
                   "at 224 px, cnn width 8, 2 workers (the default), batch 64"}
    kind = res.get("job", "fashion")
    lines = [f"# {title[kind]}: this checkout against an earlier one", "",
             f"Command: `{res['command']}`  ", f"Git revision: `{m['git_revision']}`  ",
             f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB; torch {m['torch']}, Ray {m['ray']}; "
             f"load average at start {m['load_average']}  ", f"Date: {m['date']}  ", "",
             f"Job: {job[kind]}, {res['epochs']} epochs, embedded Ray. "
             "Versions: " + "; ".join(f"**{n}** = {d}" + (f" (`{res['revisions'][n]}`)" if res.get("revisions") else "")
                                      for n, d in res["versions"].items()) + ". "
             "Runs alternate, the order rotating every round; ratios are to `this` within the round."
             + (" The JPEGs' classes are arbitrary (image i in class i mod 10, cut from photo i mod 2), so the "
                "best test accuracy is 0.2: the job measures speed." if kind == "jpeg" else ""), "",
             "| round | version | loop img/s (epochs 2+) | x this | step img/s | x this | first step s | wall s "
             "| test acc |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        fs = "-" if r["first_step_s"] is None else f"{r['first_step_s']:.1f}"
        lines.append(f"| {r['round']} | {r['version']} | {r['loop_images_per_s']:.0f} | {r['loop_ratio']:.3f} | "
                     f"{r['train_images_per_s']:.0f} | {r['train_ratio']:.3f} | {fs} | {r['wall_s']:.1f} | "
                     f"{r['test_accuracy']:.4f} |")
    lines += ["", "Median ratio to `this` over the rounds:", "", "| version | loop img/s | step img/s |",
              "|---|---|---|"]
    for n in names:
        rs = [r for r in res["runs"] if r["version"] == n]
        lines.append(f"| {n} | {common.median([r['loop_ratio'] for r in rs]):.3f} | "
                     f"{common.median([r['train_ratio'] for r in rs]):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compare", action="append", default=[], metavar="NAME=DIR", required=True,
                   help="another checkout of this repository")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit", type=int, default=12000, help="--job fashion: training images")
    p.add_argument("--job", choices=sorted(OUT), default="fashion")
    p.add_argument("--images", type=int, default=1000, help="--job jpeg: JPEGs in the folder")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    args = p.parse_args(argv)
    versions = {"this": ROOT}
    for item in args.compare:
        name, _, d = item.partition("=")
        if not name or not Path(d, "emergence_ray").is_dir():
            p.error(f"--compare {item!r}: expected NAME=DIR with DIR a checkout of this repository")
        versions[name] = Path(d).resolve()
    res = {"command": common.command_line("cache_ab.py", p, args, ("job", "compare", "rounds", "epochs", "limit",
                                                                    "images")),
           "machine": common.machine_info(), "versions": {n: str(d) for n, d in versions.items()}, "job": args.job,
           "revisions": {n: revision(d) for n, d in versions.items()},
           "limit": args.limit, "images": args.images, "epochs": args.epochs, "runs": []}
    storage = Path(tempfile.mkdtemp(prefix="er-cache-ab-"))
    if args.job == "jpeg":
        from benchmarks import stream

        args.folder = stream.make_folder(storage / "jpegs", args.images)
    names = list(versions)
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        runs = {n: one_run(versions[n], storage, f"r{rnd}-{n}", args) for n in order}
        for n in order:
            runs[n].update(round=rnd + 1, version=n,
                           loop_ratio=runs[n]["loop_images_per_s"] / runs["this"]["loop_images_per_s"],
                           train_ratio=runs[n]["train_images_per_s"] / runs["this"]["train_images_per_s"])
            res["runs"].append(runs[n])
            print(rnd + 1, n, runs[n], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / OUT[args.job]
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    out.with_suffix(".md").write_text(render(res))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
