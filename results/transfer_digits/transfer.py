"""Transfer from Fashion-MNIST to 1,000 digits: does a pretrained trunk help a small dataset?

CLI runs, one after the other, under one lock so no other benchmark shares the machine:
  1. pretrain: the cnn on Fashion-MNIST (IDX files, a 20,000-image training subset, 3 epochs, its
     class names, so that the digits' head is new: a head trained on other classes is not kept);
  2. fine-tune: the same cnn on 1,000 scikit-learn digits (resized to 28x28 like the pretraining
     images), `model.pretrained=<1's checkpoint>` (head replaced, Fashion-MNIST normalization);
  3. scratch: job 2 without `model.pretrained` (the digits' own normalization).
2 and 3 run with train.epochs=1 for seeds 0, 1, 2 (train.seed: initial head / weights, shuffling),
and with train.epochs=3 for seed 0. The test split (360 digits) is the same for all.
Writes results.json next to this file; RESULTS.md is written by hand from it.

    flock /tmp/er-bench.lock python results/transfer_digits/transfer.py [--fashion-mnist DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

FASHION = "[T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot]"
# Fashion-MNIST's own class names (as jobs/fashion_mnist.yaml): the digits job then gets a new head
PRETRAIN = ["--set", "data.source=idx", "--set", f"data.class_names={FASHION}", "--set", "data.limit=20000",
            "--set", "train.epochs=3",
            "--set", "model.width=32", "--set", "train.batch_size=128", "--set", "data.augment.flip=true"]
FINETUNE = ["--set", "data.source=digits", "--set", "data.image_size=28", "--set", "data.limit=1000",
            "--set", "model.width=32", "--set", "train.batch_size=32"]


def run(args: list[str], env: dict) -> tuple[list[str], dict, float]:
    cmd = [sys.executable, "-m", "emergence_ray", "train", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.monotonic() - start
    if proc.returncode:
        sys.exit(f"failed: {shlex.join(cmd)}\n{proc.stderr[-4000:]}")
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary["val_accuracy_per_epoch"] = [round(m["val_accuracy"], 4) for m in history]
    return ["emergence-ray", "train", *args], summary, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fashion-mnist", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--storage", default=None, help="run folder (default: a temp dir)")
    p.add_argument("--reuse-pretrain", metavar="RUN_DIR", help="a finished pretrain run of this script (same job) "
                                                                 "instead of training it again")
    p.add_argument("--no-lock-note", default="", help="why this run was not under the benchmark lock, if not")
    a = p.parse_args()
    storage = a.storage or tempfile.mkdtemp(prefix="er-transfer-")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    common = ["--set", f"run.storage_path={storage}"]
    runs = {}
    if a.reuse_pretrain:
        done = Path(a.reuse_pretrain)
        summary = json.loads((done / "summary.json").read_text())
        history = [json.loads(line) for line in (done / "metrics.jsonl").read_text().splitlines()]
        summary["val_accuracy_per_epoch"] = [round(m["val_accuracy"], 4) for m in history]
        meta = json.loads((done / "meta.json").read_text())
        summary["reused"] = f"trained earlier by this script at git revision {meta['git_revision']}"
        runs["pretrain"] = (["emergence-ray", *meta["command"][1:]], summary, summary["wall_s"])
    else:
        runs["pretrain"] = run([*PRETRAIN, "--set", f"data.path={a.fashion_mnist}", *common,
                                "--set", "run.name=pretrain"], env)
    ckpt = runs["pretrain"][1]["checkpoint"]
    for epochs, seeds in ((1, (0, 1, 2)), (3, (0,))):
        for seed in seeds:
            for kind, extra in (("finetune", ["--set", f"model.pretrained={ckpt}"]), ("scratch", [])):
                name = f"{kind}-e{epochs}-s{seed}"
                runs[name] = run([*FINETUNE, "--set", f"train.epochs={epochs}", "--set", f"train.seed={seed}",
                                  *extra, *common, "--set", f"run.name={name}"], env)
                print(name, runs[name][1]["test_accuracy"], flush=True)
                write(runs, a)  # after every run: a cut-short session keeps what finished


def write(runs: dict, a: argparse.Namespace) -> None:
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lock = a.no_lock_note or "run under flock /tmp/er-bench.lock"
    result = {
        "git_revision": rev, "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.machine()}, shared with other work "
                   f"(load varies: wall times are not comparable); {lock}",
        "script": "python " + " ".join(sys.argv),
        "runs": {k: {"command": c, "summary": sm, "wall_s": w} for k, (c, sm, w) in runs.items()},
    }
    (HERE / "results.json").write_text(json.dumps(result, indent=1) + "\n")

if __name__ == "__main__":
    main()
