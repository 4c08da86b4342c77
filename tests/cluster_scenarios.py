"""Multi-node failure scenarios on `ray.cluster_utils.Cluster` (Ray's own multi-node fixture), run
as a subprocess by tests/test_failures.py because a Cluster cannot share a process with the
session's Ray. Prints one JSON line with what happened.

    python tests/cluster_scenarios.py node-failure|elastic TMPDIR
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path


def main(scenario: str, tmp: Path) -> dict:
    # Short: Ray's unix socket paths under RAY_TMPDIR must stay under ~107 characters.
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="er-", dir="/tmp")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    import ray
    from ray.cluster_utils import Cluster

    from emergence_ray.config import load_config
    from emergence_ray.trainer import train

    elastic = scenario == "elastic"
    # No augmentation: no Ray Data tasks per epoch; the head keeps one CPU spare all the same.
    # Elastic: a worker takes 2 CPUs, so the 3-CPU head holds one once the node is gone.
    head_cpus, node_cpus, cpw = (3, 2, 2) if elastic else (3, 2, 1)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus})
    node = cluster.add_node(num_cpus=node_cpus)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    workers = "[1, 2]" if elastic else "2"
    cfg = load_config(None, [f"run.storage_path={tmp / 'runs'}", f"run.name={scenario}", "train.epochs=6",
                             "data.limit=800", "data.augment.crop_padding=0", f"scaling.num_workers={workers}",
                             f"scaling.cpus_per_worker={cpw}", "scaling.placement_strategy=SPREAD",
                             "run.max_failures=3"])
    run_dir = tmp / "runs" / scenario
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["run_dir"] = train(cfg)
        except BaseException as err:  # noqa: BLE001 - reported to the test
            outcome["error"] = repr(err)

    thread = threading.Thread(target=fit)
    thread.start()
    removed_at_epoch = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and thread.is_alive():
        try:
            epochs = len((run_dir / "metrics.jsonl").read_text().splitlines())
            placed = json.loads((run_dir / "workers.json").read_text())
        except (OSError, ValueError):
            time.sleep(0.2)
            continue
        if epochs >= 2 and any(w["node_id"] == node.node_id for w in placed):
            before = placed
            removed_at_epoch = epochs
            cluster.remove_node(node)
            break
        time.sleep(0.2)
    thread.join(timeout=600)
    result = {"removed_at_epoch": removed_at_epoch, "outcome": outcome,
              "workers_before": before if removed_at_epoch else None}
    if "run_dir" in outcome:
        result["summary"] = json.loads((run_dir / "summary.json").read_text())
        result["epochs"] = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        result["workers_after"] = json.loads((run_dir / "workers.json").read_text())
        result["removed_node"] = node.node_id
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1], Path(sys.argv[2]))), flush=True)
