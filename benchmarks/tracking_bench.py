"""What does experiment tracking cost training? The same job three ways, side by side in one run:

- `off`: no tracking (`tracking.tensorboard=false`, no MLflow URI);
- `tensorboard`: rank 0 writes TensorBoard event files every epoch (the default);
- `tensorboard+mlflow`: plus one MLflow `log_batch` per epoch to a real `mlflow server` (SQLite
  store, started here on 127.0.0.1), and at the end the reports, checkpoint and model.

Each variant trains the Fashion-MNIST job (`jobs/fashion_mnist.yaml`, `--limit` training images,
`--epochs` epochs, 2 workers) through `emergence_ray.trainer.train` on one local Ray; the order
rotates every round. Per run: the loop's images/s from epoch 2 to the last (`metrics.jsonl`'s
`elapsed_s`, which includes the per-epoch report, checkpoint and tracking of every epoch but the
last), the training step's images/s (`train_images_per_s`: forward/backward only) and the wall
time (start-up, test evaluation and the MLflow uploads at the end included). Ratios are to `off`
within the same round. Writes --out (markdown, with the command, git revision and machine) and
the JSON beside it.

    flock /tmp/er-bench.lock python benchmarks/tracking_bench.py [--rounds 3] [--epochs 3] [--limit 6000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.run import start_ray  # noqa: E402

MODES = ("off", "tensorboard", "tensorboard+mlflow")


def mlflow_server(root: Path, nice: int = 0, jobs: bool = True) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` (SQLite store, 1 uvicorn worker) on 127.0.0.1. `nice`: its CPU
    priority (19: it gets a core only when training leaves one idle, as a server on another host
    never competes); `jobs=False` turns off MLflow's job runner (a second process, for its GenAI
    jobs, that experiment tracking does not use) with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="true" if jobs else "false")
    proc = subprocess.Popen(["nice", "-n", str(nice), sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=root,
                            env=env)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return proc, uri
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("mlflow server did not start")


def one_run(mode: str, name: str, storage: Path, uri: str, args) -> dict:
    from emergence_ray.config import load_config
    from emergence_ray.trainer import train

    overrides = [f"data.path={args.fashion}", f"data.limit={args.limit}", f"train.epochs={args.epochs}",
                 f"run.storage_path={storage}", f"run.name={name}", "tracking.experiment=tracking-bench",
                 f"tracking.tensorboard={mode != 'off'}", "tracking.on_error=fail"]
    if mode == "tensorboard+mlflow":
        overrides.append(f"tracking.mlflow_uri={uri}")
    cfg = load_config(common.ROOT / "jobs" / "fashion_mnist.yaml", overrides)
    t = time.perf_counter()
    run_dir = Path(train(cfg))
    wall = time.perf_counter() - t
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    later = history[1:]
    loop = sum(h["train_images"] for h in later) / (history[-1]["elapsed_s"] - history[0]["elapsed_s"])
    return {"mode": mode, "loop_images_per_s": loop, "train_images_per_s": summary["train_images_per_s"],
            "wall_s": wall, "test_accuracy": summary["test_accuracy"],
            "tracked": (run_dir / "mlflow.json").exists(), "tensorboard": (run_dir / "tensorboard").exists()}


def call_cost(root: Path, uri: str, calls: int) -> dict:
    """What rank 0 adds to every epoch, timed directly: `EpochLogger.log` (TensorBoard scalars plus
    flush; plus one MLflow log_batch to the server) on a realistic metrics dict. Milliseconds."""
    from emergence_ray import storage
    from emergence_ray.config import TrackingConfig
    from emergence_ray.tracking import RECORD, EpochLogger, Tracker

    metrics = {"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.78,
               "train_images": 6000, "val_images": 600, "train_s": 9.1, "images_per_s": 659.0, "lr": 0.003,
               "elapsed_s": 10.2}
    out = {}
    for mode in ("tensorboard", "tensorboard+mlflow"):
        run_dir = root / f"calls-{mode.replace('+', '-')}"
        run_dir.mkdir()
        cfg = TrackingConfig(mlflow_uri=uri if mode != "tensorboard" else None, experiment="tracking-bench")
        if cfg.mlflow_uri:
            tracker = Tracker(cfg, uri, None)
            from mlflow import MlflowClient

            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(cfg.experiment)
            tracker.client, tracker.experiment_id = client, exp.experiment_id if exp else client.create_experiment(
                cfg.experiment)
            (run_dir / "config.yaml").write_text("x: 1\n")
            tracker.start(str(run_dir), f"calls-{mode}")
            assert storage.exists(str(run_dir / RECORD))
        logger = EpochLogger(str(run_dir), cfg, 0, 0, calls + 1)
        times = []
        for epoch in range(1, calls + 1):
            t = time.perf_counter()
            logger.log({**metrics, "epoch": epoch})
            times.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        logger.flush()  # what the last epoch waits for (MLflow's queue drained)
        out[mode] = {"median_ms": common.median(times), "max_ms": max(times), "calls": calls,
                     "final_flush_ms": (time.perf_counter() - t) * 1000}
    return out


def render(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Tracking overhead: training throughput with and without TensorBoard / MLflow", "",
        f"Generated {m['date']} by `{res['command']}` (git {m['git_revision']}).", "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, GPU: {m['cuda']}; {m['os']}; Python "
        f"{m['python']}, torch {m['torch']}, ray {m['ray']}. Load average at start: "
        f"{', '.join(str(x) for x in m['load_average'])}. The machine was shared with other work (other engineers' "
        "tests): absolute figures are noisy; compare the ratios within a round.", "",
        f"Job: `jobs/fashion_mnist.yaml` (cnn width 16, batch 128 per worker, 2 workers), {res['limit']} training "
        f"images, {res['epochs']} epochs; MLflow: a local `mlflow server` (SQLite store, 1 worker) on 127.0.0.1, "
        f"at nice {res.get('server_nice', 0)}, its job runner {'on' if res.get('server_jobs', True) else 'off'}.", "",
        "| round | mode | loop img/s (epochs 2+) | x off | step img/s | x off | wall s | test acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        lines.append(f"| {r['round']} | {r['mode']} | {r['loop_images_per_s']:.0f} | {r['loop_ratio']:.3f} | "
                     f"{r['train_images_per_s']:.0f} | {r['train_ratio']:.3f} | {r['wall_s']:.1f} | "
                     f"{r['test_accuracy']:.4f} |")
    if res["runs"]:
        lines += ["", "Median ratio to `off` over the rounds:", "", "| mode | loop img/s | step img/s | wall |",
                  "|---|---|---|---|"]
        for mode, med in res["medians"].items():
            lines.append(f"| {mode} | {med['loop']:.3f} | {med['train']:.3f} | {med['wall']:.3f} |")
    lines += ["", "What rank 0 adds to each epoch, timed directly (`EpochLogger.log`, after the report):", "",
              "| mode | median ms per epoch | max ms | calls | then waiting for the MLflow queue, ms |",
              "|---|---|---|---|---|"]
    for mode, c in res["call_cost"].items():
        lines.append(f"| {mode} | {c['median_ms']:.1f} | {c['max_ms']:.1f} | {c['calls']} | "
                     f"{c['final_flush_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit", type=int, default=6000)
    p.add_argument("--calls", type=int, default=30, help="EpochLogger.log calls timed per mode")
    p.add_argument("--server-nice", type=int, default=0, help="the mlflow server's nice value (19: lowest priority)")
    p.add_argument("--server-jobs", choices=("on", "off"), default="on",
                   help="MLflow's job runner (MLFLOW_SERVER_ENABLE_JOB_EXECUTION), a second server process")
    p.add_argument("--fashion", default=common.FASHION_MNIST)
    p.add_argument("--out", default=str(common.ROOT / "benchmarks" / "TRACKING.md"))
    args = p.parse_args()
    from emergence_ray.logs import setup_logging

    setup_logging()  # the service's per-epoch lines, as the CLI prints them
    command = common.command_line("tracking_bench.py", p, args, ("rounds", "epochs", "limit", "calls", "server_nice",
                                                                  "server_jobs", "out"))
    args.server_jobs = args.server_jobs == "on"
    res: dict = {"command": command, "machine": {**common.machine_info(), "load_average": os.getloadavg()},
                 "epochs": args.epochs, "limit": args.limit, "runs": [], "server_nice": args.server_nice,
                 "server_jobs": args.server_jobs}
    with tempfile.TemporaryDirectory(prefix="er-tracking-bench-") as tmp:
        root = Path(tmp)
        (root / "mlflow").mkdir()
        server, uri = mlflow_server(root / "mlflow", nice=args.server_nice, jobs=args.server_jobs)
        try:
            res["call_cost"] = call_cost(root, uri, args.calls)
            print(json.dumps(res["call_cost"]), flush=True)
            if args.rounds:
                start_ray(_temp_dir=str(root / "ray"))
            for rnd in range(args.rounds):
                order = MODES[rnd % 3:] + MODES[:rnd % 3]
                runs = {m: one_run(m, f"r{rnd}-{m.replace('+', '-')}", root / "runs", uri, args) for m in order}
                for m in order:
                    r = runs[m]
                    r.update(round=rnd + 1, loop_ratio=r["loop_images_per_s"] / runs["off"]["loop_images_per_s"],
                             train_ratio=r["train_images_per_s"] / runs["off"]["train_images_per_s"],
                             wall_ratio=r["wall_s"] / runs["off"]["wall_s"])
                    res["runs"].append(r)
                    print(json.dumps(r), flush=True)
        finally:
            import ray

            ray.shutdown()
            os.killpg(server.pid, signal.SIGTERM)  # the server and its workers (its own session)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    res["medians"] = {m: {k: common.median([r[f"{k}_ratio"] for r in res["runs"] if r["mode"] == m])
                          for k in ("loop", "train", "wall")} for m in MODES}
    out = Path(args.out)
    out.write_text(render(res))
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
