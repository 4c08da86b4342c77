"""The device transform's cost per image on a CPU: `augment.DeviceTransform` as shipped against
the former one (the batch normalized at once; each crop interpolated from a strided view, the
batch mirrored afterwards), on batches of photo-like JPEGs decoded as the service decodes them.
One process and one torch thread per allocator setting (a training worker of fewer than 2 CPUs
runs with OMP_NUM_THREADS=1), the two versions alternated round by round.

    python benchmarks/transform.py [--images 1024] [--rounds 5]

Two allocator settings, each in its own process: glibc's defaults, and the settings a CPU training
worker gets where `scaling.keep_freed_memory` is on (`cluster.TRAIN_WORKER_MALLOC`: by default for
batches of 224 px images). Cases: the imagenet policy's training transform (RandomResizedCrop 224
+ flip + normalize) and its evaluation transform (centre 224 of 256 + normalize), and the small
policy at 28 px (the same code in both versions: the control row). Writes benchmarks/TRANSFORM.json
and benchmarks/TRANSFORM.md (command, git revision, machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

BATCH = 64  # stream.py's and the jpeg job's batch
CASES = {"imagenet_train": "imagenet policy, training: RandomResizedCrop 224 of 256 + flip + normalize",
         "imagenet_eval": "imagenet policy, evaluation: centre 224 of 256 + normalize",
         "small_28": "small policy, 28 px, 1 channel: normalize + pad-and-crop + flip (unchanged: the control)"}
ALLOCATORS = {"glibc": "glibc's defaults",
              "kept": "the training worker's kept freed memory (`scaling.keep_freed_memory`)"}


def former_transform(t, x, generator=None):
    """`DeviceTransform.__call__` as shipped before the twenty-second session, on a CPU."""
    import torch
    from torch.nn import functional as F

    from emergence_ray.data.augment import random_resized_crop_boxes

    def normalize(v):
        return v.to(torch.float32).mul_(t.scale).sub_(t.shift)

    size, side = t.spec.image_size, x.shape[-1]
    if not t.imagenet:
        v = normalize(x)
        return t.small_aug(v, generator) if t.small_aug is not None else v
    if not t.train:
        top = (side - size) // 2
        return normalize(x[:, :, top:top + size, top:top + size])
    n = len(x)
    boxes = random_resized_crop_boxes(n, side, t.scale_range, t.ratio, generator)
    mirror = (torch.rand(n, generator=generator) < 0.5) if t.flip else torch.zeros(n, dtype=torch.bool)
    out = torch.empty(n, x.shape[1], size, size, dtype=torch.uint8)
    for i, (x0, y0, w, h) in enumerate(boxes.long().tolist()):
        out[i] = F.interpolate(x[i:i + 1, :, y0:y0 + h, x0:x0 + w], size=(size, size), mode="bilinear",
                               align_corners=False)[0]
    if mirror.any():
        out[mirror] = out[mirror].flip(3)
    return normalize(out)


def batches(folder: Path, images: int) -> dict:
    """uint8 batches as the wire carries them: the JPEGs decoded at 256 px (imagenet policy) and,
    for the small policy, the same photos as 28 px grayscale."""
    import numpy as np
    import pyarrow.fs

    from emergence_ray.data.transforms import DataSpec, DecodeFiles

    files = np.array(sorted(str(p) for p in folder.rglob("*.jpg"))[:images])
    big = DataSpec(3, 224, [str(i) for i in range(10)], mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                   policy="imagenet", load_size=256)
    small = DataSpec(1, 28, [str(i) for i in range(10)], mean=[0.45], std=[0.25])
    out = {}
    for name, spec in (("big", big), ("small", small)):
        decode = DecodeFiles(pyarrow.fs.LocalFileSystem(), spec, "fail", keep_ids=False)
        out[name] = (spec, [decode({"id": files[i:i + BATCH], "label": np.zeros(len(files[i:i + BATCH]), np.int64)})
                            ["image"] for i in range(0, len(files), BATCH)])
    return out


def _ms_per_image(fn, t, xs: list) -> float:
    import torch

    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for x in xs:
        fn(t, x, gen)
    return (time.perf_counter() - start) / sum(len(x) for x in xs) * 1000


def measure(folder: Path, images: int, rounds: int) -> dict:
    """In this process: each case's ms per image, shipped and former alternated; whether their
    outputs are identical (the same seeded draws)."""
    import torch

    from emergence_ray.config import AugmentConfig
    from emergence_ray.data.augment import DeviceTransform

    torch.set_num_threads(1)
    data = batches(folder, images)
    transforms = {"imagenet_train": ("big", DeviceTransform(data["big"][0], AugmentConfig(policy="imagenet"), True)),
                  "imagenet_eval": ("big", DeviceTransform(data["big"][0], AugmentConfig(policy="imagenet"))),
                  "small_28": ("small", DeviceTransform(data["small"][0], AugmentConfig(flip=True), True))}
    versions = {"shipped": lambda t, x, g: t(x, g), "former": former_transform}
    res: dict = {}
    for case, (which, t) in transforms.items():
        xs = [torch.from_numpy(a) for a in data[which][1]]
        same = all(torch.equal(t(x, torch.Generator().manual_seed(i)),
                               former_transform(t, x, torch.Generator().manual_seed(i))) for i, x in enumerate(xs))
        for fn in versions.values():  # untimed: warm
            _ms_per_image(fn, t, xs)
        runs: dict = {k: [] for k in versions}
        for r in range(rounds):
            for k in (list(versions) if r % 2 == 0 else list(versions)[::-1]):
                runs[k].append(_ms_per_image(versions[k], t, xs))
        res[case] = {"runs": runs, "identical_output": same,
                     "ratios": [f / s for f, s in zip(runs["former"], runs["shipped"])]}
    return {"images": sum(len(a) for a in data["big"][1]), "cases": res}


def in_subprocess(allocator: str, folder: Path, images: int, rounds: int) -> dict:
    """`measure` in a fresh process with that allocator setting (glibc reads it at start-up)."""
    from emergence_ray.cluster import TRAIN_WORKER_MALLOC

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if allocator == "kept":
        env.update(TRAIN_WORKER_MALLOC)
    code = ("import json, sys; from pathlib import Path; from benchmarks import transform; "
            f"print(json.dumps(transform.measure(Path({str(folder)!r}), {images}, {rounds})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render(res: dict) -> str:
    m = res["machine"]
    title = "The device transform on a CPU: shipped against the former implementation"
    lines = [*common.results_header(title, res["command"], m, software=False),
             f"{res['images']} photo-like 256 px JPEGs (stream.py's) decoded as the service decodes them, batches "
             f"of {BATCH}, one torch thread; shipped and former alternated round by round in one process per "
             "allocator setting. Former: the batch normalized at once (three passes over a batch-sized float "
             "tensor), each crop interpolated from a strided view, the batch mirrored afterwards. Shipped: "
             "each crop copied out contiguous and normalized into the float batch while in the cache, images "
             "of 128 px and up normalized one at a time.", "",
             "| allocator | case | shipped ms/img (median) | former ms/img (median) | former / shipped (rounds) | "
             "outputs identical |", "|---|---|---|---|---|---|"]
    for alloc, r in res["allocators"].items():
        for case, c in r["cases"].items():
            ratios = ", ".join(f"{x:.2f}" for x in c["ratios"])
            lines.append(f"| {ALLOCATORS[alloc]} | {CASES[case]} | {common.median(c['runs']['shipped']):.3f} | "
                         f"{common.median(c['runs']['former']):.3f} | **{common.median(c['ratios']):.2f}x** "
                         f"({ratios}) | {'yes' if c['identical_output'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args, folder, res = common.jpeg_bench_start("transform.py", __doc__, argv, images=1024, rounds=5)
    res["allocators"] = {a: in_subprocess(a, folder, args.images, args.rounds) for a in ALLOCATORS}
    res["images"] = res["allocators"]["glibc"]["images"]  # the JPEGs the folder had, at most --images
    common.write_results(args.out, "TRANSFORM", res, render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
