"""How long a streamed epoch waits for its first batch on the embedded Ray as the service starts it
(`cluster.start_embedded`: the workers' environment inherited from the raylet), against the same
Ray started with that environment as a job runtime_env (as before the twenty-seventh session).

    flock /tmp/er-bench.lock python benchmarks/epoch_start.py [--rounds 3] [--passes 6]

Each configuration runs in a fresh process of its own (a runtime_env belongs to a Ray job), the
two alternating round by round. A process runs `--passes` passes of stream.py's `ray_held` path
(the service's decode pool beside one worker holding 1 CPU, on stream.py's 16k photo-like JPEGs),
each stopped after its first seconds, and records when each pass's first batch arrived. The first
pass is left out (it imports the path's modules). Writes benchmarks/EPOCH_START.md and .json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

CONFIGS = {"inherited": "as shipped: the workers' environment variables inherited from the raylet, no job runtime_env",
           "runtime_env": "the same variables as a job runtime_env (as before the twenty-seventh session)"}


def child(config: str, folder: Path, passes: int) -> dict:
    import os

    import ray
    import ray.data

    from benchmarks import stream
    from emergence_ray import cluster

    quiet = {"RAY_DATA_LOG_LEVEL": "WARNING"}
    common_kwargs = dict(logging_level="WARNING", log_to_driver=False)
    if config == "inherited":
        cluster.start_embedded(quiet, common_kwargs)
    else:  # the former start: the same Ray, the variables as the job's runtime_env
        gcs_port = cluster.free_port()
        env = {"env_vars": {**quiet, "RAY_ADDRESS": f"{cluster.LOOPBACK}:{gcs_port}"}}
        with cluster.environ(cluster.embedded_env(gcs_port)), cluster._loopback_node():
            ray.init(address="local", num_cpus=os.cpu_count() or 1, _node_ip_address=cluster.LOOPBACK,
                     dashboard_host=cluster.LOOPBACK, _system_config={"enable_metrics_collection": False},
                     runtime_env=env, **common_kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = False
    import torch

    torch.set_num_threads(stream.WORKER_THREADS)
    firsts = [stream.ray_stream_rate(folder, 2.0, hold_cpus=1)["first_batch_s"] for _ in range(passes)]
    ray.shutdown()
    return {"first_batch_s": firsts[1:]}


def render(res: dict) -> str:
    m = res["machine"]
    title = "A streamed epoch's first batch: the embedded Ray as shipped against a job runtime_env"
    lines = [*common.results_header(title, res["command"], m),
             f"Each pass: stream.py's `ray_held` on {res['images']} photo-like JPEGs (the service's decode pool "
             "beside one worker holding 1 CPU); seconds from the pass's start to its first batch. Each "
             "configuration runs in its own process, the two alternating round by round; the first pass of "
             "each process is left out.", "",
             "| configuration | first batch s (median) | per round (medians) | every pass |", "|---|---|---|---|"]
    for k, rounds in res["runs"].items():
        every = [x for r in rounds for x in r]
        lines.append(f"| {CONFIGS[k]} | {common.median(every):.2f} | "
                     f"{', '.join(f'{common.median(r):.2f}' for r in rounds)} | "
                     f"{', '.join(f'{x:.2f}' for x in every)} |")
    a, b = (common.median([x for r in res["runs"][k] for x in r]) for k in ("inherited", "runtime_env"))
    lines += ["", f"As shipped, the first batch comes {b - a:.2f} s earlier by medians ({b / max(1e-9, a):.2f}x)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--passes", type=int, default=6, help="passes per process (the first one left out)")
    p.add_argument("--images", type=int, default=16000, help="JPEGs in stream.py's folder")
    p.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    common.add_folder_options(p)
    args = p.parse_args(argv)
    from benchmarks import stream

    folder = stream.make_folder(args.data / f"jpeg-{args.images}", args.images)
    if args.child:
        print(json.dumps(child(args.child, folder, args.passes)))
        return 0
    res = {"command": common.command_line("epoch_start.py", p, args, ("rounds", "passes", "images")),
           "machine": common.machine_info(), "images": args.images, "runs": {k: [] for k in CONFIGS}}
    for i in range(args.rounds):
        for k in list(CONFIGS)[::-1 if i % 2 else 1]:
            proc = subprocess.run([sys.executable, __file__, "--child", k, "--passes", str(args.passes),
                                   "--images", str(args.images), "--data", str(args.data)],
                                  capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            res["runs"][k].append(json.loads(proc.stdout.strip().splitlines()[-1])["first_batch_s"])
            print(k, res["runs"][k][-1], flush=True)
    common.write_results(args.out, "EPOCH_START", res, render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
