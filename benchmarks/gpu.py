"""GPU benchmark for one H200-class GPU: training images/s and time to 92% Fashion-MNIST accuracy.

Runs the service's models (`build_model`), optimizer and schedule (`build_optimizer`,
`build_scheduler`) and math (`engine.train_epoch` with bf16 autocast, `engine.evaluate`) on data
held in GPU memory, channels_last, optionally `torch.compile`d. Two parts:

- throughput: cnn and resnet18_small on synthetic CIFAR-sized data (3x32x32) and on Fashion-MNIST
  (1x28x28); warm-up steps excluded, median of --repeats timed runs of --steps steps;
- time to accuracy: cnn (width 64) on Fashion-MNIST, one-cycle AdamW, random crop + flip done on
  the GPU, the official test set scored after every epoch; the time to --target (92%) counts from
  the first training step (model build and compile included) and includes the evaluations.

    python benchmarks/gpu.py                                   # one GPU, eager (~2 min on an H200)
    python benchmarks/gpu.py --compile                         # torch.compile (adds compile time)
    torchrun --nproc_per_node 1 benchmarks/gpu.py              # same, through an NCCL process group
    torchrun --nproc_per_node 8 benchmarks/gpu.py              # DDP over NCCL, one process per GPU
    python benchmarks/gpu.py --device cpu                      # tiny settings; what the tests run

Prints one JSON object as its last line (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks import common  # noqa: E402
from emergence_ray.config import OptimConfig  # noqa: E402
from emergence_ray.engine import evaluate, train_epoch  # noqa: E402
from emergence_ray.models import build_model  # noqa: E402
from emergence_ray.optim import build_optimizer, build_scheduler  # noqa: E402

DEFAULTS = {  # per device: (steps, warmup, batch per process, tta epochs, tta train images (0 = all))
    "cuda": dict(steps=100, warmup=20, batch_size=512, tta_epochs=15, tta_limit=0),
    "cpu": dict(steps=4, warmup=2, batch_size=32, tta_epochs=1, tta_limit=1024),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--steps", type=int, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, help="untimed steps first (compilation happens here)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--models", default="cnn,resnet18_small")
    p.add_argument("--data", default="synthetic,fashion_mnist")
    p.add_argument("--fashion-mnist", default=common.FASHION_MNIST, help="folder with the IDX files")
    p.add_argument("--no-tta", action="store_true", help="skip the time-to-accuracy run")
    p.add_argument("--target", type=float, default=0.92, help="test accuracy to reach")
    p.add_argument("--tta-epochs", type=int)
    p.add_argument("--tta-limit", type=int, help="train images for time to accuracy (0 = all)")
    p.add_argument("--tta-width", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-3, help="peak AdamW lr, per global batch of 512")
    p.add_argument("--budget-s", type=float, default=540, help="stop training for accuracy after this")
    p.add_argument("--threads", type=int, help="CPU only: torch threads per process (default: cores / processes)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    common.device_defaults(p, args, DEFAULTS)
    return args


class Env:
    """Device, rank and world: a process group only under torchrun (NCCL on GPUs, gloo on CPUs)."""

    def __init__(self, device: str):
        self.distributed = "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local}" if device == "cuda" else "cpu")
        if device == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.backend = ("nccl" if device == "cuda" else "gloo") if self.distributed else None
        if self.distributed:
            dist.init_process_group(self.backend, device_id=self.device if device == "cuda" else None)
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def prepare_model(name: str, channels: int, size: int, width: int, env: Env, compile_: bool):
    """-> (model to train: compiled / DDP-wrapped, the bare module)."""
    torch.manual_seed(0)
    bare = build_model(name, channels, common.NUM_CLASSES, size, width).to(env.device)
    if env.cuda:
        bare = bare.to(memory_format=torch.channels_last)
    model = bare
    if env.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.device] if env.cuda else None)
    if compile_:
        model = torch.compile(model)
    return model, bare


def on_device(x: np.ndarray, env: Env) -> torch.Tensor:
    t = torch.from_numpy(x).to(env.device)
    return t.contiguous(memory_format=torch.channels_last) if env.cuda else t


def data_pool(data: str, n: int, env: Env, fashion: str) -> tuple[torch.Tensor, torch.Tensor]:
    """n normalized images on the device: random (synthetic CIFAR-sized) or Fashion-MNIST."""
    if data == "synthetic":
        g = torch.Generator().manual_seed(env.rank)
        x = torch.randn(n, 3, 32, 32, generator=g).numpy()
        y = torch.randint(0, common.NUM_CLASSES, (n,), generator=g).numpy()
    else:
        images, y = common.fashion_mnist_images(fashion, n, offset=(env.rank * n) % 50000)
        x = common.to_normalized_nchw(images)
    return on_device(x, env), torch.from_numpy(np.asarray(y, np.int64)).to(env.device)


def throughput(model_name: str, data: str, args: argparse.Namespace, env: Env) -> dict:
    channels, size = common.shape_of(data)
    bs = args.batch_size
    x, y = data_pool(data, bs * 8, env, args.fashion_mnist)
    batches = [{"image": x[i:i + bs], "label": y[i:i + bs]} for i in range(0, len(y), bs)]

    def run(steps: int) -> float:
        env.sync()
        t = time.perf_counter()
        # train_epoch ends with a host read of its sums: the GPU is done when it returns
        train_epoch(model, (batches[i % len(batches)] for i in range(steps)), optimizer, None, env.device,
                    bf16=env.cuda)
        return time.perf_counter() - t

    t0 = time.perf_counter()
    model, bare = prepare_model(model_name, channels, size, 32, env, args.compile)
    optimizer = build_optimizer(bare, OptimConfig())
    setup = time.perf_counter() - t0
    warm = run(args.warmup)  # compilation, cuDNN autotuning
    rates = [args.steps * bs * env.world / run(args.steps) for _ in range(args.repeats)]
    return {"model": model_name, "data": data, "batch_size": bs, "world": env.world,
            "images_per_s": common.median(rates), "rates": rates, "setup_s": setup, "warmup_s": warm}


def augment(x: torch.Tensor, aug) -> torch.Tensor:
    """The service's train augmentation (`BatchAugment`: 2 px crop after black padding, flip), one
    batched gather on the device; channels_last on a GPU, as the model is."""
    out = aug(x)
    return out.contiguous(memory_format=torch.channels_last) if x.is_cuda else out.contiguous()


def time_to_accuracy(args: argparse.Namespace, env: Env) -> dict:
    from emergence_ray.data.transforms import channel_stats

    images = common.read_idx_file(args.fashion_mnist, "train-images-idx3-ubyte")
    labels = common.read_idx_file(args.fashion_mnist, "train-labels-idx1-ubyte").astype(np.int64)
    test_x = common.read_idx_file(args.fashion_mnist, "t10k-images-idx3-ubyte")
    test_y = common.read_idx_file(args.fashion_mnist, "t10k-labels-idx1-ubyte").astype(np.int64)
    if args.tta_limit:
        images, labels = images[:args.tta_limit], labels[:args.tta_limit]
        test_x, test_y = test_x[:args.tta_limit], test_y[:args.tta_limit]
    mean, std = channel_stats(images[:, None])

    def normalize(a: np.ndarray) -> torch.Tensor:
        return on_device(((a[:, None].astype(np.float32) / 255.0 - mean[0]) / std[0]).astype(np.float32), env)

    x, y = normalize(images), torch.from_numpy(labels).to(env.device)
    tx, ty = normalize(test_x[env.rank::env.world]), torch.from_numpy(test_y[env.rank::env.world]).to(env.device)
    from emergence_ray.data.augment import BatchAugment

    aug = BatchAugment(2, True, [-mean[0] / std[0]])
    bs = args.batch_size
    steps = len(y) // env.world // bs
    lr = args.lr * bs * env.world / 512
    cfg = OptimConfig(name="adamw", lr=lr, weight_decay=0.05, schedule="onecycle")

    env.sync()
    t0 = time.perf_counter()
    model, bare = prepare_model("cnn", 1, 28, args.tta_width, env, args.compile)
    optimizer = build_optimizer(bare, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps, args.tta_epochs)
    history, reached, train_s = [], None, 0.0
    for epoch in range(args.tta_epochs):
        g = torch.Generator(device="cpu").manual_seed(epoch)
        order = torch.randperm(len(y), generator=g).to(env.device)
        mine = order[env.rank::env.world][:steps * bs]
        batches = ({"image": augment(x[i], aug), "label": y[i]} for i in mine.split(bs))
        t_train = time.perf_counter()
        t = train_epoch(model, batches, optimizer, scheduler, env.device, label_smoothing=0.1, bf16=env.cuda)
        train_s += time.perf_counter() - t_train
        v = evaluate(bare, ({"image": tx[i:i + 2048], "label": ty[i:i + 2048]} for i in range(0, len(ty), 2048)),
                     env.device, bf16=env.cuda)
        correct, count = env.all_sum([v.correct, v.count])
        acc = correct / max(1, count)
        elapsed = time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "test_accuracy": acc, "elapsed_s": elapsed, "train_loss": t.loss})
        if reached is None and acc >= args.target:
            reached = {"epoch": epoch + 1, "time_s": elapsed, "train_s": train_s}
        if elapsed > args.budget_s:
            break
    return {"model": f"cnn width {args.tta_width}", "target": args.target, "epochs_planned": args.tta_epochs,
            "global_batch": bs * env.world, "lr": lr, "train_images": len(y), "test_images": len(test_y),
            "time_to_target_s": reached["time_s"] if reached else None,
            "train_time_to_target_s": reached["train_s"] if reached else None,
            "epoch_reached": reached["epoch"] if reached else None,
            "best_test_accuracy": max(h["test_accuracy"] for h in history), "epochs": history}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    t0 = time.perf_counter()
    env = Env(args.device)
    if not env.cuda:
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // env.world))
    has_fashion = Path(args.fashion_mnist).is_dir()
    result = {
        "device": args.device, "device_name": torch.cuda.get_device_name(env.device) if env.cuda else "cpu",
        "world": env.world, "backend": env.backend, "compile": args.compile, "bf16": env.cuda,
        "channels_last": env.cuda, "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "throughput": [], "skipped": [],
    }
    for data in args.data.split(","):
        if data == "fashion_mnist" and not has_fashion:
            result["skipped"].append(f"{data}: no IDX files in {args.fashion_mnist}")
            continue
        for name in args.models.split(","):
            result["throughput"].append(throughput(name, data, args, env))
    if args.no_tta or not has_fashion:
        result["time_to_accuracy"] = None
        if not args.no_tta:
            result["skipped"].append(f"time to accuracy: no IDX files in {args.fashion_mnist}")
    else:
        result["time_to_accuracy"] = time_to_accuracy(args, env)
    result["total_s"] = time.perf_counter() - t0
    if env.distributed:
        dist.destroy_process_group()
    if env.rank == 0:
        text = json.dumps(result)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
        print(text, flush=True)
    return result


if __name__ == "__main__":
    main()
