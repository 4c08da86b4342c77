"""The service itself on one GPU, end to end, beside a bare torch loop on the same GPU in the same run.

Three parts, one JSON (and, with --md, RESULTS-gpu-service.md through `results.py gpu-service`):

- throughput: per case (model, px, batch, images), a bare torch loop in this process (the service's
  `build_model`, `build_optimizer`, `engine.train_epoch`; bf16 autocast, channels_last, normalized
  float32 images resident on the GPU, a shuffled gather per step, no augmentation) against the
  service: `emergence_ray.trainer.train(cfg)` on a real Ray (TorchTrainer, the service's worker loop,
  `data.ingest=cache`), its own per-epoch `images_per_s` read from metrics.jsonl, warm-up epochs
  excluded. The service reads random uint8 images written as IDX files (N x px x px x 3, the `idx`
  source), decoded once into the cache: the cheapest supported source, and nothing is resized. The
  bare loop runs twice: with torch's defaults, as the service's worker does, and with
  `cudnn.benchmark` on. `service / bare` compares medians over the timed epochs.
- stream: the first case's model fed from an ImageFolder of photo-like JPEGs (crops of
  `sklearn.datasets.load_sample_images()`) with `data.ingest=stream`, images/s beside the synthetic
  (cached) figure; the GPU's busy fraction as streamed / cached images/s (a step costs the GPU the
  same either way, so the rest is time spent waiting for data), with `nvidia-smi` utilization
  sampled during the fit beside it; and the CPU stages of a JPEG pipeline (read, decode, resize,
  normalize per core, times the cores), host-to-device copies, and GPU decode
  (`torchvision.io.decode_jpeg(device="cuda")`) timed in this process, to say which stage limits.
- tta: `emergence-ray train --config jobs/fashion_mnist_gpu.yaml` from the command line (a fresh
  embedded Ray unless --address): wall time from launch to exit, its test accuracy against the
  target, training-only time (the sum of the epochs' `train_s`); beside it `benchmarks/gpu.py`'s
  bare-loop time to the same target for the same recipe (read from the job file).

    python benchmarks/gpu_service.py --fashion-mnist .fmnist --out gpu-service.json \
        --md benchmarks/RESULTS-gpu-service.md          # one H200: ~6-7 min
    python benchmarks/gpu_service.py --device cpu       # tiny settings on 2 cores; what the test runs

Prints one JSON object as its last line. Never mixes devices: --device cpu figures say cpu.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from emergence_ray import config as er_config  # noqa: E402
from emergence_ray.config import load_config  # noqa: E402
from emergence_ray.engine import train_epoch  # noqa: E402
from emergence_ray.models import build_model  # noqa: E402
from emergence_ray.optim import build_optimizer  # noqa: E402

JOB = ROOT / "jobs" / "fashion_mnist_gpu.yaml"
# case: model:px:batch per worker:train images. resnet18_small is ours (CIFAR-style stem, for 32 px)
DEFAULTS = {
    "cuda": dict(cases="resnet50:224:256:4096,resnet18_small:32:512:50000", width=64, epochs=5, warmup_epochs=1,
                 stream_images=4096, jpeg_px=288, stage_images=256),
    "cpu": dict(cases="cnn:16:16:64", width=8, epochs=2, warmup_epochs=1,
                stream_images=64, jpeg_px=40, stage_images=16),
}
# the cpu test's tiny Fashion-MNIST-shaped run: a few images, a narrow model, two epochs
CPU_TTA = ["data.limit=512", "model.width=8", "train.epochs=2", "train.batch_size=32", "scaling.use_gpu=false"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--parts", default="throughput,stream,tta", help="any of throughput,stream,tta")
    p.add_argument("--cases", help="model:px:batch:images, comma-separated; the first one is also streamed")
    p.add_argument("--width", type=int, help="model.width for our small models")
    p.add_argument("--epochs", type=int, help="epochs per service run and per bare loop")
    p.add_argument("--warmup-epochs", type=int, help="first epochs left out of every figure")
    p.add_argument("--stream-images", type=int, help="JPEGs in the streamed ImageFolder")
    p.add_argument("--jpeg-px", type=int, help="side of the square photo crops saved as JPEG")
    p.add_argument("--stage-images", type=int, help="JPEGs timed per CPU stage")
    p.add_argument("--compile", action="store_true",
                   help="train.compile in the service, torch.compile in the bare loop")
    p.add_argument("--fashion-mnist", default=common.FASHION_MNIST, help="folder with the four IDX files")
    p.add_argument("--job", type=Path, default=JOB)
    p.add_argument("--address", help="Ray to use (default: an embedded one, as the CLI starts)")
    p.add_argument("--workdir", type=Path, help="data, runs and logs (default: a temp folder, removed after)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--md", type=Path, help="render the markdown here (results.py gpu-service)")
    args = p.parse_args(argv)
    common.device_defaults(p, args, DEFAULTS)
    args.fashion_mnist = str(Path(args.fashion_mnist).resolve())  # Ray's workers run elsewhere
    args.workdir = args.workdir.resolve() if args.workdir else None
    args.parts = args.parts.split(",")
    unknown = set(args.parts) - {"throughput", "stream", "tta"}
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from throughput,stream,tta")
    return args


def parse_cases(text: str) -> list[dict]:
    cases = []
    for item in text.split(","):
        name, px, batch, images = item.split(":")
        cases.append({"model": name, "px": int(px), "batch_size": int(batch), "images": int(images)})
    return cases


def has_key(dotted: str) -> bool:
    """Whether this branch's config knows a key (e.g. data.augment.policy exists only after the data
    path rewrite): such keys are passed only where they exist, and the JSON says which were."""
    node = er_config.JobConfig
    for part in dotted.split("."):
        field = getattr(node, "model_fields", {}).get(part)
        if field is None:
            return False
        node = field.annotation
    return True


# ------------------------------------------------------------------------------------------ data


def write_idx(path: Path, array: np.ndarray) -> None:
    import struct

    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with open(path, "wb") as f:
        f.write(header)
        f.write(np.ascontiguousarray(array, np.uint8).tobytes())


def synthetic_idx(root: Path, px: int, n: int, n_test: int, seed: int = 0) -> Path:
    """Random uint8 RGB images (N, px, px, 3) and labels as the four IDX files of the `idx` source."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", n), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, px, px, 3), np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte", rng.integers(0, common.NUM_CLASSES, count, np.uint8))
    return root


def photo_jpegs(root: Path, n: int, px: int, classes: int = 10, seed: int = 0) -> Path:
    """An ImageFolder of n photo-like JPEGs: random px x px crops (random scale, flips) of the two
    scikit-learn sample photos, quality 90, in `classes` class folders."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    plans = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(min(px, 200), min(photo.size) + 1))
        x, y = int(rng.integers(0, photo.width - side + 1)), int(rng.integers(0, photo.height - side + 1))
        plans.append((i, photo, (x, y, x + side, y + side), bool(rng.integers(0, 2))))
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)

    def save(plan) -> None:
        i, photo, box, flip = plan
        img = photo.crop(box).resize((px, px), Image.BILINEAR)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img.save(root / f"class_{i % classes}" / f"{i:06d}.jpg", quality=90)

    with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
        list(pool.map(save, plans))
    return root


# ------------------------------------------------------------------------------------ bare loop


def bare_loop(case: dict, args: argparse.Namespace, device: torch.device, cudnn_benchmark: bool) -> dict:
    """The service's model, optimizer and `train_epoch` on normalized images resident on the device,
    in epochs of the service's length: each epoch a random permutation, a gathered batch per step."""
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.manual_seed(0)
    n = case["train_images"]
    x = torch.randn(n, 3, case["px"], case["px"], device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, common.NUM_CLASSES, (n,), device=device)
    model = build_model(case["model"], 3, common.NUM_CLASSES, case["px"], args.width).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, er_config.OptimConfig())
    trained = torch.compile(model) if args.compile else model
    bs, rates = case["batch_size"], []
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).to(device)
        batches = ({"image": x[i], "label": y[i]} for i in order.split(bs))
        t = train_epoch(trained, batches, optimizer, None, device, bf16=cuda)  # ends with a host read
        rates.append(t.count / t.seconds)
    del x, y, model, trained, optimizer
    if cuda:
        torch.backends.cudnn.benchmark = False
        torch.cuda.empty_cache()
    timed = rates[args.warmup_epochs:]
    return {"cudnn_benchmark": cudnn_benchmark, "epoch_rates": rates, "images_per_s": common.median(timed)}


# ------------------------------------------------------------------------------------- service


class GpuSampler:
    """`nvidia-smi` utilization.gpu (% of time a kernel ran, per driver sample) every 0.2 s."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass

    def __enter__(self) -> GpuSampler:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join(timeout=10)

    def summary(self) -> dict | None:
        if not self.enabled:
            return None
        busy = [s for s in self.samples if s > 0]  # zeros: start-up, data preparation, teardown
        return {"samples": len(self.samples), "median_nonzero_pct": common.median(busy) if busy else None,
                "share_of_nonzero_at_least_90_pct": (sum(s >= 90 for s in busy) / len(busy)) if busy else None}


def service_run(name: str, overrides: list[str], args: argparse.Namespace, workdir: Path) -> dict:
    """`emergence_ray.trainer.train(cfg)` as the CLI runs it; the figures from its own metrics.jsonl."""
    from emergence_ray.trainer import train

    overrides = overrides + [f"run.storage_path={workdir / 'runs'}", f"run.name={name}",
                             f"train.epochs={args.epochs}", "run.max_failures=0",
                             f"scaling.use_gpu={str(args.device == 'cuda').lower()}", "scaling.num_workers=1",
                             f"train.compile={str(args.compile).lower()}"]
    cfg = load_config(None, overrides)
    t0 = time.monotonic()
    with GpuSampler(args.device == "cuda") as sampler:
        run_dir = Path(train(cfg))
    wall = time.monotonic() - t0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = metrics[args.warmup_epochs:]
    train_s = sum(m["train_s"] for m in timed)
    # epoch to epoch, validation, checkpoint and report included
    span = timed[-1]["elapsed_s"] - metrics[args.warmup_epochs - 1]["elapsed_s"] if args.warmup_epochs else None
    return {"overrides": overrides, "run_dir": str(run_dir), "wall_s": wall,
            "epoch_rates": [m["images_per_s"] for m in metrics],
            "images_per_s": common.median([m["images_per_s"] for m in timed]),
            "train_images_per_epoch": metrics[-1]["train_images"],
            "timed_train_s": train_s,
            "images_per_s_with_epoch_ends": (sum(m["train_images"] for m in timed) / span) if span else None,
            "gpu_utilization": sampler.summary()}


def synthetic_overrides(path: Path, case: dict, args: argparse.Namespace) -> list[str]:
    return ["data.source=idx", f"data.path={path}", "data.val_fraction=0.02", "data.ingest=cache",
            "data.augment.crop_padding=0", "data.augment.flip=false", f"model.name={case['model']}",
            f"model.width={args.width}", f"train.batch_size={case['batch_size']}", "train.bf16=true",
            "train.channels_last=true", "train.evaluate=last", "train.keep_checkpoints=1"]


def throughput(args: argparse.Namespace, workdir: Path, device: torch.device) -> list[dict]:
    out = []
    for i, case in enumerate(parse_cases(args.cases)):
        t = time.monotonic()
        data = synthetic_idx(workdir / f"synthetic-{i}", case["px"], case["images"], max(64, case["images"] // 50))
        write_s = time.monotonic() - t
        service = service_run(f"throughput-{i}", synthetic_overrides(data, case, args), args, workdir)
        case = dict(case, train_images=service["train_images_per_epoch"], data_write_s=write_s)
        bare = [bare_loop(case, args, device, False)]
        if device.type == "cuda":
            bare.append(bare_loop(case, args, device, True))
        ratio = service["images_per_s"] / bare[0]["images_per_s"]
        out.append({**case, "service": service, "bare": bare, "service_over_bare": ratio,
                    "service_over_bare_cudnn_benchmark": (service["images_per_s"] / bare[1]["images_per_s"]
                                                          if len(bare) > 1 else None)})
        shutil.rmtree(data, ignore_errors=True)
    return out


# -------------------------------------------------------------------------------------- stream


def stages(folder: Path, px: int, batch: int, n: int, device: torch.device) -> dict:
    """Per-core rates of each CPU stage of a JPEG pipeline, then copies and GPU decode."""
    import io

    from PIL import Image

    files = sorted(folder.rglob("*.jpg"))[:n]
    mean = np.float32(0.45)
    t = time.perf_counter()
    raw = [f.read_bytes() for f in files]
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in raw]
    decode_s = time.perf_counter() - t
    t = time.perf_counter()
    resized = [im.resize((px, px), Image.BILINEAR) for im in decoded]
    resize_s = time.perf_counter() - t
    t = time.perf_counter()
    arrays = [((np.asarray(im, np.float32) / 255 - mean) / 0.25).transpose(2, 0, 1) for im in resized]
    normalize_s = time.perf_counter() - t
    cores = os.cpu_count() or 1
    per_core = {"read": n / read_s, "decode": n / decode_s, "resize": n / resize_s, "normalize": n / normalize_s}
    chain = n / (read_s + decode_s + resize_s + normalize_s)
    res = {"images": n, "jpeg_bytes_mean": sum(map(len, raw)) / n, "per_core_images_per_s": per_core,
           "cpu_chain_per_core": chain, "cores": cores, "cpu_chain_all_cores": chain * cores,
           "slowest_cpu_stage": min(per_core, key=per_core.get)}
    if device.type != "cuda":
        return res
    import torchvision

    f32 = torch.from_numpy(np.stack([arrays[i % n] for i in range(batch)])).pin_memory()
    u8 = torch.from_numpy(np.stack([np.asarray(resized[i % n]) for i in range(batch)])).pin_memory()

    def copies(x: torch.Tensor) -> float:
        x.to(device, non_blocking=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            x.to(device, non_blocking=True)
        torch.cuda.synchronize()
        return 10 * batch / (time.perf_counter() - t)

    res["h2d_images_per_s"] = {"float32_pinned": copies(f32), "uint8_pinned": copies(u8)}
    data = [torch.frombuffer(bytearray(raw[i % n]), dtype=torch.uint8) for i in range(batch)]

    def gpu_decode() -> None:
        imgs = torchvision.io.decode_jpeg(data, device=device)
        torch.stack([torch.nn.functional.interpolate(im[None].float(), size=(px, px), mode="bilinear",
                                                     antialias=False)[0] for im in imgs])

    try:
        gpu_decode()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            gpu_decode()
        torch.cuda.synchronize()
        res["gpu_decode_resize_images_per_s"] = 3 * batch / (time.perf_counter() - t)
    except (RuntimeError, TypeError) as err:  # a torchvision without nvjpeg
        res["gpu_decode_resize_images_per_s"] = None
        res["gpu_decode_error"] = str(err)[:300]
    return res


def stream(args: argparse.Namespace, workdir: Path, device: torch.device, synthetic: list[dict]) -> dict:
    case = parse_cases(args.cases)[0]
    t = time.monotonic()
    folder = photo_jpegs(workdir / "jpegs", args.stream_images, args.jpeg_px)
    write_s = time.monotonic() - t
    overrides = ["data.source=imagefolder", f"data.path={folder}", f"data.image_size={case['px']}",
                 "data.val_fraction=0.02", "data.test_fraction=0.02", "data.ingest=stream",
                 "data.augment.crop_padding=0", "data.augment.flip=true", f"model.name={case['model']}",
                 f"model.width={args.width}", f"train.batch_size={case['batch_size']}", "train.bf16=true",
                 "train.channels_last=true", "train.evaluate=last", "train.keep_checkpoints=1"]
    passed = []
    if has_key("data.augment.policy"):  # the data path rewrite: ImageNet-style crops for photos
        overrides.append("data.augment.policy=imagenet")
        passed.append("data.augment.policy=imagenet")
    service = service_run("stream", overrides, args, workdir)
    cached = next((s for s in synthetic if s["model"] == case["model"] and s["px"] == case["px"]), None)
    busy = service["images_per_s"] / cached["service"]["images_per_s"] if cached else None
    return {**case, "jpegs": args.stream_images, "jpeg_px": args.jpeg_px, "jpeg_write_s": write_s,
            "keys_passed_because_they_exist": passed, "service": service,
            "synthetic_cached_images_per_s": cached["service"]["images_per_s"] if cached else None,
            "gpu_busy_fraction": busy,
            "stages": stages(folder, case["px"], case["batch_size"], args.stage_images, device)}


# ----------------------------------------------------------------------------------------- tta


def recipe_of(job: Path, overrides: list[str]) -> dict:
    cfg = load_config(job, overrides)
    return {"model": cfg.model.name, "width": cfg.model.width, "optimizer": cfg.optim.name, "lr": cfg.optim.lr,
            "weight_decay": cfg.optim.weight_decay, "schedule": cfg.optim.schedule, "epochs": cfg.train.epochs,
            "batch_size": cfg.train.batch_size, "label_smoothing": cfg.train.label_smoothing,
            "crop_padding": cfg.data.augment.crop_padding, "flip": cfg.data.augment.flip,
            "val_fraction": cfg.data.val_fraction, "limit": cfg.data.limit}


# what gpu.py's time-to-accuracy run fixes; a job that differs is reported, not hidden
GPU_PY_RECIPE = {"model": "cnn", "optimizer": "adamw", "weight_decay": 0.05, "schedule": "onecycle",
                 "label_smoothing": 0.1, "crop_padding": 2, "flip": True}


def tta(args: argparse.Namespace, workdir: Path) -> dict:
    target = 0.94
    overrides = [f"data.path={args.fashion_mnist}", f"run.storage_path={workdir / 'runs'}", "run.name=tta"]
    if args.device == "cpu":
        overrides += CPU_TTA
    recipe = recipe_of(args.job, overrides)
    cmd = [sys.executable, "-m", "emergence_ray", "train", "--config", str(args.job)]
    for o in overrides:
        cmd += ["--set", o]
    if args.address:
        cmd += ["--address", args.address]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    log = workdir / "tta-cli.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"emergence-ray train exited {proc.returncode}: {log.read_text()[-3000:]}")
    run_dir = workdir / "runs" / "tta"
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first_val = next((m for m in metrics if m["val_accuracy"] >= target), None)
    service = {"command": "emergence-ray train " + " ".join(shlex.quote(c) for c in cmd[4:]),
               "embedded_ray": not args.address, "launch_to_exit_s": wall, "test_accuracy": summary["test_accuracy"],
               "reached": summary["test_accuracy"] >= target, "run_wall_s": summary["wall_s"],
               "training_only_s": sum(m["train_s"] for m in metrics), "epochs": len(metrics),
               "first_epoch_val_at_target": first_val["epoch"] if first_val else None,
               "elapsed_at_first_val_target_s": first_val["elapsed_s"] if first_val else None,
               "train_s_to_first_val_target": (sum(m["train_s"] for m in metrics[:first_val["epoch"]])
                                               if first_val else None),
               "val_accuracy": [m["val_accuracy"] for m in metrics]}
    # gpu.py's bare loop on the same recipe (its lr is per global batch of 512)
    out = workdir / "gpu-py.json"
    bare_cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", args.device, "--models", "cnn",
                "--data", "synthetic", "--steps", "1", "--warmup", "1", "--repeats", "1",
                "--batch-size", str(recipe["batch_size"]), "--fashion-mnist", args.fashion_mnist,
                "--target", str(target), "--tta-epochs", str(recipe["epochs"]), "--tta-width", str(recipe["width"]),
                "--lr", f"{recipe['lr'] * 512 / recipe['batch_size']:g}", "--out", str(out)]
    if recipe["limit"]:
        bare_cmd += ["--tta-limit", str(recipe["limit"])]
    if args.device == "cpu":
        bare_cmd += ["--threads", "1"]
    proc = subprocess.run(bare_cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"gpu.py exited {proc.returncode}: {proc.stderr[-3000:]}")
    g = json.loads(out.read_text())["time_to_accuracy"]
    differs = {k: (recipe[k], v) for k, v in GPU_PY_RECIPE.items() if recipe[k] != v}
    job = str(args.job.relative_to(ROOT)) if args.job.is_relative_to(ROOT) else str(args.job)
    return {"target": target, "job": job,
            "recipe": recipe, "recipe_differs_from_gpu_py": differs, "service": service,
            "bare_gpu_py": {"command": "python benchmarks/gpu.py " + " ".join(shlex.quote(c) for c in bare_cmd[2:]),
                            "time_to_target_s": g["time_to_target_s"],
                            "train_time_to_target_s": g["train_time_to_target_s"],
                            "epoch_reached": g["epoch_reached"], "best_test_accuracy": g["best_test_accuracy"],
                            "train_images": g["train_images"],
                            "test_accuracy": [e["test_accuracy"] for e in g["epochs"]]}}


# ---------------------------------------------------------------------------------------- main


def gpu_facts() -> dict:
    if not torch.cuda.is_available():
        return {"device_name": "cpu"}
    p = torch.cuda.get_device_properties(0)
    return {"device_name": p.name, "memory_mib": p.total_memory // 2**20, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    t0 = time.monotonic()
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    threads = torch.get_num_threads()
    if args.device == "cpu":  # the bare loop like the service's one-CPU worker (Ray sets OMP_NUM_THREADS=1)
        torch.set_num_threads(1)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="er-gpu-service-"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = {"device": args.device, **gpu_facts(), "machine": common.machine_info(),
              "command": "python benchmarks/gpu_service.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
              "epochs": args.epochs, "warmup_epochs": args.warmup_epochs, "width": args.width,
              "compile": args.compile, "parts": args.parts, "throughput": [], "stream": None, "tta": None,
              "skipped": []}
    try:
        if "tta" in args.parts:  # first: its CLI starts a Ray of its own, before this process holds one
            if Path(args.fashion_mnist).is_dir():
                result["tta"] = tta(args, workdir)
            else:
                result["skipped"].append(f"tta: no IDX files in {args.fashion_mnist}")
        if {"throughput", "stream"} & set(args.parts):
            from emergence_ray import cluster

            cluster.connect(args.address)
            if "throughput" in args.parts:
                result["throughput"] = throughput(args, workdir, device)
            if "stream" in args.parts:
                result["stream"] = stream(args, workdir, device, result["throughput"])
    finally:
        torch.set_num_threads(threads)  # main() may run inside a caller's process (the tests)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result["total_s"] = time.monotonic() - t0
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.md:
        from benchmarks import results

        args.md.write_text(results.gpu_service_page(result))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
