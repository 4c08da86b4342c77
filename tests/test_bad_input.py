"""Bad input through the real CLI: a clear error naming the problem and the fix, exit code 2,
no traceback (unless --debug), and every existing run left exactly as it was."""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import CLI, cli_env, digits_arrays, png_bytes


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    """A storage folder holding one finished run that no bad command may touch."""
    root = tmp_path_factory.mktemp("storage")
    run = root / "existing"
    (run / "checkpoint_1").mkdir(parents=True)
    (run / "checkpoint_1" / "checkpoint.pt").write_bytes(b"weights")
    (run / "summary.json").write_text(json.dumps({"test_accuracy": 0.9}))
    return root


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    images, labels = digits_arrays()
    (root / "empty").mkdir()
    one = root / "one_class" / "only"
    one.mkdir(parents=True)
    for i in range(20):
        (one / f"{i}.png").write_bytes(png_bytes(images[i]))
    tree = root / "corrupt"
    for i, (img, y) in enumerate(zip(images[:400], labels[:400])):
        (tree / str(y)).mkdir(parents=True, exist_ok=True)
        (tree / str(y) / f"{i}.png").write_bytes(png_bytes(img))
    (tree / "3" / "truncated.png").write_bytes(png_bytes(images[0])[:30])
    (tree / "4" / "garbage.jpg").write_bytes(b"this is no jpeg")
    strays = root / "strays"
    for i, (img, y) in enumerate(zip(images[:200], labels[:200])):
        (strays / str(y)).mkdir(parents=True, exist_ok=True)
        (strays / str(y) / f"{i}.png").write_bytes(png_bytes(img))
    (strays / "2" / "notes.txt").write_text("not an image")
    pngs = [png_bytes(i) for i in images[:300]]
    pq.write_table(pa.table({"image": pngs, "target": labels[:300]}), root / "nolabel.parquet")
    pq.write_table(pa.table({"image": pngs, "label": labels[:300]}), root / "labels.parquet")
    (root / "a_file").write_text("x")
    return {p.stem: p for p in root.iterdir()} | {"root": root}


CASES = {
    # name: (overrides, expected fragments of the message)
    "missing path": (["data.source=imagefolder", "data.path=/no/such/folder"], ["does not exist"]),
    "empty folder": (["data.source=imagefolder", "data.path={empty}"], ["no images found"]),
    "one class": (["data.source=imagefolder", "data.path={one_class}"], ["at least two"]),
    "corrupt image": (["data.source=imagefolder", "data.path={corrupt}"],
                      ["cannot decode", "data.on_bad_image=skip"]),
    "non-image files": (["data.source=imagefolder", "data.path={strays}"], ["notes.txt", "not images"]),
    "parquet without label column": (["data.source=parquet", "data.path={nolabel}"],
                                     ["no column 'label'", "data.label_column"]),
    "parquet without image column": (["data.source=parquet", "data.path={labels}", "data.image_column=img"],
                                     ["no column 'img'"]),
    "labels out of range": (["data.source=parquet", "data.path={labels}", "data.class_names=[a, b, c]"],
                            ["labels must lie in 0..2"]),
    "unknown model": (["model.name=vgg99"], ["model.name", "unknown model"]),
    "unknown optimizer": (["optim.name=lion"], ["optim.name"]),
    "lr <= 0": (["optim.lr=0"], ["optim.lr", "greater than 0"]),
    "negative weight decay": (["optim.weight_decay=-0.01"], ["optim.weight_decay"]),
    "batch larger than shard": (["train.batch_size=5000"], ["larger than a worker's shard"]),
    "too many workers": (["scaling.num_workers=16"], ["does not fit a cluster of 2 CPUs"]),
    "too many CPUs": (["scaling.cpus_per_worker=4"], ["needs 8 CPUs", "the cluster has 2"]),
    "GPUs on a CPU cluster": (["scaling.use_gpu=true"], ["needs 2 GPUs; the cluster has 0"]),
    "unwritable storage path": (["run.storage_path={a_file}/runs"], ["cannot write", "run.storage_path"]),
    "finished run name": (["run.name=existing"], ["already finished", "new run.name"]),
    "absurd lr": (["optim.lr=1e6"], ["optim.lr", "allowed: 0 < optim.lr <= 10"]),
    "NaN lr": (["optim.lr=.nan"], ["optim.lr: Input should be a finite number", "allowed: 0 < optim.lr <= 10"]),
    "absurd batch size": (["train.batch_size=1000000000"], ["train.batch_size", "<= 65536"]),
    "infinite cpus per worker": (["scaling.cpus_per_worker=.inf"], ["scaling.cpus_per_worker", "finite number"]),
}


DEBUG = "--debug"  # the one bad command run with --debug


def _args(overrides: list[str], bad_data: dict[str, Path]) -> list[str]:
    args = []
    for o in overrides:
        args += ["--set", o.format(**{k: str(v) for k, v in bad_data.items()})]
    return args


@pytest.fixture(scope="module")
def refused(ray_session, storage, bad_data, tmp_path_factory) -> dict[str, tuple]:
    """Every bad command of CASES (and the --debug one) through the real CLI, each in its own process
    against the session's Ray, a few at a time: each process mostly waits on its own Python and Ray
    start-up. Each gets its own copy of the storage folder (the finished run included), snapshotted
    just before its command starts and after it ends.
    -> {case: (CompletedProcess, snapshot before, snapshot after)}"""
    env = cli_env(RAY_ADDRESS=ray_session)

    def run(case: str) -> tuple:
        own = tmp_path_factory.mktemp("storage")
        shutil.copytree(storage, own, dirs_exist_ok=True)  # copy2: the same bytes and mtimes
        if case == DEBUG:
            args = ["train", "--debug", "--set", f"run.storage_path={own}", "--set", "data.source=imagefolder",
                    "--set", "data.path=/no/such/folder"]
        else:
            args = ["train", "--set", f"run.storage_path={own}", *_args(CASES[case][0], bad_data)]
        before = _snapshot(own)
        proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=env)
        return proc, before, _snapshot(own)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip([*CASES, DEBUG], pool.map(run, [*CASES, DEBUG])))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_clearly(case, refused):
    _, fragments = CASES[case]
    proc, before, after = refused[case]
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr[-2000:]
    assert after == before  # nothing written, nothing lost


def test_debug_shows_the_traceback(refused):
    proc, _, _ = refused[DEBUG]
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_skipping_bad_images_counts_them(ray_session, bad_data, tmp_path):
    proc = subprocess.run([*CLI, "train", "--set", "data.source=imagefolder",
                           "--set", f"data.path={bad_data['corrupt']}",
                           "--set", "data.on_bad_image=skip", "--set", "train.epochs=2", "--set", "train.batch_size=32",
                           "--set", f"run.storage_path={tmp_path}", "--set", "run.name=skip"],
                          capture_output=True, text=True, timeout=600, env=cli_env(RAY_ADDRESS=ray_session))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["bad_images_skipped"] == 2
    assert sum(summary["images"].values()) == 400


def test_non_image_files_skipped_and_counted(ray_session, bad_data, tmp_path):
    from emergence_ray.config import DataConfig
    from emergence_ray.data.pipeline import prepare

    p = prepare(DataConfig(source="imagefolder", path=str(bad_data["strays"]), on_bad_image="skip"))
    assert p.bad_images == 1 and sum(p.counts.values()) == 200


# command-line options: (arguments after the command, expected fragments); {ckpt} is a real checkpoint,
# {out} an empty folder, {file} an existing file
OPTIONS = {
    "predict --top-k 0": (["predict", "--checkpoint", "{ckpt}", "--output", "{out}/p.parquet", "--top-k", "0"],
                          ["--top-k", "give a whole number >= 1"]),
    "predict --top-k above the classes": (["predict", "--checkpoint", "{ckpt}", "--output", "{out}/p.parquet",
                                           "--top-k", "11"], ["--top-k 11", "10 classes; give 1..10"]),
    "predict --actors 0": (["predict", "--checkpoint", "{ckpt}", "--output", "{out}/p.parquet", "--actors", "0"],
                           ["--actors", ">= 1"]),
    "predict --actors beyond the cluster": (["predict", "--checkpoint", "{ckpt}", "--output", "{out}/p.parquet",
                                             "--actors", "5"], ["--actors 5 needs 2.5 CPUs", "Give --actors 1..2"]),
    "predict --split unknown": (["predict", "--checkpoint", "{ckpt}", "--output", "{out}/p.parquet", "--split",
                                 "validation"], ["--split", "invalid choice"]),
    "predict --output existing": (["predict", "--checkpoint", "{ckpt}", "--output", "{file}"],
                                  ["already exists and is never overwritten"]),
    "predict --output in a missing folder": (["predict", "--checkpoint", "{ckpt}", "--output",
                                              "{out}/no/such/p.parquet"], ["does not exist"]),
    "predict --output of another format": (["predict", "--checkpoint", "{ckpt}", "--output", "{out}/p.txt"],
                                           [".parquet or .csv"]),
    "predict --checkpoint missing": (["predict", "--checkpoint", "{out}/nothing", "--output", "{out}/p.parquet"],
                                     ["no such directory"]),
    "evaluate --output a file": (["evaluate", "--checkpoint", "{ckpt}", "--output", "{file}"], ["is a file"]),
    "unknown option": (["train", "--epochs", "3"], ["unrecognized arguments: --epochs 3"]),
}


@pytest.fixture(scope="module")
def refused_options(imagefolder_run, ray_session, tmp_path_factory) -> dict[str, tuple]:
    """Every command of OPTIONS through the real CLI, a few at a time, each with its own folder
    (an empty `out/` plus one existing file) and the finished run's checkpoint; snapshots of both
    before and after. -> {case: (CompletedProcess, before, after)}"""
    ckpt = json.loads((imagefolder_run / "summary.json").read_text())["checkpoint"]
    env = cli_env(RAY_ADDRESS=ray_session)

    def run(case: str) -> tuple:
        root = tmp_path_factory.mktemp("options")
        out = root / "out"
        out.mkdir()
        existing = out / "existing.parquet"
        existing.write_bytes(b"PAR1 not to be touched")
        args = [a.format(ckpt=ckpt, out=out, file=existing) for a in OPTIONS[case][0]]
        before = _snapshot(root), _snapshot(imagefolder_run)
        proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=env)
        return proc, before, (_snapshot(root), _snapshot(imagefolder_run))

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(OPTIONS, pool.map(run, OPTIONS)))


@pytest.mark.parametrize("case", list(OPTIONS))
def test_bad_option_is_refused_clearly(case, refused_options):
    proc, before, after = refused_options[case]
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    for fragment in OPTIONS[case][1]:
        assert fragment in line, line
    assert after == before  # nothing written, nothing lost


def _numeric_keys() -> list[tuple[str, bool]]:
    """(dotted key, holds floats) for every int/float config key, found by walking the sections."""
    import typing

    from pydantic import BaseModel

    from emergence_ray.config import JobConfig

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from walk(ann, f"{prefix}{name}.")
                continue
            flat, stack = set(), [ann]
            while stack:
                t = stack.pop()
                args = typing.get_args(t)
                if args and typing.get_origin(t) is not typing.Literal:
                    stack += args
                else:
                    flat.add(t)
            if flat & {int, float} and typing.get_origin(ann) is not tuple:
                yield f"{prefix}{name}", float in flat

    return list(walk(JobConfig, ""))


def test_every_numeric_config_key_refuses_absurd_and_non_finite_values():
    """A key added later without bounds fails here: 1e12 and (for floats) NaN / inf must be refused,
    with the key named."""
    from emergence_ray.config import load_config
    from emergence_ray.errors import ConfigError

    keys = _numeric_keys()
    assert len(keys) >= 20 and ("optim.lr", True) in keys and ("train.batch_size", False) in keys
    accepted = []
    for key, is_float in keys:
        for value in ["1000000000000", "-1000000000000"] + ([".nan", ".inf"] if is_float else []):
            try:
                load_config(None, [f"{key}={value}"])
            except ConfigError as err:
                assert key in str(err), (key, value, str(err))
            else:
                accepted.append(f"{key}={value}")
    assert not accepted
