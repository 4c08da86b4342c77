"""Worker-side ingest: torch augmentation on batches, and shards cached in worker memory or
streamed (`emergence_ray.data.ingest`), checked against each other on a real local Ray."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import ray
import ray.cloudpickle
import ray.data
import ray.train
import torch
from ray.train.torch import TorchTrainer

from emergence_ray.data.augment import BatchAugment
from emergence_ray.config import AugmentConfig, DataConfig, load_config
from emergence_ray.data.transforms import DataSpec
from emergence_ray.errors import ConfigError, DataError
from emergence_ray.data.handoff import trainer_inputs, use_cache
from emergence_ray.data.ingest import WorkerIngest
from emergence_ray.data.shards import BlockShards

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import tests/


def _candidates(img: np.ndarray, p: int, fill: float) -> list[np.ndarray]:
    """Every crop torchvision's RandomCrop(padding=p, fill) + flip could make of one image."""
    c, h, w = img.shape
    padded = np.full((c, h + 2 * p, w + 2 * p), fill, np.float32)
    padded[:, p:p + h, p:p + w] = img
    crops = [padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
    return crops + [c_[:, :, ::-1] for c_ in crops]


def test_batch_augment_makes_only_crops_and_flips_of_each_image():
    spec = DataSpec(2, 6, ["a", "b"], mean=[0.5, 0.25], std=[0.25, 0.5])
    aug = BatchAugment.from_config(AugmentConfig(crop_padding=2, flip=True), spec)
    x = torch.randn(64, 2, 6, 6)
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    fills = [-0.5 / 0.25, -0.25 / 0.5]  # black, normalized: per channel
    seen = set()
    for i in range(len(x)):
        per_channel = [_candidates(x[i, ch:ch + 1].numpy(), 2, fills[ch]) for ch in range(2)]
        matches = [k for k in range(len(per_channel[0]))
                   if all(np.array_equal(out[i, ch:ch + 1].numpy(), per_channel[ch][k]) for ch in range(2))]
        assert matches, f"sample {i} is not a padded crop (or its mirror) of its input"
        seen.add(matches[0])
    assert len(seen) > 10  # 64 samples spread over the 50 crop x flip choices, not one fixed shift
    again = aug(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded: a resumed epoch repeats its crops
    assert not torch.equal(out, aug(x, torch.Generator().manual_seed(1)))


def test_batch_augment_off_and_flip_only():
    spec = DataSpec(1, 4, ["a", "b"], mean=[0.5], std=[0.25])
    assert BatchAugment.from_config(AugmentConfig(crop_padding=0, flip=False), spec) is None
    flip = BatchAugment.from_config(AugmentConfig(crop_padding=0, flip=True), spec)
    x = torch.randn(200, 1, 4, 4)
    out = flip(x, torch.Generator().manual_seed(3))
    same = [torch.equal(out[i], x[i]) for i in range(len(x))]
    mirrored = [torch.equal(out[i], x[i].flip(2)) for i in range(len(x))]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 60 < sum(mirrored) < 140  # about half


def test_use_cache_decides_by_shard_size_and_config():
    gib = 2**30
    assert use_cache(DataConfig(), 7 * gib, min_workers=2)  # 3.5 GiB per worker <= 4
    assert not use_cache(DataConfig(), 9 * gib, min_workers=2)
    assert use_cache(DataConfig(ingest="cache"), 100 * gib, min_workers=1)
    assert not use_cache(DataConfig(ingest="stream"), 1, min_workers=1)
    assert not use_cache(DataConfig(cache_gb_per_worker=0.5), gib, min_workers=1)
    with pytest.raises(ConfigError, match="data.ingest"):
        load_config(None, ["data.ingest=memory"])


def _dataset(n: int) -> ray.data.Dataset:
    """n images whose pixels and label are their row number, so a batch tells which rows it holds."""
    rows = [{"image": np.full((1, 4, 4), i, np.float32), "label": i} for i in range(n)]
    return ray.data.from_items(rows, override_num_blocks=4).materialize()


@pytest.mark.usefixtures("ray_session")
def test_cached_and_streamed_epochs_hold_the_same_rows():
    ds = _dataset(300)
    cached = WorkerIngest(BlockShards.of(ds), 32, torch.device("cpu"), shuffle=True, seed=5)
    stream = WorkerIngest(ds, 32, torch.device("cpu"), shuffle=True, seed=5)
    assert not cached.cached  # filled by load() or the first epoch
    cached.load()
    stream.load()
    assert cached.cached and not stream.cached and len(cached.labels) == 300

    def rows(batches, size: int = 32) -> list[int]:
        out = []
        for b in batches:
            assert len(b["label"]) <= size and b["image"].dtype == torch.float32
            assert torch.equal(b["image"][:, 0, 0, 0].long(), b["label"])  # image and label stay paired
            out += b["label"].tolist()
        return out

    e0, e1, e0_again = rows(cached.epoch(0)), rows(cached.epoch(1)), rows(cached.epoch(0))
    s0, s1 = rows(stream.epoch(0)), rows(stream.epoch(1))
    assert sorted(e0) == sorted(e1) == sorted(s0) == sorted(s1) == list(range(300))
    assert e0 != e1 and s0 != s1  # a fresh order every epoch, cached or streamed
    assert s0 != list(range(300))
    assert e0 == e0_again  # reproducible from (seed, rank, epoch): resume replays the same order
    plain = WorkerIngest(BlockShards.of(ds), 100, torch.device("cpu"))  # validation: no shuffle
    assert rows(plain.epoch(0), 100) == list(range(300)) == rows(plain.epoch(3), 100)


def _shard_rows(config):
    from emergence_ray.data.ingest import WorkerIngest, worker_source

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out = {}
    for name, cfg in (("cached", config["cached"]), ("stream", config["stream"])):
        train = WorkerIngest(worker_source(cfg, "train"), 16, torch.device("cpu"), shuffle=True, rank=rank, world=world)
        val = WorkerIngest(worker_source(cfg, "val"), 16, torch.device("cpu"), rank=rank, world=world, equal=False)
        out[name] = {"kind": "cached" if train.cache else "stream",
                     "train": [b["label"].tolist() for b in train.epoch(0)],
                     "val": [b["label"].tolist() for b in val.epoch(0)]}
    with open(f"{config['out']}/rows_{rank}.json", "w") as f:
        json.dump(out, f)


@pytest.mark.usefixtures("ray_session")
def test_cached_shards_are_disjoint_equal_and_match_the_stream(tmp_path):
    """Cached: block refs in the loop config, no `datasets=`; streamed: `datasets=` (streaming_split)."""
    splits = {"train": _dataset(203), "val": _dataset(51)}
    none, cached, no_config = trainer_inputs(splits, cache=True)
    streamed, plain, data_config = trainer_inputs(splits, cache=False)
    assert none is None and no_config is None and set(cached["blocks"]) == {"train", "val"}
    assert plain == {} and streamed is splits and data_config is not None
    trainer = TorchTrainer(
        _shard_rows, train_loop_config={"out": str(tmp_path), "cached": cached, "stream": plain},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "runs"), name="cache"),
        datasets=streamed, dataset_config=data_config)
    trainer.fit()
    shards = [json.loads((tmp_path / f"rows_{r}.json").read_text()) for r in (0, 1)]
    assert [s[k]["kind"] for s in shards for k in ("cached", "stream")] == ["cached", "stream"] * 2
    flat = [{k: sum(s[k]["train"], []) for k in ("cached", "stream")} for s in shards]
    for s in flat:  # 101 rows each: floor(203 / 2); DDP steps stay in lockstep
        assert len(s["cached"]) == len(s["stream"]) == 101
    assert not set(flat[0]["cached"]) & set(flat[1]["cached"])
    assert len(set(flat[0]["cached"]) | set(flat[1]["cached"])) == 202
    val = [sum(s["cached"]["val"], []) for s in shards]
    assert sorted(val[0] + val[1]) == list(range(51))  # validation: every image, on one rank or the other


def test_block_shards_split_rows_by_world_size():
    """Spans without Ray: equal (training) drops the remainder; unequal (validation) keeps it."""
    shards = BlockShards(refs=(None,) * 3, rows=(4, 3, 3))
    assert [shards.span(3, r) for r in range(3)] == [(0, 3), (3, 6), (6, 9)]
    assert [shards.span(3, r, equal=False) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert [shards.span(1, 0), shards.span(4, 3, equal=False)] == [(0, 10), (7, 10)]


@pytest.mark.usefixtures("ray_session")
def test_block_shards_read_only_their_rows_across_blocks():
    shards = BlockShards.of(_dataset(37))
    assert len(shards.rows) == 4 and shards.total == 37
    parts = [shards.read(world=3, rank=r) for r in range(3)]
    assert [p["label"].tolist() for p in parts] == [list(range(0, 12)), list(range(12, 24)), list(range(24, 36))]
    assert all(np.array_equal(p["image"][:, 0, 0, 0], p["label"]) for p in parts)  # rows stay paired
    assert parts[0]["image"].shape == (12, 1, 4, 4) and parts[0]["image"].dtype == np.float32
    with pytest.raises(DataError, match="train shard is empty"):  # 37 rows over 40 workers
        WorkerIngest(shards, 8, torch.device("cpu"), rank=2, world=40).load()
    val = WorkerIngest(shards, 8, torch.device("cpu"), rank=0, world=40, name="val", equal=False)
    assert list(val.epoch(0)) == []  # validation: a rank without rows evaluates nothing
    assert [len(b["label"]) for b in WorkerIngest(shards, 8, torch.device("cpu"), rank=39, world=40,
                                                  equal=False).epoch(0)] == [1]


# ---------------------------------------------------------------- device transform (imagenet policy)


def test_random_resized_crop_boxes_follow_scale_and_ratio():
    from emergence_ray.data.augment import random_resized_crop_boxes

    gen = torch.Generator().manual_seed(0)
    boxes = random_resized_crop_boxes(4000, 64, (0.2, 0.6), (3 / 4, 4 / 3), gen)
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 64).all() and (y0 + h <= 64).all()
    area = w * h / 64**2
    assert area.min() > 0.17 and area.max() < 0.64  # the scale range, up to rounding of w and h
    assert ((w / h) > 0.7).all() and ((w / h) < 1.43).all()
    assert area.std() > 0.08 and x0.float().std() > 5  # spread, not one fixed box
    again = random_resized_crop_boxes(4000, 64, (0.2, 0.6), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    assert torch.equal(boxes, again)  # seeded: a resumed epoch repeats its crops


def test_large_images_normalize_image_by_image_to_the_same_values():
    """On a CPU, images from `PER_IMAGE_FROM` values on are normalized one at a time (each while
    in the cache): the same values as the whole batch at once, for the small policy and for the
    imagenet policy's centre crop (a strided view of each image)."""
    from emergence_ray.data.augment import PER_IMAGE_FROM, DeviceTransform

    mean, std = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    for side in (32, 128, 160):  # below, at and above the threshold (3 * 128 * 128 values)
        x = torch.randint(0, 256, (5, 3, side, side), dtype=torch.uint8)
        small = DeviceTransform(DataSpec(3, side, ["a", "b"], mean=mean, std=std))(x)
        assert small.dtype == torch.float32 and small.is_contiguous()
        assert torch.allclose(small, (x.float() / 255 - m) / s, atol=1e-5), side
        crop = side * 7 // 8
        spec = DataSpec(3, crop, ["a", "b"], mean=mean, std=std, policy="imagenet", load_size=side)
        ev = DeviceTransform(spec)(x)
        top = (side - crop) // 2
        assert ev.shape == (5, 3, crop, crop) and ev.is_contiguous()
        assert torch.allclose(ev, (x[:, :, top:top + crop, top:top + crop].float() / 255 - m) / s, atol=1e-5)
    assert 3 * 32 * 32 < PER_IMAGE_FROM <= 3 * 128 * 128


def test_imagenet_policy_centre_crops_for_eval_and_crops_flips_for_training():
    from emergence_ray.data.augment import DeviceTransform

    spec = DataSpec(3, 8, ["a", "b"], mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], policy="imagenet", load_size=10)
    x = torch.randint(0, 256, (16, 3, 10, 10), dtype=torch.uint8)
    ev = DeviceTransform(spec)(x)
    assert ev.shape == (16, 3, 8, 8) and ev.dtype == torch.float32
    assert torch.allclose(ev, (x[:, :, 1:9, 1:9].float() / 255 - 0.5) / 0.25, atol=1e-5)  # the centre 8 of 10
    whole = AugmentConfig(policy="imagenet", scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    tr = DeviceTransform(spec, whole, train=True)(x, torch.Generator().manual_seed(0))
    assert tr.shape == (16, 3, 8, 8)
    # scale 1, ratio 1: the whole 10x10 image resized to 8x8, the same as torch's bilinear resize
    ref = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False).float()
    assert torch.allclose(tr, (ref / 255 - 0.5) / 0.25, atol=1e-4)
    flip = AugmentConfig(policy="imagenet", scale=(1.0, 1.0), ratio=(1.0, 1.0))  # flip: on by policy default
    out = DeviceTransform(spec, flip, train=True)(x, torch.Generator().manual_seed(1))
    plain = (ref / 255 - 0.5) / 0.25
    mirrored = [torch.allclose(out[i], plain[i].flip(2), atol=1e-4) for i in range(16)]
    same = [torch.allclose(out[i], plain[i], atol=1e-4) for i in range(16)]
    assert all(m or s for m, s in zip(mirrored, same)) and 0 < sum(mirrored) < 16


def test_imagenet_training_crops_are_torchvisions_resized_crop_on_either_path():
    """The CPU path (one uint8 `interpolate` per image) is torchvision's resized_crop + hflip
    exactly, and the batched `grid_sample` path that a GPU takes (run here on the CPU) samples
    the same points: within one grey level away from each crop's outermost pixels."""
    from torchvision.transforms.v2 import functional as TF

    from emergence_ray.data.augment import DeviceTransform, crop_resize_grid, random_resized_crop_boxes

    spec = DataSpec(3, 24, ["a", "b"], mean=[0.5, 0.4, 0.3], std=[0.25, 0.2, 0.3], policy="imagenet", load_size=32)
    aug = AugmentConfig(policy="imagenet", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    smooth = torch.nn.functional.interpolate(torch.rand(64, 3, 8, 8) * 255, size=(32, 32), mode="bilinear")
    x = smooth.round().to(torch.uint8)  # photo-like: neighbouring pixels close, so resampling errors stay small
    out = DeviceTransform(spec, aug, train=True)(x, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)  # the same draws, in the same order
    boxes = random_resized_crop_boxes(64, 32, aug.scale, aug.ratio, gen)
    mirror = torch.rand(64, generator=gen) < 0.5
    assert 10 < int(mirror.sum()) < 54
    scale = torch.tensor([1 / (255 * s) for s in spec.std]).view(3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(spec.mean, spec.std)]).view(3, 1, 1)
    for i, (x0, y0, w, h) in enumerate(boxes.long().tolist()):
        ref = TF.resized_crop(x[i], y0, x0, h, w, [24, 24], antialias=False)
        ref = TF.horizontal_flip(ref) if mirror[i] else ref
        assert torch.allclose(out[i], ref.float() * scale - shift, atol=1e-5), i
    grid = crop_resize_grid(x.float(), boxes, mirror, 24)
    pixels = (out + shift) / scale  # the CPU path's uint8 values
    # one grey level: the uint8 kernel's fixed-point weights and rounding, nothing else
    assert (grid - pixels)[:, :, 1:-1, 1:-1].abs().max() <= 1.0 + 1e-3
