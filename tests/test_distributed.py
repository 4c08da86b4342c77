"""DDP with a real local Ray and 2 CPU workers: disjoint shards that cover the split, and
parameters that stay identical across workers after optimizer steps."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import ray
import ray.cloudpickle
import ray.train
import torch
from ray.train.torch import TorchTrainer

from emergence_ray.config import DataConfig, OptimConfig
from emergence_ray.data.pipeline import prepare
from emergence_ray.engine import train_epoch
from emergence_ray.models import build_model
from emergence_ray.optim import build_optimizer

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import tests/
pytestmark = pytest.mark.usefixtures("ray_session")


def _scaling():
    return ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5})


def _collect_ids(config):
    rank = ray.train.get_context().get_world_rank()
    ids = {}
    for split in ("train", "val"):
        shard = ray.train.get_dataset_shard(split)
        ids[split] = [str(i) for b in shard.iter_batches(batch_size=100, batch_format="numpy") for i in b["id"]]
    with open(f"{config['out']}/ids_{rank}.json", "w") as f:
        json.dump(ids, f)


def test_shards_are_disjoint_and_cover_the_split(tmp_path):
    prepared = prepare(DataConfig(limit=1000, val_fraction=0.1), with_test=False)
    assert prepared.counts["train"] == 1000
    trainer = TorchTrainer(_collect_ids, train_loop_config={"out": str(tmp_path)}, scaling_config=_scaling(),
                           run_config=ray.train.RunConfig(storage_path=str(tmp_path / "runs"), name="shards"),
                           datasets={"train": prepared.train, "val": prepared.val})
    trainer.fit()
    shards = [json.loads((tmp_path / f"ids_{r}.json").read_text()) for r in (0, 1)]
    for split in ("train", "val"):
        a, b = set(shards[0][split]), set(shards[1][split])
        assert a and b and not a & b, f"{split} shards overlap"
        expected = set(prepared.train.to_pandas()["id"] if split == "train" else prepared.val.to_pandas()["id"])
        assert len(a | b) >= len(expected) - 1  # an equal split may drop one row of an odd count
        assert a | b <= expected
    assert set(shards[0]["train"]) | set(shards[1]["train"]) == set(prepared.train.to_pandas()["id"])
    assert len(shards[0]["train"]) == len(shards[1]["train"]) == 500


def _train_and_dump(config):
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(rank)  # deliberately different init per rank: DDP must broadcast rank 0's
    model = ray.train.torch.prepare_model(build_model("cnn", 1, 10, 8, width=8))
    initial = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    opt = build_optimizer(model.module, OptimConfig(name="sgd", lr=0.05, weight_decay=1e-3))
    shard = ray.train.get_dataset_shard("train")
    batches = ({"image": b["image"].float() / 255, "label": b["label"].long()}  # uint8 on the wire
               for b in shard.iter_torch_batches(batch_size=32))
    totals = train_epoch(model, batches, opt, None,
                         torch.device("cpu"))
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    np.save(f"{config['out']}/params_{rank}.npy", params.numpy())
    np.save(f"{config['out']}/initial_{rank}.npy", initial.numpy())
    with open(f"{config['out']}/steps_{rank}.txt", "w") as f:
        f.write(str(totals.count))


def test_parameters_stay_identical_across_workers(tmp_path):
    prepared = prepare(DataConfig(limit=640), with_test=False)
    trainer = TorchTrainer(_train_and_dump, train_loop_config={"out": str(tmp_path)}, scaling_config=_scaling(),
                           run_config=ray.train.RunConfig(storage_path=str(tmp_path / "runs"), name="ddp"),
                           datasets={"train": prepared.train.select_columns(["image", "label"])})
    trainer.fit()
    p0, p1 = (np.load(tmp_path / f"params_{r}.npy") for r in (0, 1))
    i0 = np.load(tmp_path / "initial_0.npy")
    assert (tmp_path / "steps_0.txt").read_text() == (tmp_path / "steps_1.txt").read_text() == "320"
    assert np.array_equal(np.load(tmp_path / "initial_1.npy"), i0)  # broadcast at wrap time
    assert not np.allclose(p0, i0)  # training moved the weights...
    np.testing.assert_array_equal(p0, p1)  # ...identically on both workers
