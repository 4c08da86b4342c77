"""Decode cost per image on photo-like JPEGs: the service's `transforms.DecodeFiles` (what a decode
actor runs on each batch of files) as shipped, against the same with the former conversion of the
decoded photo to (C, H, W): numpy's transposing copy of PIL's (H, W, C) array, after an
unconditional `convert("RGB")`. One process, one core, alternated round by round.

    python benchmarks/decode.py [--images 1024] [--rounds 5]

Writes benchmarks/DECODE.json and benchmarks/DECODE.md (command, git revision, machine). The
images are stream.py's: random crops of scikit-learn's sample photos, 256 px JPEGs, decoded with
the imagenet policy at 256 px (`image_size=224`), as `emergence-ray train` streams them.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

BATCH = 128  # files per decode-actor call (pipeline.ACTOR_FILES)


def former_decode(value: bytes, channels: int, size: int) -> np.ndarray:
    """The conversion shipped before the twentieth session, for an image already at the wire size."""
    from PIL import Image

    img = Image.open(io.BytesIO(bytes(value)))
    img.load()
    img = img.convert("L" if channels == 1 else "RGB")
    assert img.size == (size, size), "the benchmark's photos are generated at the wire size"
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class FormerDecodeFiles:
    """`DecodeFiles` with `former_decode`: the same file reads, batch array and labels."""

    def __init__(self, shipped):
        self.shipped = shipped

    def __call__(self, batch: dict) -> dict:
        spec = self.shipped.decode.spec
        ids = batch["id"]
        out = np.zeros((len(ids), spec.channels, spec.wire_size, spec.wire_size), np.uint8)
        for i, p in enumerate(ids):
            out[i] = former_decode(self.shipped.read(str(p)), spec.channels, spec.wire_size)
        return {"image": out, "label": np.asarray(batch["label"]).astype(np.int64)}


def ms_per_image(fn, files: list[str]) -> float:
    t = time.perf_counter()
    for i in range(0, len(files), BATCH):
        ids = np.array(files[i:i + BATCH])
        fn({"id": ids, "label": np.zeros(len(ids), np.int64)})
    return (time.perf_counter() - t) / len(files) * 1000


def measure(folder: Path, images: int, rounds: int) -> dict:
    import pyarrow.fs

    from emergence_ray.data.transforms import DataSpec, DecodeFiles

    files = sorted(str(p) for p in folder.rglob("*.jpg"))[:images]
    spec = DataSpec(channels=3, image_size=224, class_names=[str(i) for i in range(10)], mean=[0.5] * 3,
                    std=[0.25] * 3, policy="imagenet", load_size=256)
    shipped = DecodeFiles(pyarrow.fs.LocalFileSystem(), spec, "fail", keep_ids=False)
    paths = {"shipped": shipped, "former": FormerDecodeFiles(shipped)}
    first = shipped({"id": np.array(files[:BATCH]), "label": np.zeros(BATCH, np.int64)})["image"]
    same = np.array_equal(first, paths["former"]({"id": np.array(files[:BATCH]), "label": np.zeros(BATCH)})["image"])
    for fn in paths.values():  # untimed: the files into the page cache, the code paths warm
        ms_per_image(fn, files[:BATCH])
    runs: dict = {k: [] for k in paths}
    for r in range(rounds):
        order = list(paths) if r % 2 == 0 else list(paths)[::-1]
        for k in order:
            runs[k].append(ms_per_image(paths[k], files))
        print({k: round(v[-1], 3) for k, v in runs.items()}, flush=True)
    return {"images": len(files), "runs": runs, "identical_output": same,
            "ratios": [f / s for f, s in zip(runs["former"], runs["shipped"])]}


def render(res: dict) -> str:
    m, r = res["machine"], res["decode"]
    title = "Decode cost per image: the shipped DecodeFiles against the former (C, H, W) conversion"
    lines = [*common.results_header(title, res["command"], m, software=False),
             f"{r['images']} photo-like 256 px JPEGs (stream.py's), imagenet policy at 256 px, batches of {BATCH} "
             "files as a decode actor gets them; one process, the two alternated round by round. Outputs "
             f"identical: {'yes' if r['identical_output'] else 'NO'}.", "",
             "| | ms per image (median) | rounds |", "|---|---|---|"]
    names = {"shipped": "shipped: channel planes unpacked by PIL, no convert of an RGB image",
             "former": "former: convert('RGB'), then numpy's transposing copy of (H, W, C)"}
    for k, runs in r["runs"].items():
        lines.append(f"| {names[k]} | {common.median(runs):.3f} | {', '.join(f'{x:.3f}' for x in runs)} |")
    lines += ["", f"Former / shipped: {common.median(r['ratios']):.2f}x (rounds "
              f"{', '.join(f'{x:.2f}' for x in r['ratios'])}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, folder, res = common.jpeg_bench_start("decode.py", __doc__, argv, images=1024, rounds=5)
    res["decode"] = measure(folder, args.images, args.rounds)
    common.write_results(args.out, "DECODE", res, render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
