"""Renders the collected benchmark results (one dict, also saved as JSON) into RESULTS.md, and recorded
benchmarks/gpu.py runs into RESULTS-gpu.md:

    python benchmarks/results.py gpu --run eager=eager.json --run torch.compile=compile.json
        --command "python benchmarks/gpu.py --out eager.json" ... --machine "one H200, ..." --notes notes.md
    python benchmarks/results.py gpu --from benchmarks/RESULTS-gpu.json     # regenerate the markdown
    python benchmarks/results.py gpu-service --from gpu-service.json        # RESULTS-gpu-service.md

The first form writes RESULTS-gpu.json (every input: the runs' JSON, commands, machine, notes) and then
the markdown from it; the second re-renders the markdown from that JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
from pathlib import Path


def _f(x, digits: int = 0, unit: str = "", none: str = "-") -> str:
    if x is None:
        return none
    if isinstance(x, float) and x != x:
        return "n/a"
    return f"{x:,.{digits}f}{unit}"


def _rates(r: dict) -> str:
    runs = f"; runs {' / '.join(_f(x) for x in r['runs'])}" if r.get("runs") else ""
    return f"**{_f(r['images_per_s'])}** ({', '.join(_f(x) for x in r['rates'])}{runs})"


def header(res: dict) -> list[str]:
    m = res["machine"]
    return [
        "# emergence-ray benchmarks", "",
        f"Generated {m['date']} by `{res['command']}` (git {m['git_revision']}). Re-running that command "
        "from the repository root regenerates this file.", "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, GPU: {m['cuda']}; {m['os']}; "
        f"Python {m['python']}, torch {m['torch']}, ray {m['ray']}. Load average at start: "
        f"{', '.join(str(x) for x in m['load_average'])} (other work on the machine makes every figure noisy; "
        "compare within one file).", "",
    ]


def throughput(res: dict) -> list[str]:
    rows = res.get("throughput") or []
    if not rows:
        return []
    out = [
        "## Training throughput: torch vs torchrun vs emergence-ray", "",
        "Same model (`build_model`, job defaults), same data, same batch per worker, AdamW "
        "(`build_optimizer`), the same `engine.train_epoch`, the same steps. Images/s across all "
        "workers; the warm-up steps are excluded and the remaining steps are cut into R timed "
        "segments of S steps: **median**, then each segment. (b) runs twice, before Ray starts and "
        "after it stops, so that (c) runs between its two runs on a machine whose speed drifts: its figure "
        "is the median of the segments of both runs, followed by each run's own median. (a) and (b) train "
        "on in-memory tensors; (c) on Ray Datasets preprocessed and materialized by `pipeline.preprocess` "
        "(Fashion-MNIST through the `idx` source and `pipeline.prepare`), read by the service's "
        "`ingest.WorkerIngest` inside Ray Train workers (0.5 CPU each, as "
        "`cluster.plan` sizes a 2-worker job on 2 CPUs): the shard is copied into worker memory at start-up "
        "from the materialized dataset's blocks (`shards.BlockShards`; `data.ingest=auto` picks the cache for "
        "shards that fit; the read is the *shard* stage of the start-up table) and every epoch shuffles it, "
        "or streamed from `get_dataset_shard(\"train\")` through `iter_torch_batches` "
        "(`data.ingest=stream`), as the (c) column says. Augmentation is off in all three. (a) runs 2 OpenMP "
        "threads in one process, which suffers most when other work shares the cores. "
        "Synthetic data is random RGB 32x32 (no real CIFAR here).", "",
        "| model | data | batch per worker | steps: warm-up + R x S | (a) torch, 1 process, 2 threads | "
        "(b) torchrun, 2 x 1 thread, gloo | (c) emergence-ray, 2 workers x 1 thread | c/b | c/a |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w = r["workload"]
        modes = " | ".join(_rates(r[m]) if r.get(m) else "-" for m in ("a", "b"))
        modes += f" | {_rates(r['c'])} ({r['c'].get('ingest', 'stream')})" if r.get("c") else " | -"
        steps = f"{w['warmup']} + {w['repeats']} x {w['steps']}"
        out.append(f"| {w['model']} | {w['data']} | {w['batch_size']} | {steps} | {modes} |"
                   f" {_f(r.get('ratio_c_b'), 2)} | {_f(r.get('ratio_c_a'), 2)} |")
    streamed = [r for r in rows if r.get("c_stream")]
    if streamed:
        out += ["", "Where (c) loses its time, measured in the same run. *stream*: the same workers reading their "
                "shard through `iter_torch_batches` every epoch (`data.ingest=stream`, what every epoch did before "
                "`data.ingest=auto` picked the cache): Ray Data's iterator threads run inside the training process "
                "and take CPU the 1-thread training step needs. *memory*: Ray Train with no Ray Data at all, each "
                "worker building its tensors as (b) does: the most any data path can reach under Ray Train; what "
                "separates it from (b) is the Ray runtime itself (raylet, GCS, dashboard, the Train controller and "
                "its helper actors, each waking up a few times a second on the same 2 cores).", "",
                "| model | data | (b) torchrun | (c) cache | (c) stream | Ray Train, memory | cache/b | stream/b | "
                "memory/b | cache/memory |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in streamed:
            w, b = r["workload"], r["b"]["images_per_s"]
            mem = r.get("c_memory")
            cells = [_rates(r["c"]), _rates(r["c_stream"]), _rates(mem) if mem else "-"]
            ratios = [f"{r['c']['images_per_s'] / b:.2f}", f"{r['c_stream']['images_per_s'] / b:.2f}",
                      f"{mem['images_per_s'] / b:.2f}" if mem else "-",
                      f"{r['c']['images_per_s'] / mem['images_per_s']:.2f}" if mem else "-"]
            out.append(f"| {w['model']} | {w['data']} | {_f(b)} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    out += niceness(rows)
    out += background(rows[0], res["machine"]["nproc"])
    out += ["", "Commands (the workload JSON is the row's fields; `run.py` launches them):", ""]
    first = rows[0]
    for mode in ("a", "b"):
        if first.get(mode):
            out.append(f"- ({mode}) `{first[mode]['command']}`")
    out += ["- (c) in the `run.py` process: `ray.init(num_cpus=2)`, then `benchmarks/ray_loop.py:run_ray` "
            "(TorchTrainer + `bench_loop_per_worker`).", ""]
    out += startup(res)
    return out


OUTSIDE = ("data_prepare_s", "teardown_s")  # (c): before fit() and after the last step


def niceness(rows: list[dict]) -> list[str]:
    """(c) as the service runs it (workers at nice 0, `scaling.worker_niceness`) next to (c) with the
    workers left at the nice 15 Ray starts them at."""
    compared = [r for r in rows if r.get("c_ray_nice")]
    if not compared:
        return []
    out = ["", "CPU priority, measured in the same run. Ray starts every worker process at nice 15, below its "
           "own daemons (GCS, raylet, dashboard, log monitor: nice 0); the torchrun processes of (b) run at "
           "nice 0. The service's training workers move themselves to nice 0 (`scaling.worker_niceness`, "
           "default 0; `emergence_ray/priority.py`); *Ray's nice 15* is (c) with that turned off "
           "(`scaling.worker_niceness: null`). At nice 15 a worker yields its core to any nice-0 process "
           "that wants it.", "",
           "| model | data | (b) torchrun, nice 0 | (c) workers at nice 0 | (c) at Ray's nice 15 | c/b | "
           "c at nice 15 / b |", "|---|---|---|---|---|---|---|"]
    for r in compared:
        w, b, low = r["workload"], r["b"]["images_per_s"], r["c_ray_nice"]
        out.append(f"| {w['model']} | {w['data']} | {_f(b)} | {_rates(r['c'])} (nice {r['c'].get('nice', '?')}) | "
                   f"{_rates(low)} (nice {low.get('nice', '?')}) | {r['c']['images_per_s'] / b:.2f} | "
                   f"{low['images_per_s'] / b:.2f} |")
    return out


def _label(key: str) -> str:
    return key.removesuffix("_s").replace("_", " ")


def startup(res: dict) -> list[str]:
    rows = res["throughput"]
    out = ["### One-off start-up cost", ""]
    if res.get("ray_start_s") is not None:
        out += [f"Ray start (`ray.init(num_cpus=2)`, once per run): **{_f(res['ray_start_s'], 1)} s**.", ""]
    out += ["| model | data | mode | to first step | where the time goes (s) |", "|---|---|---|---|---|"]
    for r in rows:
        w = r["workload"]
        for mode, key, label in (("a", "launch_to_first_step_s", "launch"), ("b", "launch_to_first_step_s", "launch"),
                                 ("c", "fit_to_first_step_s", "fit()")):
            m = r.get(mode)
            if not m:
                continue
            timed = {k: v for k, v in m["startup"].items() if k != key and k not in OUTSIDE}
            parts = ", ".join(f"{_label(k)} {v:.1f}" for k, v in timed.items())
            outside = ", ".join(f"{_label(k)} {m['startup'][k]:.1f}" for k in OUTSIDE if k in m["startup"])
            out.append(f"| {w['model']} | {w['data']} | ({mode}) | {label} -> first step: "
                       f"**{m['startup'][key]:.1f} s** | {parts}{f' (not included: {outside})' if outside else ''} |")
    return out + [""]


def ingest(res: dict) -> list[str]:
    ing = res.get("ingest")
    if not ing:
        return []
    out = [
        "## Ingest: Ray Data vs torch DataLoader", "",
        f"{ing['images']:,} synthetic RGB 32x32 PNGs, as an ImageFolder and as Parquet (PNG bytes); decode + "
        "normalize (`Preprocess`), augment (`BatchAugment`: 2 px random crop, flip, in torch), batches of "
        f"{ing['batch_size']} as torch tensors; {ing['workers']} CPUs for Ray Data, "
        f"`num_workers={ing['workers']}` for the DataLoader. Whole passes after one warm-up pass, median of "
        f"{ing['repeats']} (each pass in brackets). *Ray Data, cold*: source -> Preprocess -> "
        "`iter_torch_batches` -> augment, decoding every pass (for reference; the service decodes once). "
        "*Service, stream epoch* (`data.ingest=stream`): the materialized, preprocessed base (materializing "
        "it once took the time shown) through `WorkerIngest`'s `iter_torch_batches`, then augment. *Service, "
        "cache epoch* (`data.ingest=cache`, the default for shards that fit in memory): a shuffled pass over "
        "the shard held in memory, then augment (reading the base into memory once took the time shown). "
        "*DataLoader*: the same Preprocess and augment in its `collate_fn`.", "",
        "| format | pipeline | images/s | first batch (s) |", "|---|---|---|---|",
    ]
    names = {"ray_cold": "Ray Data, cold (decode every pass)", "service_stream": "Service, stream epoch",
             "service_cache": "Service, cache epoch", "dataloader": "torch DataLoader"}
    for fmt, d in ing["formats"].items():
        for key, name in names.items():
            r = d[key]
            extra = (f" (materialize once: {r['materialize_s']:.1f} s)" if "materialize_s" in r else
                     f" (read into memory once: {r['load_s']:.1f} s)" if "load_s" in r else "")
            out.append(f"| {fmt} | {name}{extra} | **{_f(r['images_per_s'])}** "
                       f"({', '.join(_f(x) for x in r['runs'])}) | {r['first_batch_s']:.2f} |")
    return out + [""] + fashion_ingest(res)


def consumption(res: dict) -> list[tuple[str, float]]:
    """The rates at which training consumed Fashion-MNIST images in this run."""
    rates = []
    for r in res.get("throughput") or []:
        w = r["workload"]
        if w["model"] == "cnn" and w["data"] == "fashion_mnist" and r.get("c"):
            rates.append((f"(c) above, cnn, batch {w['batch_size']} per worker", r["c"]["images_per_s"]))
    for run in res.get("time_to_accuracy") or []:
        if run.get("train_images_per_s"):
            rates.append(("`jobs/fashion_mnist.yaml` (cnn width 16, batch 128 per worker), its own training "
                          "clock, in the time-to-accuracy run below", run["train_images_per_s"]))
    return rates


def fashion_ingest(res: dict) -> list[str]:
    fi = res.get("fashion_ingest")
    if not fi:
        return []
    out = ["### Ingest against training on Fashion-MNIST", "",
           f"The service's epochs over Fashion-MNIST's {fi['images']:,}-image train split (`idx` source, "
           f"`pipeline.prepare` once: {fi['prepare_s']:.1f} s), batches of {fi['batch_size']}, 2 px crop + flip, in "
           "the driver process with Ray Data holding the cluster's CPUs, next to the rate at which 2 CPU "
           "workers train the cnn on the same images. Target: ingest >= 2x consumption.", "",
           "| service epoch | images/s |", "|---|---|",
           f"| stream (`data.ingest=stream`) | **{_f(fi['stream']['images_per_s'])}** "
           f"({', '.join(_f(x) for x in fi['stream']['runs'])}) |",
           f"| cache (`data.ingest=cache`; read into memory once: {fi['cache']['load_s']:.1f} s) | "
           f"**{_f(fi['cache']['images_per_s'])}** ({', '.join(_f(x) for x in fi['cache']['runs'])}) |", ""]
    rates = consumption(res)
    if not rates:
        return out + ["No Fashion-MNIST training rate in this run to compare with.", ""]
    out += ["| training consumes | images/s | stream / training | cache / training |", "|---|---|---|---|"]
    for name, rate in rates:
        out.append(f"| {name} | {_f(rate)} | {fi['stream']['images_per_s'] / rate:.1f}x | "
                   f"{fi['cache']['images_per_s'] / rate:.1f}x |")
    return out + [""]


def time_to_accuracy(res: dict) -> list[str]:
    runs = res.get("time_to_accuracy") or []
    if not runs:
        return []
    out = [
        "## Time to accuracy: Fashion-MNIST, 2 CPU workers", "",
        "The job `jobs/fashion_mnist.yaml` as committed (2 workers, gloo). *This run*: every epoch's "
        "checkpoint scored on the official 10,000 test images; time "
        "from launching `emergence-ray train` (embedded Ray start included) to the checkpoint. *Recorded "
        "run*: validation accuracy per epoch on the training loop's clock (its metrics.jsonl), and the test "
        "accuracy of its best checkpoint.", "",
        "| source | accuracy | clock | to 90% | to 92% | best within 10 min | final test accuracy | wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        reach = [_f(r[f"time_to_{x}_s"], 0, " s", "not reached") for x in (90, 92)]
        out.append(f"| {r['source']} | {r['accuracy']} | {r['clock']} | {reach[0]} | {reach[1]} |"
                   f" {_f(r['best_within_budget'], 4)} | "
                   f"{r['final_test_accuracy']:.4f} | {r['wall_s']:.0f} s |")
    for r in runs:
        if "command" in r:
            out += ["", f"Command: `{r['command']}`. The service's test report on its chosen checkpoint: "
                    f"{r['final_test_accuracy']:.4f}; the same checkpoint scored here: "
                    f"{_f(r.get('rescored_final'), 4)}.", "",
                    "| epoch | wall (s) | train clock (s) | val acc | test acc |", "|---|---|---|---|---|"]
            out += [f"| {e['epoch']} | {e['seconds']:.0f} | {e['elapsed_s']:.0f} | {e['val_accuracy']:.4f} | "
                    f"{e['accuracy']:.4f} |" for e in r["epochs"]]
    if res.get("time_to_accuracy_note"):
        out += ["", res["time_to_accuracy_note"]]
    return out + [""]


def background(row: dict, cores: int, top: int = 12) -> list[str]:
    """Who used the CPUs while (c)'s timed steps ran, for the first row (cnn, synthetic)."""
    bg = (row.get("c") or {}).get("background") or {}
    procs = bg.get("processes") or []
    if not procs:
        return []
    w = row["c"]["workload"]
    train = sum(g["cpu_pct"] for g in procs if g["process"] == "ray::RayTrainWorker")
    others = sum(g["cpu_pct"] for g in procs) - train
    out = ["", f"CPU per process while (c)'s timed steps ran ({w['model']}, {w['data']}, {row['c'].get('ingest')}; "
           f"`/proc` snapshots at the start and end of rank 0's timed steps, {bg['seconds']:.0f} s; % of one core, "
           f"of the {100 * cores}% {cores} cores have): the training workers {train:.0f}%, everything else "
           f"{others:.0f}%." + (" On 2 cores every point of the rest is taken from the training threads."
                                if cores <= 2 else ""), "",
           "| process | count | % of one core |", "|---|---|---|"]
    out += [f"| `{g['process']}` | {g['count']} | {g['cpu_pct']:.1f} |" for g in procs[:top]]
    if len(procs) > top:
        out.append(f"| {len(procs) - top} others | | {sum(g['cpu_pct'] for g in procs[top:]):.1f} |")
    return out + thread_sched(row)


def thread_sched(row: dict) -> list[str]:
    """Rank 0's training thread over its timed steps, in (b) and (c), as the scheduler saw it."""
    runs = [(label, (row.get(mode) or {}).get("sched")) for label, mode in (("(b) torchrun", "b"),
                                                                             ("(c) emergence-ray", "c"))]
    if not all(s for _, s in runs):
        return []
    out = ["", "Rank 0's training thread over its timed steps (`/proc/thread-self/schedstat`; (b): its first "
           "run). Every wake-up of another process on a busy core takes the CPU from a training thread; "
           "`benchmarks/floor.py` (FLOOR.md) counts them per process:", "",
           "| run | on a CPU % | runnable, waiting for a CPU % | sleeping (all-reduce, GIL) % | "
           "involuntary switches /s |", "|---|---|---|---|---|"]
    out += [f"| {label} | {s['on_cpu_pct']:.0f} | {s['runnable_waiting_pct']:.0f} | {s['sleeping_pct']:.0f} | "
            f"{s['involuntary_per_s']:.0f} |" for label, s in runs]
    return out


FIRST_STEP_TARGET_S = 10.0  # issue 22: launch to the first step on a running cluster, 2 cores


def first_step(res: dict) -> list[str]:
    fs = res.get("first_step")
    if not fs:
        return []
    cores = res["machine"]["nproc"]
    verdict = "within" if fs["to_first_step_s"] <= FIRST_STEP_TARGET_S else "over"
    out = [
        "## `emergence-ray train` to the first training step, on a running local cluster", "",
        f"`{fs['command']}` against the 2-CPU Ray started by `run.py` (built-in digits job, 2 workers). "
        f"Launch to rank 0's first step: **{fs['to_first_step_s']:.1f} s** "
        f"({verdict} the {FIRST_STEP_TARGET_S:.0f} s target); the "
        f"whole command (1 epoch, test report) took {fs['command_s']:.1f} s. Stages, from the files the run "
        "writes on its way (meta.json, workers.json, progress.json):", "",
        "| stage | s |", "|---|---|",
    ]
    out += [f"| {k} | {v:.1f} |" for k, v in fs["stages_s"].items()]
    out += ["", "The TorchTrainer stage is split for the throughput runs above: see (c) in the start-up table "
            "(worker process started, worker imports, to loop, model).", "",
            "The first stage, split by `python benchmarks/first_step.py --probe ADDRESS` (the real "
            "`trainer.train` in a new process with a timer around each driver step, stopped where `fit` "
            "starts; run after the CLI, so Ray's worker pool is warm):", "",
            "| stage | s |", "|---|---|"]
    out += [f"| {k} | {v:.1f} |" for k, v in fs["probe_s"].items()]
    procs = fs.get("processes") or []
    if procs:
        total = sum(g["cpu_s"] for g in procs)
        out += ["", f"CPU used from the launch to the first step, per process (`/proc`, a snapshot before the "
                f"launch and one at the first step): {total:.1f} CPU-s of the {cores * fs['to_first_step_s']:.1f} "
                f"the {cores} cores had. Every Ray actor is a new Python process that pays its imports.", "",
                "| process | count | started at (s after launch) | CPU s |", "|---|---|---|---|"]
        out += [f"| `{g['process']}` | {g['count']} | "
                f"{'before' if g['first_start_s'] is None else format(g['first_start_s'], '.1f')} | {g['cpu_s']:.1f} |"
                for g in procs]
    return out + [""]


GPU_INTRO = ("`benchmarks/gpu.py` trains the service's models with its optimizer and `engine.train_epoch` "
             "(bf16 autocast, channels_last, data resident on the GPU, NCCL under torchrun). *Throughput*: "
             "images/s across all processes, warm-up steps excluded, **median** of the timed repeats, then each "
             "repeat. *Time to accuracy*: cnn on Fashion-MNIST (one-cycle AdamW, crop + flip on the GPU), the "
             "test set scored after every epoch; the clock starts at the first training step, so model "
             "build and compilation are inside it, and so are the evaluations; *train-only* sums the training "
             "epochs alone.")


def _yes(flag) -> str:
    return "yes" if flag else "no"


def gpu_throughput(runs: list[dict]) -> list[str]:
    """One row per (model, data, run), runs side by side under each workload; runs: [{label, result}]."""
    first = {(t["model"], t["data"]): t["images_per_s"] for t in runs[0]["result"].get("throughput") or []}
    ratio = len(runs) > 1
    cols = ["model", "data", "run", "batch per process", "world", "backend", "compile", "steps: warm-up + R x S",
            "images/s: median (each repeat)"] + ([f"vs {runs[0]['label']}"] if ratio else []) + ["setup s", "warm-up s"]
    out = ["### Throughput", "", f"| {' | '.join(cols)} |", "|" + "---|" * len(cols)]
    rows = [(t, run) for run in runs for t in run["result"].get("throughput") or []]
    order = list(dict.fromkeys((t["model"], t["data"]) for t, _ in rows))
    for t, run in sorted(rows, key=lambda tr: order.index((tr[0]["model"], tr[0]["data"]))):
        r = run["result"]
        base = first.get((t["model"], t["data"]))
        vs = f" {t['images_per_s'] / base:.2f} |" if base else " - |"
        out.append(f"| {t['model']} | {t['data']} | {run['label']} | {t['batch_size']} | {t['world']} | "
                   f"{r.get('backend') or 'none'} | {_yes(r.get('compile'))} | "
                   f"{r['warmup']} + {r['repeats']} x {r['steps']} | {_rates(t)} |{vs if ratio else ''}"
                   f" {_f(t['setup_s'], 1)} | {_f(t['warmup_s'], 1)} |")
    skipped = [f"{run['label']}: {s}" for run in runs for s in run["result"].get("skipped") or []]
    return out + ([""] + [f"Skipped: {s}." for s in skipped] if skipped else []) + [""]


def gpu_time_to_accuracy(runs: list[dict]) -> list[str]:
    out = ["### Time to accuracy", "",
           "| run | model | train / test images | global batch | peak lr | epochs planned | target | epoch reached | "
           "time to target s (from first step) | train-only time to target s | best test accuracy |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    curves, absent = [], []
    for run in runs:
        t = run["result"].get("time_to_accuracy")
        if not t:
            absent.append(run["label"])
            continue
        out.append(f"| {run['label']} | {t['model']} | {t['train_images']:,} / {t['test_images']:,} | "
                   f"{t['global_batch']} | {t['lr']:g} | {t['epochs_planned']} | {t['target']:.0%} | "
                   f"{_f(t['epoch_reached'], none='not reached')} | {_f(t['time_to_target_s'], 1)} | "
                   f"{_f(t['train_time_to_target_s'], 1)} | {t['best_test_accuracy']:.4f} |")
        accs = " ".join(f"{e['test_accuracy']:.4f}" for e in t["epochs"])
        curves.append(f"- {run['label']} (epochs 1-{len(t['epochs'])}): {accs}")
    if len(absent) == len(runs):
        return []
    out += ["", "Test accuracy after each epoch:", ""] + curves
    if absent:
        out += ["", f"No time-to-accuracy run in: {', '.join(absent)}."]
    return out + [""]


def gpu_tables(runs: list[dict]) -> list[str]:
    """The tables for one or more gpu.py results, each given as {"label": ..., "result": gpu.py's dict}."""
    return gpu_throughput(runs) + gpu_time_to_accuracy(runs)


def gpu(res: dict) -> list[str]:
    g = res.get("gpu")
    out = ["## GPU (one H200-class GPU)", "", GPU_INTRO, "",
           "`python benchmarks/gpu.py --device cuda`, run by this command when a CUDA device is present. The "
           "test suite runs it with `--device cpu` so it keeps working. A recorded run on an H200: "
           "RESULTS-gpu.md.", ""]
    if not g:
        return out + ["Not run by this command: no CUDA device here.", ""]
    return out + gpu_tables([{"label": "this run", "result": g}])


def failures(res: dict) -> list[str]:
    failed = res.get("failed") or {}
    if not failed:
        return []
    out = ["## Sections that failed in this run", ""]
    return out + [f"- `{k}`: {v.splitlines()[0] if v else ''}" for k, v in failed.items()] + [""]


def render(res: dict) -> str:
    lines = (header(res) + throughput(res) + ingest(res) + time_to_accuracy(res) + first_step(res) + gpu(res)
             + failures(res))
    return "\n".join(lines).rstrip() + "\n"


def gpu_page(rec: dict) -> str:
    """RESULTS-gpu.md from a record written by `main`: its inputs, the tables, the notes."""
    device = rec["runs"][0]["result"].get("device_name", "GPU")
    out = [f"# GPU benchmark: {device}", "",
           f"Run {rec['date']} at git {rec['git_revision']}. Generated from RESULTS-gpu.json by "
           "`python benchmarks/results.py gpu --from benchmarks/RESULTS-gpu.json`, which regenerates this file.", "",
           f"Machine: {rec['machine']}", ""]
    if rec.get("machine_file"):
        out += ["Recorded on the machine:", "", "```text",
                rec["machine_file"].rstrip(), "```", ""]
    out += ["Commands" + (f" ({rec['setup']})" if rec.get("setup") else "") + ":", ""]
    out += [f"- `{c}`" for c in rec["commands"]]
    out += ["", GPU_INTRO, ""]
    if rec.get("notes"):
        out += ["## Reading", "", rec["notes"].strip(), ""]
    out += ["## Results", ""] + gpu_tables(rec["runs"])
    return "\n".join(out).rstrip() + "\n"


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gpu_record(args: argparse.Namespace) -> dict:
    runs = []
    for item in args.run:
        label, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--run {item}: expected LABEL=PATH")
        runs.append({"label": label, "result": json.loads(Path(path).read_text())})
    return {"date": args.date or datetime.date.today().isoformat(),
            "git_revision": args.git_revision or _git_revision(), "machine": args.machine,
            "machine_file": Path(args.machine_file).read_text() if args.machine_file else None,
            "setup": args.setup, "commands": args.command,
            "notes": Path(args.notes).read_text() if args.notes else None, "runs": runs}


# ------------------------------------------------------------- benchmarks/gpu_service.py -> RESULTS-gpu-service.md


def _down(x: float) -> str:
    """A ratio to two places, rounded down: 0.966 shows as 0.96, never as a 0.97 target met."""
    import math

    return f"{math.floor(x * 100) / 100:.2f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def gpu_service_page(res: dict) -> str:
    """RESULTS-gpu-service.md from gpu_service.py's JSON: the command, revision, machine, every figure."""
    m = res["machine"]
    dev = res.get("device_name", res["device"])
    out = [f"# The service on one GPU: {dev}" if res["device"] == "cuda" else
           "# The service on one GPU: a CPU smoke run (no GPU figures here)", "",
           f"Run {m['date']} at git {m['git_revision']}, {res['total_s']:.0f} s in all. Generated from the JSON "
           "by `python benchmarks/results.py gpu-service --from FILE.json`.", "",
           f"Machine: {dev}" + (f" ({res['memory_mib']:,} MiB, CUDA {res['cuda']}, cuDNN {res['cudnn']})"
                                if res["device"] == "cuda" else "") +
           f"; {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB; Python {m['python']}, torch {m['torch']}, "
           f"Ray {m['ray']}; load average at start {m['load_average']}.", "",
           "Command:", "", f"- `{res['command']}`", "",
           f"Every service figure is the service's own per-epoch `images_per_s` (metrics.jsonl), median over "
           f"epochs {res['warmup_epochs'] + 1}-{res['epochs']} (the first {res['warmup_epochs']} left out as "
           "warm-up); every bare figure is the same median of a torch loop in the benchmark's process on the "
           "same device. torch.compile: " + ("on" if res["compile"] else "off") + ".", ""]
    if res["throughput"]:
        out += ["## Throughput: the service (cached synthetic data) against a bare torch loop", "",
                "| model | px | batch | train images | service img/s (epochs) | bare img/s (epochs) | "
                "service / bare | bare, cudnn.benchmark | service / that | service incl. epoch ends |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for t in res["throughput"]:
            s, b = t["service"], t["bare"]
            bench = b[1] if len(b) > 1 else None
            out.append(
                f"| {t['model']} | {t['px']} | {t['batch_size']} | {t['train_images']:,} | "
                f"**{_f(s['images_per_s'])}** ({', '.join(_f(x) for x in s['epoch_rates'])}) | "
                f"**{_f(b[0]['images_per_s'])}** ({', '.join(_f(x) for x in b[0]['epoch_rates'])}) | "
                f"{_down(t['service_over_bare'])} | {_f(bench['images_per_s']) if bench else '-'} | "
                f"{_down(t['service_over_bare_cudnn_benchmark']) if bench else '-'} | "
                f"{_f(s['images_per_s_with_epoch_ends'])} |")
        out.append("")
        out += [f"- {t['model']} at {t['px']} px: `service / bare = {_down(t['service_over_bare'])}` "
                f"({t['service_over_bare']:.3f})"
                for t in res["throughput"]]
        out += ["", "*service incl. epoch ends*: timed epochs' images over the time from the end of the last "
                "warm-up epoch to the end of the last (validation, checkpoint and `ray.train.report` included).", ""]
    st = res.get("stream")
    if st:
        s, g = st["service"], st["stages"]
        util = s.get("gpu_utilization") or {}
        out += ["## Streamed photo-like JPEGs (`data.ingest=stream`)", "",
                f"{st['model']} at {st['px']} px, batch {st['batch_size']}, an ImageFolder of {st['jpegs']:,} "
                f"{st['jpeg_px']} px JPEG crops of scikit-learn's sample photos"
                + (f"; passed because the config has them: {', '.join(st['keys_passed_because_they_exist'])}"
                   if st["keys_passed_because_they_exist"] else "") + ".", "",
                "How the streamed path reads the JPEGs (decoded every epoch, or once before training) is the "
                "code's at the revision above (`emergence_ray/ingest.py`, `emergence_ray/data/`).", "",
                "| | img/s (epochs) |", "|---|---|",
                f"| streamed JPEGs | **{_f(s['images_per_s'])}** ({', '.join(_f(x) for x in s['epoch_rates'])}) |",
                f"| synthetic, cached (above) | {_f(st['synthetic_cached_images_per_s'])} |", "",
                f"- GPU busy (streamed / cached img/s): **{_pct(st['gpu_busy_fraction'])}**"
                + (f"; nvidia-smi utilization over the fit: median {_f(util.get('median_nonzero_pct'))}% of "
                   f"{util.get('samples')} samples (non-zero ones), "
                   f"{_pct(util.get('share_of_nonzero_at_least_90_pct'))}"
                   " of them >= 90%" if util else ""),
                f"- CPU stages, per core, {g['images']} JPEGs (mean {_f(g['jpeg_bytes_mean'])} bytes): "
                + ", ".join(f"{k} {_f(v)}/s" for k, v in g["per_core_images_per_s"].items())
                + f"; the chain {_f(g['cpu_chain_per_core'])}/s per core, {_f(g['cpu_chain_all_cores'])}/s on "
                f"{g['cores']} cores; slowest stage: {g['slowest_cpu_stage']}"]
        if "h2d_images_per_s" in g:
            h = g["h2d_images_per_s"]
            out.append(f"- host to device, pinned: float32 {_f(h['float32_pinned'])}/s, "
                       f"uint8 {_f(h['uint8_pinned'])}/s")
            out.append(f"- GPU decode + resize (`torchvision.io.decode_jpeg(device=\"cuda\")`): "
                       f"{_f(g.get('gpu_decode_resize_images_per_s'))}/s" +
                       (f" ({g['gpu_decode_error']})" if g.get("gpu_decode_error") else ""))
        out.append("")
    ta = res.get("tta")
    if ta:
        s, b = ta["service"], ta["bare_gpu_py"]
        r = ta["recipe"]
        out += [f"## Time to {ta['target']:.0%} Fashion-MNIST test accuracy from the command line", "",
                f"Job `{ta['job']}`: {r['model']} width {r['width']}, {r['optimizer']} lr {r['lr']:g} "
                f"{r['schedule']}, wd {r['weight_decay']:g}, batch {r['batch_size']}, {r['epochs']} epochs, "
                f"label smoothing {r['label_smoothing']:g}, crop {r['crop_padding']} + flip {r['flip']}"
                + (f"; differs from gpu.py's recipe in {ta['recipe_differs_from_gpu_py']}"
                   if ta["recipe_differs_from_gpu_py"] else "; gpu.py runs the same recipe") + ".", "",
                "| | command | reached | wall s | training-only s | test accuracy |", "|---|---|---|---|---|---|",
                f"| the service | `{s['command']}` | {'yes' if s['reached'] else 'no'} | launch to exit "
                f"{_f(s['launch_to_exit_s'], 1)} ({'Ray start included' if s['embedded_ray'] else 'on a running Ray'})"
                f" | {_f(s['training_only_s'], 1)} (all {s['epochs']} epochs) | "
                f"{s['test_accuracy']:.4f} (end of run) |",
                f"| bare loop, gpu.py | `{b['command']}` | "
                f"{'epoch ' + str(b['epoch_reached']) if b['epoch_reached'] else 'no'} | "
                f"{_f(b['time_to_target_s'], 1, none='not reached')} from the first step | "
                f"{_f(b['train_time_to_target_s'], 1, none='-')} (to the target) | "
                f"best {b['best_test_accuracy']:.4f} |",
                "",
                "The service scores the test set once, at the end (its per-epoch figure is validation accuracy); "
                f"validation first reached the target at epoch {s['first_epoch_val_at_target'] or '-'}, "
                f"{_f(s['elapsed_at_first_val_target_s'], 1)} s into the training loop, after "
                f"{_f(s['train_s_to_first_val_target'], 1)} s of training. gpu.py trains on {b['train_images']:,} "
                f"images (the service holds {r['val_fraction']:.0%} of them out for validation).", "",
                "- service validation accuracy per epoch: " + " ".join(f"{x:.4f}" for x in s["val_accuracy"]),
                "- gpu.py test accuracy per epoch: " + " ".join(f"{x:.4f}" for x in b["test_accuracy"]), ""]
    if res["skipped"]:
        out += ["Skipped: " + "; ".join(res["skipped"]), ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write RESULTS-gpu.md (+ .json) from benchmarks/gpu.py's JSON.")
    p.add_argument("what", choices=["gpu", "gpu-service"],
                   help="gpu-service: RESULTS-gpu-service.md from benchmarks/gpu_service.py's JSON (--from)")
    p.add_argument("--from", dest="source", type=Path, help="re-render from a RESULTS-gpu.json; no other input")
    p.add_argument("--run", action="append", default=[], metavar="LABEL=PATH", help="a gpu.py JSON (repeat)")
    p.add_argument("--command", action="append", default=[], help="the command behind a run (repeat, in order)")
    p.add_argument("--setup", help="where the commands ran (working folder, environment)")
    p.add_argument("--machine", default="unknown", help="one line: GPU, CPUs, software versions")
    p.add_argument("--machine-file", help="a text file recorded on the machine, quoted as is")
    p.add_argument("--notes", help="a markdown file: the reading of the results")
    p.add_argument("--date", help="day of the run (default: today)")
    p.add_argument("--git-revision", help="code the runs used (default: git rev-parse --short HEAD)")
    p.add_argument("--out", type=Path, help="markdown to write (default: benchmarks/RESULTS-gpu.md, or beside --from)")
    args = p.parse_args(argv)
    if args.what == "gpu-service":
        if not args.source:
            p.error("gpu-service: give --from the JSON gpu_service.py wrote (--out)")
        out = args.out or Path(__file__).parent / "RESULTS-gpu-service.md"
        out.write_text(gpu_service_page(json.loads(args.source.read_text())))
        print(f"wrote {out}")
        return
    if bool(args.source) == bool(args.run):
        p.error("give either --run LABEL=PATH (one or more) or --from RESULTS-gpu.json")
    if args.source:
        rec = json.loads(args.source.read_text())
        out = args.out or args.source.with_suffix(".md")
    else:
        rec = gpu_record(args)
        out = args.out or Path(__file__).parent / "RESULTS-gpu.md"
        out.with_suffix(".json").write_text(json.dumps(rec, indent=1) + "\n")
    out.write_text(gpu_page(rec))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
