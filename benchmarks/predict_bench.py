"""Batch inference throughput on photo-like JPEGs: `emergence-ray predict` (Ray Data decode tasks
streaming to a pool of model actors) next to a plain torch loop fed by a torch `DataLoader` with
the same decode, the same checkpoint and the same CPUs.

    flock /tmp/er-bench.lock python benchmarks/predict_bench.py [--images 16000] [--repeats 2]

The images are `stream.make_folder`'s: random crops of scikit-learn's sample photos, 256 px JPEGs
in 10 class folders (real decode cost, not flat noise), shared with benchmarks/stream.py. The
checkpoint is a `cnn` (width 8, random weights: speed does not depend on them) for 224 px RGB
under the imagenet policy, so both paths decode each JPEG to 256 px (`transforms.Decode`) and
centre-crop 224 + normalize (`augment.DeviceTransform`), run the model and take the top-5
probabilities. Plain torch: a DataLoader with `--procs` decode processes (collate = the service's
Decode) feeding one process that runs the model; Ray: `predict_command` on a local
`ray.init(num_cpus=procs)`, the whole command timed (listing, decode tasks, actor start-up,
Parquet written under a temporary name and renamed), as shipped and with the model replicas on
glibc's allocator defaults (`scaling.keep_freed_memory=false`, as shipped before the twenty-second
session). The paths alternate, repeat by repeat.
Writes benchmarks/PREDICT.md (+ PREDICT.json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common, stream  # noqa: E402
from emergence_ray import checkpoint  # noqa: E402
from emergence_ray.config import load_config, to_dict  # noqa: E402
from emergence_ray.data.transforms import DataSpec  # noqa: E402
from emergence_ray.models import build_model  # noqa: E402

WIDTH = 8
BATCH = 256


def _overrides(folder: Path) -> list[str]:
    return ["data.source=imagefolder", f"data.path={folder}", f"data.image_size={stream.SIZE}",
            "data.augment.policy=imagenet", "model.name=cnn", f"model.width={WIDTH}"]


def make_checkpoint(root: Path, folder: Path) -> Path:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    spec = DataSpec(3, stream.SIZE, classes, mean=[0.45, 0.45, 0.45], std=[0.25, 0.25, 0.25], policy="imagenet",
                    load_size=256)
    cfg = load_config(None, _overrides(folder))
    torch.manual_seed(0)
    model = build_model("cnn", 3, len(classes), stream.SIZE, WIDTH)
    ckpt = root / "checkpoint"
    ckpt.mkdir()
    checkpoint.save(ckpt, {"model": model.state_dict(), "epoch": 0, "history": [], "spec": spec.to_dict(),
                           "config": to_dict(cfg), "rng": checkpoint.rng_state()})
    return ckpt


def plain_torch(ckpt: Path, folder: Path, procs: int) -> float:
    """images/s: DataLoader (`procs` processes: read + Decode) -> centre crop, normalize, forward,
    top-5 in this process, every image of the folder once."""
    from torch.utils.data import DataLoader

    from emergence_ray.data.augment import DeviceTransform

    state = checkpoint.load(str(ckpt))
    spec = DataSpec.from_dict(state["spec"])
    model = build_model("cnn", 3, spec.num_classes, spec.image_size, state["config"]["model"]["width"])
    model.load_state_dict(state["model"])
    model.eval()
    to_model = DeviceTransform(spec)
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    names = {c: i for i, c in enumerate(spec.class_names)}
    labels = [names[Path(p).parent.name] for p in paths]
    start = time.perf_counter()
    loader = DataLoader(stream._Files(paths, labels), batch_size=BATCH, num_workers=procs,
                        collate_fn=stream._DecodeCollate(spec), prefetch_factor=2)
    n = 0
    with torch.no_grad():
        for batch in loader:
            probs = model(to_model(batch["image"])).softmax(1)
            probs.topk(5, dim=1)
            n += len(probs)
    assert n == len(paths)
    return n / (time.perf_counter() - start)


def ray_predict(ckpt: Path, folder: Path, out: Path, extra: tuple[str, ...] = ()) -> float:
    from emergence_ray.predict import predict_command

    start = time.perf_counter()
    predict_command(str(ckpt), str(out), None, None, _overrides(folder) + list(extra))
    return time.perf_counter() - start


# emergence-ray predict's variants: config overrides of each
RAY_PATHS = {"ray": (), "ray_glibc": ("scaling.keep_freed_memory=false",)}


def render(res: dict) -> str:
    m = res["machine"]
    ratio = res["ray_median"] / res["torch_median"]
    glibc = res.get("ray_glibc")
    rows = [] if not glibc else [
        f"| emergence-ray predict, model replicas with glibc's defaults (`scaling.keep_freed_memory=false`, as "
        f"shipped before) | {', '.join(f'{r:,.0f}' for r in glibc)} | {common.median(glibc):,.0f} | "
        f"{common.median(glibc) / res['torch_median']:.2f} |"]
    return "\n".join([
        "# Batch inference: `emergence-ray predict` vs a torch DataLoader loop", "",
        f"Command: `{res['command']}`  ", f"Git revision: `{m['git_revision']}`  ",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB; torch {m['torch']}, Ray {m['ray']}; "
        f"load average at start {m['load_average']}  ", f"Date: {m['date']}  ", "",
        f"{res['images']:,} photo-like 256 px JPEGs (random crops of scikit-learn's sample photos, "
        "`benchmarks/stream.py`'s set) in 10 class folders; a `cnn` checkpoint (width 8) for 224 px RGB, imagenet "
        "policy: each JPEG decoded to 256 px, centre crop 224, normalized, top-5 probabilities. "
        f"Plain torch: a DataLoader with {res['procs']} decode processes (collate = the service's `Decode`) feeding "
        "the model in the main process (glibc's allocator as it comes, as in a user's script). emergence-ray: "
        f"`predict_command` on a local `ray.init(num_cpus={res['procs']})`, Ray Data decode tasks streaming to 2 "
        "model actors (0.5 CPU each; by default, at this batch size on a CPU, with glibc's allocator keeping "
        "freed memory, `scaling.keep_freed_memory`), Parquet written as it goes; the whole command timed, "
        "start-up included. Alternated repeat by repeat.", "",
        "| path | images/s (each repeat) | median | ratio to the DataLoader loop |", "|---|---|---|---|",
        f"| torch DataLoader loop | {', '.join(f'{r:,.0f}' for r in res['torch'])} | {res['torch_median']:,.0f} "
        "| 1.00 |",
        f"| emergence-ray predict | {', '.join(f'{r:,.0f}' for r in res['ray'])} | {res['ray_median']:,.0f} | "
        f"{ratio:.2f} |", *rows, ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=16000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--procs", type=int, default=2, help="CPU processes of each path")
    common.add_folder_options(p)
    args = p.parse_args(argv)
    import ray

    folder = stream.make_folder(args.data / f"jpeg-{args.images}", args.images)
    res = {"command": common.command_line("predict_bench.py", p, args, ("images", "repeats", "procs")),
           "machine": common.machine_info(), "images": args.images, "procs": args.procs, "torch": [],
           **{k: [] for k in RAY_PATHS}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = make_checkpoint(root, folder)
        for r in range(args.repeats):
            res["torch"].append(plain_torch(ckpt, folder, args.procs))
            for k in (list(RAY_PATHS) if r % 2 == 0 else list(RAY_PATHS)[::-1]):
                ray.init(num_cpus=args.procs, include_dashboard=False, logging_level="WARNING")
                try:
                    res[k].append(args.images / ray_predict(ckpt, folder, root / f"{k}{r}.parquet", RAY_PATHS[k]))
                finally:
                    ray.shutdown()
            print({k: round(res[k][-1], 1) for k in ("torch", *RAY_PATHS)}, flush=True)
    res["torch_median"], res["ray_median"] = common.median(res["torch"]), common.median(res["ray"])
    common.write_results(args.out, "PREDICT", res, render(res))
    print(f"ratio_predict_vs_torch={res['ray_median'] / res['torch_median']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
