"""Streaming ingest on photo-like JPEGs: time to the first training step and epoch time of
`emergence-ray train --set data.ingest=stream` at several dataset sizes, and the ingest rate of
the service's streaming path against a torch DataLoader doing the same decode + transforms with
the same number of CPU processes.

    flock /tmp/er-bench.lock python benchmarks/stream.py [--sizes 1000 4000 16000] [--procs 2]

Writes benchmarks/STREAM.json and benchmarks/STREAM.md (command, git revision, machine). The
images are random crops of scikit-learn's two sample photos (`load_sample_images`), 256 px JPEGs
in 10 class folders: real JPEG decode cost, not flat noise. Both ingest paths decode with the
service's `transforms.Decode` (imagenet policy: shorter side to 256, centre 256 square) and apply
`augment.DeviceTransform` (RandomResizedCrop 224 + flip, normalize) to every batch in the
consuming process, as a training worker does.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

SIZE = 224
WORKER_THREADS = 1  # torch threads of a training worker with fewer than 2 CPUs (Ray sets OMP_NUM_THREADS=1)
BATCH = 64
WARMUP_S = 3.0  # the untimed first pass of each ingest path


def make_folder(root: Path, n: int, side: int = 256, classes: int = 10, seed: int = 0) -> Path:
    """n JPEGs: random crops (40-100% of the shorter side) of the two sample photos, resized to
    side x side, one folder per class. Reuses a folder that already holds n images."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root = Path(root)
    if root.exists() and sum(1 for _ in root.rglob("*.jpg")) == n:
        return root
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        s = int(min(w, h) * rng.uniform(0.4, 1.0))
        x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        d = root / f"class_{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        img = photo.crop((x, y, x + s, y + s)).resize((side, side), Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img.save(d / f"{i:06d}.jpg", quality=90)
    return root


def _data_cfg(folder: Path):
    from emergence_ray.config import DataConfig

    return DataConfig(source="imagefolder", path=str(folder), image_size=SIZE, val_fraction=0.05,
                      test_fraction=0.05, augment={"policy": "imagenet"}, ingest="stream")


@functools.lru_cache(maxsize=4)
def _listed(folder: Path):
    """(listed splits, DataSpec) of the folder, once per process: resolving the spec decodes a
    sample in a Ray Data job, which is no part of any measured pass."""
    from emergence_ray.data import pipeline

    cfg = _data_cfg(folder)
    raw = pipeline.load_raw(cfg)
    return raw, pipeline.resolve_spec(raw, cfg)


CPU_FIELDS = ("cores_busy", "cpu_ms_per_image", "consumer_cpu_ms_per_image")  # `_cpu_use`'s figures


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU-seconds of the whole machine since boot, all cores (/proc/stat's user,
    nice, system, irq and softirq are busy; idle, iowait and steal, time the hypervisor gave to
    another machine, are not); (0, 0) where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    except OSError:
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    busy = user + nice + system + irq + softirq
    return busy / hz, (busy + idle + iowait + steal) / hz


def _cpu_use(start: tuple[float, float, float], images: int) -> dict:
    """Where the CPU went from `start` (machine busy, machine total, this process's CPU seconds) to
    now: cores in use over the whole machine, its CPU per image (every process: decoders, Ray's
    daemons, the consumer), and this consuming process's own CPU per image (all its threads; a
    DataLoader's worker processes are not in it)."""
    busy, total = machine_cpu()
    own = time.process_time()
    cores = os.cpu_count() or 1
    n = max(1, images)
    return {"cores_busy": cores * (busy - start[0]) / max(1e-9, total - start[1]),
            "cpu_ms_per_image": 1000 * (busy - start[0]) / n, "consumer_cpu_ms_per_image": 1000 * (own - start[2]) / n}


def _consume(batches, transform, limit_s: float) -> dict:
    """Apply the device transform to every batch (as a CPU worker does; None: leave it to a GPU)
    -> images/s after the first batch, and where the CPU went meanwhile (`_cpu_use`)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    n, t0, t_first = 0, time.perf_counter(), None
    first, cpu0 = 0, None
    for b in batches:
        x = transform(b["image"], gen) if transform is not None else b["image"]
        if t_first is None:
            t_first, first = time.perf_counter(), len(x)
            cpu0 = (*machine_cpu(), time.process_time())
        else:
            n += len(x)
        if time.perf_counter() - t0 > limit_s:
            break
    end = time.perf_counter()
    dt = end - (t_first or t0)
    use = _cpu_use(cpu0, n) if cpu0 else dict.fromkeys(CPU_FIELDS, 0.0)
    return {"images": n, "seconds": dt, "images_per_s": n / max(1e-9, dt), "first_batch_s": (t_first or t0) - t0,
            "with_start_images_per_s": (n + first) / max(1e-9, end - t0), **use}


def ray_stream_rate(folder: Path, limit_s: float, batch: int = BATCH, transform: bool = True,
                    split: bool = False, paced: bool = True, hold_cpus: int = 0,
                    calls_per_actor: int | None = None, niced: bool = True, decodes: int | None = None) -> dict:
    """The service's streamed train split as a training worker reads it (`ingest.WorkerIngest`,
    with the local shuffle buffer it uses for this source, `ingest.stream_shuffle_buffer`: none
    for an ImageFolder, whose per-epoch file order already shuffles every image), on the Ray this
    process is connected to, the files read and decoded in a pool of decode actors
    (`pipeline.decode_actors`). `split` False: as one worker reads it (`handoff.TrainSplit`), the
    whole dataset, Ray Data's executor a thread of this process; True: through
    `streaming_split(1, equal=True)` as each of several workers reads it, the executor in Ray
    Data's split coordinator actor. `paced`: the executor's scheduling loop at most 50 steps a
    second, as `handoff.trainer_inputs` runs it (`pacing.pace_data_executor`); False: unpaced, as
    shipped before. `hold_cpus`: this process holds that many of Ray's CPUs for the pass, as a
    training worker holds its own, and Ray Data gets the rest (`exclude_resources`, as Train's
    DataConfig sets it): the decode pool the service starts beside one worker on this node.
    `calls_per_actor`: calls each decode actor runs at once (default: as shipped,
    `pipeline.DECODE_CALLS_PER_ACTOR`, in blocks of whole batches; 1 as before the twenty-fourth
    session, with the blocks of then). `niced`: the decode actors' threads at `data.decode_niceness`,
    as shipped; False: at the consumer's nice value, as before the twenty-sixth session.
    `decodes`: batches each decode actor decodes at once (default: as shipped,
    `pipeline.actor_decodes`; 1 as before the twenty-seventh session)."""
    import ray
    import ray.util
    import torch

    from emergence_ray.cluster import spare_cpus
    from emergence_ray.data import pipeline
    from emergence_ray.data.augment import DeviceTransform
    from emergence_ray.data.ingest import WorkerIngest, stream_shuffle_buffer
    from emergence_ray.data.pacing import pace_data_executor

    cfg = _data_cfg(folder)
    if not niced:
        cfg = cfg.model_copy(update={"decode_niceness": None})
    raw, spec = _listed(folder)
    # the pool starts with one actor per CPU that the consumer leaves (`cluster.spare_cpus`): every CPU
    # unless it holds some
    start = spare_cpus(1, hold_cpus) if hold_cpus else int(ray.cluster_resources()["CPU"])
    calls = calls_per_actor or pipeline.DECODE_CALLS_PER_ACTOR
    # blocks of whole batches, as the service reads them (`trainer`: `prepare(batch_rows=...)`); the
    # former pool (one call per actor) with the former blocks
    ds = pipeline.decoded(raw.train, spec, cfg, shuffle_seed=0, keep_ids=False, actors=True, start_actors=start,
                          calls_per_actor=calls, batch_rows=batch if calls > 1 else 0, decodes_per_actor=decodes)
    if paced:
        pace_data_executor(ds.context)
    held = None
    if hold_cpus:  # reserved as Train reserves a worker's bundle: no other task or actor gets them
        held = ray.util.placement_group([{"CPU": hold_cpus}])
        ray.get(held.ready())
        ds.context.execution_options.exclude_resources = ray.data.ExecutionResources(cpu=hold_cpus)
    try:
        buffer = stream_shuffle_buffer(cfg.source, batch)
        source = ds.streaming_split(1, equal=True)[0] if split else ds.iterator()
        batches = WorkerIngest(source, batch, torch.device("cpu"), shuffle=True, shuffle_buffer=buffer).epoch(0)
        return _consume(batches, DeviceTransform(spec, cfg.augment, train=True) if transform else None, limit_s)
    finally:
        if held is not None:
            ray.util.remove_placement_group(held)


class _Files:
    def __init__(self, paths: list[str], labels: list[int]):
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return Path(self.paths[i]).read_bytes(), self.labels[i], self.paths[i]


class _DecodeCollate:
    def __init__(self, spec):
        from emergence_ray.data.transforms import Decode

        self.decode = Decode(spec, keep_ids=False)

    def __call__(self, items):
        import torch

        raw = np.empty(len(items), dtype=object)
        raw[:] = [b for b, _, _ in items]
        out = self.decode({"image": raw, "label": np.array([y for _, y, _ in items]),
                           "id": np.array([p for _, _, p in items])})
        return {"image": torch.from_numpy(out["image"]), "label": torch.from_numpy(out["label"])}


def dataloader_rate(folder: Path, procs: int, limit_s: float, spec=None, batch: int = BATCH,
                    transform: bool = True) -> dict:
    """torch DataLoader, `procs` worker processes, the same files, decode and device transform."""
    import torch
    from torch.utils.data import DataLoader

    from emergence_ray.data.augment import DeviceTransform

    cfg = _data_cfg(folder)
    raw, resolved = _listed(folder)
    spec = spec or resolved
    split = raw.train
    names = {c: i for i, c in enumerate(split.classes)}
    labels = [names[p[len(split.root.rstrip("/")) + 1:].split("/", 1)[0]] for p in split.paths]
    loader = DataLoader(_Files(split.paths, labels), batch_size=batch, shuffle=True, num_workers=procs,
                        collate_fn=_DecodeCollate(spec), prefetch_factor=2, persistent_workers=False,
                        generator=torch.Generator().manual_seed(0))
    return _consume(loader, DeviceTransform(spec, cfg.augment, train=True) if transform else None, limit_s)


def ingest_paths(folder: Path, procs: int, limit_s: float, batch: int = BATCH) -> dict:
    """The compared paths by name: each a function of (`transform`[, seconds]) -> one pass's figures."""
    return {"ray": lambda t, s=limit_s: ray_stream_rate(folder, s, batch, transform=t),
            "ray_split": lambda t, s=limit_s: ray_stream_rate(folder, s, batch, transform=t, split=True),
            "ray_unniced": lambda t, s=limit_s: ray_stream_rate(folder, s, batch, transform=t, niced=False),
            "ray_split_unniced": lambda t, s=limit_s: ray_stream_rate(folder, s, batch, transform=t, split=True,
                                                                      niced=False),
            "ray_unpaced": lambda t, s=limit_s: ray_stream_rate(folder, s, batch, transform=t, split=True,
                                                                paced=False),
            "ray_held": lambda t, s=limit_s: ray_stream_rate(folder, s, batch, transform=t, hold_cpus=1),
            "ray_held_serial": lambda t, s=limit_s: ray_stream_rate(folder, s, batch, transform=t, hold_cpus=1,
                                                                    calls_per_actor=1),
            "ray_held_unniced": lambda t, s=limit_s: ray_stream_rate(folder, s, batch, transform=t, hold_cpus=1,
                                                                     niced=False),
            "ray_one_decode": lambda t, s=limit_s: ray_stream_rate(folder, s, batch, transform=t, decodes=1),
            "ray_held_one_decode": lambda t, s=limit_s: ray_stream_rate(folder, s, batch, transform=t, hold_cpus=1,
                                                                        decodes=1),
            "loader": lambda t, s=limit_s: dataloader_rate(folder, procs, s, batch=batch, transform=t)}


RUN_FIELDS = ("images_per_s", "with_start_images_per_s", "first_batch_s", *CPU_FIELDS)


def ingest_rounds(measure: dict, n: int, transform: bool, images: int, procs: int, warmup: bool = True) -> dict:
    """`n` rounds of every path in `measure`, alternated (every other round in reverse order) so
    that a drifting host load and the pass before it hit every path alike; rates, start-up and
    ratios to the DataLoader, overall and within each round. `warmup`: first an untimed pass of
    every path."""
    runs: dict = {k: {field: [] for field in RUN_FIELDS} for k in measure}
    # untimed: a first pass in this process imports the path's modules, which no later pass pays
    # (py-spy: ~2 s of the consumer's CPU in Ray Data's first pass)
    for fn in measure.values() if warmup else ():
        fn(transform, WARMUP_S)
    for i in range(n):
        # every other round in reverse, so that no path always runs right after the same one (the
        # last pass's actors and objects may still be torn down as the next one starts)
        for k, fn in list(measure.items())[::-1 if i % 2 else 1]:
            r = fn(transform)
            for field in runs[k]:
                runs[k][field].append(r[field])
        print({k: round(v["images_per_s"][-1]) for k, v in runs.items()}, flush=True)
    loader = runs["loader"]["images_per_s"]
    return {"images": images, "procs": procs, "runs": runs,
            "ratio": {k: common.median(v["images_per_s"]) / max(1e-9, common.median(loader)) for k, v in runs.items()},
            "pair_ratios": {k: [r / max(1e-9, d) for r, d in zip(v["images_per_s"], loader)] for k, v in runs.items()}}


def first_step(folder: Path, runs: Path, name: str, epochs: int = 1) -> dict:
    """`emergence-ray train` (embedded Ray, streamed) on the folder: first_step_s and epoch time."""
    overrides = ["data.source=imagefolder", f"data.path={folder}", f"data.image_size={SIZE}", "data.ingest=stream",
                 "data.augment.policy=imagenet", "data.val_fraction=0.05", "data.test_fraction=0.05",
                 "model.name=cnn", "model.width=8", f"train.epochs={epochs}", f"train.batch_size={BATCH}",
                 f"run.storage_path={runs}", f"run.name={name}"]
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "emergence_ray", "train",
                           *[a for o in overrides for a in ("--set", o)]], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, cwd=runs)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    summary = json.loads((runs / name / "summary.json").read_text())
    metrics = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    return {"first_step_s": summary["first_step_s"], "epoch_train_s": metrics[0]["train_s"],
            "train_images": summary["images"]["train"], "command_s": time.time() - t}


INGEST_PATHS = {
    "ray": "Ray Data stream, as shipped for one worker: file list -> read + Decode in a pool of decode actors, "
           "the whole dataset read by the worker; Ray Data's scheduling loop a thread of the worker, paced",
    "ray_split": "the same through streaming_split, as shipped for each of several workers (the scheduling loop "
                 "in Ray Data's split coordinator actor, paced)",
    "ray_unniced": "Ray Data stream for one worker, its decode actors' threads at the consumer's nice value "
                   "(as shipped before the twenty-sixth session; now at data.decode_niceness, below it)",
    "ray_split_unniced": "the same through streaming_split, the decode actors' threads at the consumer's nice value",
    "ray_unpaced": "the same through streaming_split, the scheduling loop unpaced (as shipped before)",
    "ray_held": "as shipped for one worker, the consuming process holding 1 of Ray's CPUs as a training worker "
                "holds its own: the decode pool gets the other {spare} (the service's pool beside one worker on "
                "this node)",
    "ray_held_serial": "the same, each decode actor running one call at a time, blocks not aligned to "
                       "batches (as shipped before the twenty-fourth session)",
    "ray_held_unniced": "the service's pool beside one worker, its decode actors' threads at the consumer's nice "
                        "value (as shipped before the twenty-sixth session; now at data.decode_niceness, below it)",
    "ray_one_decode": "Ray Data stream for one worker, each decode actor decoding one batch at a time (as shipped "
                      "before the twenty-seventh session; now two at once, below the consumer)",
    "ray_held_one_decode": "the service's pool beside one worker, each decode actor decoding one batch at a time (as "
                           "shipped before the twenty-seventh session; now two at once, below the consumer)",
    "loader": "torch DataLoader (num_workers={procs}, same read + Decode in its workers)",
}


def _render_ingest(r: dict, key: str, earlier: dict | None) -> list[str]:
    if key == "ingest":
        lines = [f"## Ingest rate ({r['images']} images, {r['procs']} CPU processes each, device transform in the "
                 "consuming process)", ""]
    else:
        lines = [f"## Decode alone ({r['images']} images, {r['procs']} CPU processes each, no device transform)", "",
                 "What a GPU worker's CPUs do: the device transform runs on the GPU there, so decode is the "
                 "CPU side's whole job.", ""]
    if earlier:
        lines += [f"From an earlier run: `{earlier['command']}` at git `{earlier['git_revision']}`, "
                  f"{earlier['date']}.", ""]
    lines += ["Rounds alternate the paths (every other round in reverse order), after an untimed warm-up pass of "
              "each. images/s counts from the first batch on; *with start* counts from the call that starts the pass "
              "(the actors' or workers' start-up included).", "",
              "| path | images/s (median) | x DataLoader | pairs x DataLoader | with start | first batch s | runs |",
              "|---|---|---|---|---|---|---|"]
    loader_start = common.median(r["runs"]["loader"]["with_start_images_per_s"])
    for k, runs in r["runs"].items():
        rate, start = common.median(runs["images_per_s"]), common.median(runs["with_start_images_per_s"])
        name = INGEST_PATHS[k].format(procs=r['procs'], spare=max(1, r['procs'] - 1))
        lines.append(f"| {name} | {rate:.0f} | {r['ratio'][k]:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in r['pair_ratios'][k])} | {start:.0f} "
                     f"({start / max(1e-9, loader_start):.2f}x) | {common.median(runs['first_batch_s']):.1f} | "
                     f"{', '.join(f'{x:.0f}' for x in runs['images_per_s'])} |")
    lines += _render_cpu(r)
    if key == "ingest" and "ray" in r["ratio"]:
        pairs = r["pair_ratios"]["ray"]
        lines += ["", f"Ratio as shipped / DataLoader: {r['ratio']['ray']:.2f} (medians); within each round "
                  f"{common.median(pairs):.2f} (median), {min(pairs):.2f} to {max(pairs):.2f}, at or above 1.0 in "
                  f"{sum(x >= 1.0 for x in pairs)} of {len(pairs)} rounds (target >= 1.0)."]
    if key == "ingest" and "ray_held" in r["ratio"]:
        pairs = r["pair_ratios"]["ray_held"]
        lines += ["", f"The service's pool on this node / DataLoader: {r['ratio']['ray_held']:.2f} (medians); "
                  f"within each round {common.median(pairs):.2f} (median), {min(pairs):.2f} to {max(pairs):.2f}, "
                  f"at or above 1.0 in {sum(x >= 1.0 for x in pairs)} of {len(pairs)} rounds."]
    twice = [(k, f"{k}_one_decode") for k in ("ray", "ray_held") if f"{k}_one_decode" in r["runs"] and k in r["runs"]]
    if twice:
        lines += ["", "Two decodes per actor (as shipped) / one, within each round: " + "; ".join(
            f"`{a}` " + ", ".join(f"{x / max(1e-9, y):.2f}" for x, y in
                                  zip(r["runs"][a]["images_per_s"], r["runs"][b]["images_per_s"]))
            for a, b in twice) + "."]
    niced = [(k, f"{k}_unniced") for k in ("ray", "ray_split", "ray_held")
             if f"{k}_unniced" in r["runs"] and k in r["runs"]]
    if niced:
        lines += ["", "Decode actors below the consumer (`data.decode_niceness`) / at its nice value, within each "
                  "round: " + "; ".join(f"`{a}` " + ", ".join(f"{x / max(1e-9, y):.2f}" for x, y in
                                                  zip(r["runs"][a]["images_per_s"], r["runs"][b]["images_per_s"]))
                              for a, b in niced) + "."]
    return lines + [""]


def _render_cpu(r: dict) -> list[str]:
    """Where the CPU went in each path's passes, from the first batch on (runs from before the
    twenty-eighth session did not record it)."""
    runs = {k: v for k, v in r["runs"].items() if v.get("cpu_ms_per_image")}
    if not runs:
        return []
    lines = ["", "Where the CPU went, from the first batch on (medians over the passes): the cores in use on the "
             "whole machine, its CPU per image (every process: decoders, Ray's daemons, the consumer), and the "
             "consuming process's own (all its threads; not the DataLoader's worker processes).", "",
             "| path | cores in use | CPU ms per image | consumer's CPU ms per image |", "|---|---|---|---|"]
    for k, v in runs.items():
        cores, cpu, own = (common.median(v[f]) for f in CPU_FIELDS)
        lines.append(f"| `{k}` | {cores:.2f} | {cpu:.3f} | {own:.3f} |")
    return lines


def render(results: dict) -> str:
    m = results["machine"]
    lines = ["# Streaming ingest: first step, epoch time, and Ray Data vs DataLoader", "",
             f"Command: `{results['command']}`  ", f"Git revision: `{m['git_revision']}`  ",
             f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB, {m['os']}; torch {m['torch']}, "
             f"Ray {m['ray']}; load average at start {m['load_average']}  ",
             f"Date: {m['date']}  ", "",
             "The machine was shared with other work (see the load average): compare the figures within "
             "this run, as ratios, not with other runs.", "",
             "Data: photo-like 256 px JPEGs (random crops of scikit-learn's sample photos), 10 classes; "
             f"`image_size={SIZE}`, `data.augment.policy=imagenet`, `data.ingest=stream`.", ""]
    if results.get("consumer_threads"):
        lines += [f"The consuming process runs the device transform on {results['consumer_threads']} torch "
                  "thread(s), as a training worker of fewer than 2 CPUs does (Ray starts it with "
                  "OMP_NUM_THREADS=1); both paths alike.", ""]
    if results.get("store_mb"):
        lines += [f"Ray's object store in the ingest measurements: {results['store_mb']} MiB (Ray Data's budget is "
                  f"a share of it); the train split decodes to {results['decoded_mb']} MiB.", ""]
    if results.get("first_step"):
        lines += ["## Time to the first training step, and epoch time (`emergence-ray train`, embedded Ray)", ""]
        if results.get("first_step_from"):
            f = results["first_step_from"]
            lines += [f"From an earlier run: `{f['command']}` at git `{f['git_revision']}`, {f['date']}.", ""]
        lines += [
                  "| images | first_step_s | epoch train_s | train images | whole command s |", "|---|---|---|---|---|"]
        for n, r in sorted(results["first_step"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {n} | {r['first_step_s']:.1f} | {r['epoch_train_s']:.1f} | {r['train_images']} | "
                         f"{r['command_s']:.0f} |")
        fs = {int(k): v["first_step_s"] for k, v in results["first_step"].items()}
        if len(fs) > 1:
            lines += ["", f"Largest / smallest first_step_s: {fs[max(fs)] / fs[min(fs)]:.2f}x (target <= 1.3x)."]
        lines.append("")
    for key in ("ingest", "decode_only"):
        if results.get(key):
            lines += _render_ingest(results[key], key, results.get("ingest_from"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    p.add_argument("--procs", type=int, default=2, help="CPU processes for each ingest path")
    p.add_argument("--ingest-images", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit-s", type=float, default=60.0, help="longest pass of one ingest measurement")
    p.add_argument("--paths", nargs="+", choices=list(INGEST_PATHS), default=list(INGEST_PATHS),
                   help="ingest paths to measure (the DataLoader always)")
    p.add_argument("--store-mb", type=int, default=None,
                   help="object store of the ingest measurements' Ray (default: Ray's). Smaller than the "
                        "decoded split, Ray Data's budget binds, as it does for data larger than a node")
    p.add_argument("--consumer-threads", type=int, default=WORKER_THREADS,
                   help="torch threads of the consuming process (default: a 1-CPU training worker's)")
    common.add_folder_options(p)
    p.add_argument("--decode-repeats", type=int, default=0,
                   help="also measure decode alone (no device transform: a GPU worker's CPU side), "
                        "this many rounds")
    p.add_argument("--skip-first-step", action="store_true",
                   help="measure ingest only; keep the first-step rows of --out/STREAM.json, with their command")
    # --ingest-images 0: first step only; the ingest sections of --out/STREAM.json are kept, with their command
    args = p.parse_args(argv)
    results = {"command": common.command_line("stream.py", p, args, ("sizes", "procs", "ingest_images", "repeats",
                                                                      "limit_s", "decode_repeats",
                                                                      "skip_first_step", "store_mb", "paths",
                                                                      "consumer_threads")),
               "machine": common.machine_info(), "first_step": {}, "ingest": None}
    earlier = args.out / "STREAM.json"
    old = json.loads(earlier.read_text()) if earlier.exists() else {}
    provenance = {"command": old.get("command"), "git_revision": old.get("machine", {}).get("git_revision"),
                  "date": old.get("machine", {}).get("date")}
    if args.skip_first_step and old.get("first_step"):
        results["first_step"] = old["first_step"]
        results["first_step_from"] = old.get("first_step_from") or provenance
    if not args.ingest_images and old.get("ingest", {}).get("runs"):  # first step only: keep the ingest sections
        results.update(ingest=old["ingest"], ingest_from=old.get("ingest_from") or provenance)
        if old.get("decode_only"):
            results["decode_only"] = old["decode_only"]
    if not args.skip_first_step:
        for n in args.sizes:
            folder = make_folder(args.data / f"jpeg-{n}", n)
            runs = Path(tempfile.mkdtemp(prefix="er-stream-runs-"))
            results["first_step"][str(n)] = first_step(folder, runs, f"n{n}")
            print(n, results["first_step"][str(n)], flush=True)
    if args.ingest_images:
        import ray

        folder = make_folder(args.data / f"jpeg-{args.ingest_images}", args.ingest_images)
        # as the service's embedded Ray and shipped cluster configs start workers (cluster.embedded_env):
        # at nice 0, not Ray's 15, so the decode actors run at the training worker's priority
        os.environ.setdefault("RAY_worker_niceness", "0")
        store = args.store_mb * 2**20 if args.store_mb else None
        ray.init(num_cpus=args.procs, include_dashboard=False, logging_level="WARNING", object_store_memory=store)
        # the consuming process runs the device transform with a training worker's torch threads:
        # Ray starts a worker of fewer than 2 CPUs (the service's on a 2-CPU node) with
        # OMP_NUM_THREADS=1, and torch's default here (one per core) would contend with the decoders
        import torch

        torch.set_num_threads(args.consumer_threads)
        results["consumer_threads"] = args.consumer_threads
        results["store_mb"] = round(ray.cluster_resources()["object_store_memory"] / 2**20)
        raw, spec = _listed(folder)
        results["decoded_mb"] = round(raw.train.count * spec.channels * spec.wire_size ** 2 / 2**20)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        measure = {k: fn for k, fn in ingest_paths(folder, args.procs, args.limit_s).items()
                   if k in args.paths or k == "loader"}
        results["ingest"] = ingest_rounds(measure, args.repeats, True, args.ingest_images, args.procs)
        if args.decode_repeats:
            results["decode_only"] = ingest_rounds(measure, args.decode_repeats, False, args.ingest_images, args.procs,
                                                   warmup=False)
        ray.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "STREAM.json").write_text(json.dumps(results, indent=2))
    (args.out / "STREAM.md").write_text(render(results))
    print((args.out / "STREAM.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
