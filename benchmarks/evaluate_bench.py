"""`emergence-ray evaluate` on a CPU with the driver keeping freed memory (the default for 224 px
images, `cluster.keep_freed_in_this_process`) against the same command with glibc's defaults
(`--set scaling.keep_freed_memory=false`, as shipped before the twenty-second session), alternated
run by run, the order rotating every round.

    flock /tmp/er-bench.lock python benchmarks/evaluate_bench.py [--images 16000] [--rounds 2]

Each run is the real CLI in a subprocess (embedded Ray, 2 CPUs here): stream.py's photo-like 256
px JPEGs, a `cnn` checkpoint (width 8, random weights: speed does not depend on them) for 224 px
RGB under the imagenet policy (predict_bench.py's), the folder's seeded test split (20%) decoded
by Ray Data and evaluated on the driver in batches of 512. Recorded: the whole command's wall
time and images per second of it. Writes benchmarks/EVALUATE.md (+ EVALUATE.json).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common, predict_bench  # noqa: E402

VARIANTS = {"kept": ("driver keeping freed memory (the default at 224 px on a CPU)", ()),
            "glibc": ("glibc's defaults (`scaling.keep_freed_memory=false`, as before)",
                      ("--set", "scaling.keep_freed_memory=false"))}


def evaluate_run(ckpt: Path, folder: Path, out: Path, extra: tuple[str, ...]) -> dict:
    overrides = [a for o in predict_bench._overrides(folder) for a in ("--set", o)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("MALLOC_")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "emergence_ray", "evaluate", "--checkpoint", str(ckpt),
                           "--output", str(out), *overrides, *extra], capture_output=True, text=True,
                          env=env, cwd=out.parent)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    images = json.loads((out / "report.json").read_text())["num_images"]
    return {"seconds": seconds, "images": images, "images_per_s": images / seconds}


def render(res: dict) -> str:
    m = res["machine"]
    title = "`emergence-ray evaluate` on a CPU: the driver keeping freed memory against glibc's defaults"
    lines = [*common.results_header(title, res["command"], m),
             f"{res['images']:,} photo-like 256 px JPEGs (stream.py's) in 10 class folders, the seeded test split "
             f"({res['test_images']:,} images) evaluated by the CLI (embedded Ray) with a `cnn` checkpoint (width "
             f"{predict_bench.WIDTH}) for 224 px RGB, imagenet policy, batches of 512 on the driver; the whole "
             "command timed, start-up included. Runs alternate, the order rotating every round.", "",
             "| driver's allocator | images/s of the whole command (each round) | median | x glibc's defaults |",
             "|---|---|---|---|"]
    base = common.median(res["runs"]["glibc"])
    for k, (name, _) in VARIANTS.items():
        runs = res["runs"][k]
        lines.append(f"| {name} | {', '.join(f'{r:.1f}' for r in runs)} | {common.median(runs):.1f} | "
                     f"**{common.median(runs) / base:.2f}x** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args, folder, res = common.jpeg_bench_start("evaluate_bench.py", __doc__, argv, images=16000, rounds=2)
    res.update(images=args.images, runs={k: [] for k in VARIANTS})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = predict_bench.make_checkpoint(root, folder)
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
            for k in order:
                got = evaluate_run(ckpt, folder, root / f"eval-{k}-{r}", VARIANTS[k][1])
                res["runs"][k].append(got["images_per_s"])
                res["test_images"] = got["images"]
            print({k: round(v[-1], 1) for k, v in res["runs"].items()}, flush=True)
    common.write_results(args.out, "EVALUATE", res, render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
